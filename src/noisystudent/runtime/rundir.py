"""The run directory: the one place that names a run's stages and files.

Layout (everything that writes or reads a run uses the names below)::

    RUN/config.yaml  manifest.json  data.json  run.log  summary.json  .lock
    RUN/teacher/     model.pt  metrics.json  metrics.jsonl
    RUN/label-1/     a pseudo-label store (noisystudent.label.store) + probe.parquet
    RUN/select-1/    selection.parquet  selection.json
    RUN/student-1/   model.pt  metrics.json  metrics.jsonl
    ...
    RUN/fixres/      model.pt  metrics.json  metrics.jsonl   (when fix-res runs)
    RUN/evaluate/    robustness.json  <suite>/<model>.json  plots
    RUN/report/      report.html  report.md
    RUN/checkpoints/<stage>/   resumable training checkpoints, removed once the stage is committed

A stage writes into ``RUN/.partial-<stage>/`` and is renamed to ``RUN/<stage>/`` only when it
finished, then recorded in ``manifest.json``; so a crash never leaves a stage that looks complete,
and ``--resume`` skips exactly the stages the manifest lists. The label stage is the exception: its
store is written in place (its shards have their own completion records, so a killed labeler resumes
at the first unfinished shard) and the manifest records it once the store is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..config.schema import Config, save_config
from .errors import ConfigError

# ------------------------------------------------------------------------------ the contract

# Files at the top of a run.
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
DATA = "data.json"
LOG = "run.log"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"

# Stage names.
TEACHER = "teacher"
FIXRES = "fixres"
EVALUATE = "evaluate"
REPORT = "report"


def label_stage(i: int) -> str:
    """The stage where teacher ``i - 1`` labels the pool for student ``i``."""
    return f"label-{i}"


def select_stage(i: int) -> str:
    return f"select-{i}"


def student_stage(i: int) -> str:
    return f"student-{i}"


def iteration_of(stage: str) -> int | None:
    """``3`` for ``label-3`` / ``select-3`` / ``student-3``; None for other stages."""
    m = re.fullmatch(r"(?:label|select|student)-(\d+)", stage)
    return int(m.group(1)) if m else None


def teacher_of(i: int) -> str:
    """The stage whose model teaches iteration ``i``."""
    return TEACHER if i == 1 else student_stage(i - 1)


# Files inside stages.
MODEL = "model.pt"  # training stages
METRICS = "metrics.json"  # training stages: the summary row
HISTORY = "metrics.jsonl"  # training stages: one record per epoch
PROBE = "probe.parquet"  # label stages: the teacher on the labeled val split (confidence, predicted, target)
SELECTION = "selection.parquet"  # select stages: key, copies, top-k classes and probabilities
SELECTION_SUMMARY = "selection.json"  # select stages: counts per class, K
ROBUSTNESS = "robustness.json"  # the evaluate stage
REPORT_HTML = "report.html"
REPORT_MD = "report.md"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file in the same folder, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class RunDir:
    """A run's folder and its manifest."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def file(self, stage: str, name: str) -> Path:
        """A file of a finished stage, e.g. ``run.file(TEACHER, MODEL)``."""
        return self.root / stage / name

    def checkpoint_dir(self, stage: str) -> Path:
        """Where a training stage keeps resumable checkpoints until it is committed."""
        return self.root / CHECKPOINTS / stage

    def finished(self) -> list[str]:
        """Finished stages, in the order they finished."""
        stages = self.manifest()["stages"]
        return sorted((s for s in stages if (self.root / s).is_dir()), key=lambda s: stages[s]["finished"])

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {"stages": {}}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"corrupt run manifest {self.manifest_path}") from None

    @classmethod
    def open(cls, root: Path, cfg: Config, resume: bool) -> "RunDir":
        """Create a new run directory, or reopen one to resume (same config only)."""
        run = cls(root)
        manifest = run.manifest()
        if resume:
            if not run.manifest_path.is_file():
                raise ConfigError(f"--resume: {root} is not a run directory (no {MANIFEST})")
            if manifest.get("fingerprint") != cfg.fingerprint():
                raise ConfigError(f"--resume: {root} was made by a different config; "
                                  "start a new run directory or resume with its own config.yaml")
        elif run.manifest_path.is_file() and manifest.get("stages"):
            raise ConfigError(f"run directory {root} already holds a run; use --resume {root} or another --out")
        run.root.mkdir(parents=True, exist_ok=True)
        if not run.manifest_path.is_file() or not resume:
            save_config(cfg, run.root / CONFIG)
            write_json_atomic(run.manifest_path, {"fingerprint": cfg.fingerprint(), "created": time.time(),
                                                  "stages": {}})
        return run

    def is_done(self, stage: str) -> bool:
        return stage in self.manifest()["stages"] and (self.root / stage).is_dir()

    def path(self, stage: str) -> Path:
        return self.root / stage

    @contextmanager
    def stage(self, name: str, enabled: bool = True) -> Iterator[Path]:
        """Yield a scratch folder for stage ``name``; commit it only if the block succeeds.

        With ``enabled=False`` (ranks other than 0) the block runs against a throw-away folder.
        """
        if not enabled:
            with tempfile.TemporaryDirectory() as scratch:
                yield Path(scratch)
            return
        partial = self.root / f".partial-{name}"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        start = time.time()
        yield partial
        final = self.root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        manifest = self.manifest()
        manifest["stages"][name] = {"finished": time.time(), "seconds": time.time() - start,
                                    "files": sorted(p.name for p in final.iterdir())}
        write_json_atomic(self.manifest_path, manifest)
