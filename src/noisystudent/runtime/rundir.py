"""The run directory: one folder per stage, a manifest of finished stages, atomic writes.

A stage writes into ``RUN/.partial-<stage>/`` and is renamed to ``RUN/<stage>/`` only when it
finished, then recorded in ``manifest.json``; so a crash never leaves a stage that looks complete,
and ``--resume`` skips exactly the stages the manifest lists.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..config.schema import Config, save_config
from .errors import ConfigError

MANIFEST = "manifest.json"


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
            save_config(cfg, run.root / "config.yaml")
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
