"""The run directory: the one place that names a run's stages and files.

Layout (everything that writes or reads a run uses the names below)::

    RUN/config.yaml  manifest.json  data.json  run.log  summary.json  .lock
    RUN/teacher/     model.pt  metrics.json  metrics.jsonl
    RUN/baseline/    model.pt  metrics.json  metrics.jsonl   (when the final architecture is not the teacher's)
    RUN/label-1/     a pseudo-label store (noisystudent.label.store) + probe.parquet
    RUN/select-1/    selection.parquet  selection.json  heldout_hashes.parquet
    RUN/student-1/   model.pt  metrics.json  metrics.jsonl
    ...
    RUN/fixres/      model.pt  metrics.json  metrics.jsonl   (when fix-res runs)
    RUN/evaluate/    robustness.json  <suite>/<model>.json  plots
    RUN/report/      report.html  report.md
    RUN/checkpoints/<stage>/   resumable training checkpoints, removed once the stage is committed
    RUN/pool/        the unlabeled pool's listing, frozen for the run (a folder is walked once)

A stage writes into ``RUN/.partial-<stage>/`` and is renamed to ``RUN/<stage>/`` only when it
finished, then recorded in ``manifest.json``; so a crash never leaves a stage that looks complete,
and ``--resume`` skips exactly the stages the manifest lists. The label stage is the exception: its
store is written in place (its shards have their own completion records, so a killed labeler resumes
at the first unfinished shard) and the manifest records it once the store is complete.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

from .errors import ConfigError, StorageError
from .files import atomic_write, write_error

log = logging.getLogger("noisystudent")

# ------------------------------------------------------------------------------ the contract


class RunConfig(Protocol):
    """What a run directory needs of the config that makes it (a
    :class:`noisystudent.config.schema.Config`; named by its methods, as this layer sits below
    config): a fingerprint to match on resume, and a way to save itself as ``config.yaml``."""

    def fingerprint(self) -> str: ...

    def save(self, path: Path) -> None: ...


# Files at the top of a run.
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
DATA = "data.json"
LOG = "run.log"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
POOL = "pool"  # the frozen listing of the unlabeled pool (folder and file-list pools), made once per run
TENSORBOARD = "tensorboard"
TRACKING = "tracking.json"  # the MLflow / W&B run ids, so a resumed run logs to the same runs (noisystudent.tracking)
WANDB = "wandb"  # W&B's own folder (offline runs, its logs), unless WANDB_DIR is set
LOCK = ".lock"  # host and PID of the process writing the run (RunDir.acquire_lock)

# Stage names.
TEACHER = "teacher"
BASELINE = "baseline"  # the final architecture on the labels alone (the Noisy Student gain's yardstick)
FIXRES = "fixres"
EVALUATE = "evaluate"
REPORT = "report"


def teacher_member(k: int) -> str:
    """The ``k``-th teacher of an ensemble (``pseudo.ensemble_size``; k >= 2, the first is the teacher)."""
    return f"{TEACHER}-{k}"


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
CALIBRATION = "calibration.json"  # label stages: the fitted temperature, the teacher's ECE on val before/after (pseudo.calibrate)
SELECTION = "selection.parquet"  # select stages: key, copies, top-k classes and probabilities
SELECTION_SUMMARY = "selection.json"  # select stages: counts per class, K, what pool hygiene dropped
HELDOUT_HASHES = "heldout_hashes.parquet"  # select stages: the val/test images' hashes the pool is cleaned of
ROBUSTNESS = "robustness.json"  # the evaluate stage
REPORT_HTML = "report.html"
REPORT_MD = "report.md"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file in the same folder, then rename over ``path``; a failed write
    (a full disk) removes the temp file and raises one :class:`StorageError` line."""
    atomic_write(path, json.dumps(obj, indent=2, default=_jsonable))


def write_text_atomic(path: Path, text: str) -> None:
    """Text version of :func:`write_json_atomic`."""
    atomic_write(path, text)


# Locks this process holds, released at exit (a normal exit, an error, SIGTERM's exit 143).
_held_locks: set[Path] = set()


def _read_lock(path: Path) -> dict | None:
    """The holder recorded in a lock file; ``{}`` if it cannot be parsed, None if it is gone."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = {}
    if not isinstance(holder, dict):
        holder = {}
    if not holder:  # torn write: a lock is created and written within microseconds; age decides
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return None
        holder = {"stale_unreadable": age > 10}
    return holder


def _lock_is_stale(holder: dict, host: str) -> bool:
    """A lock whose process is known to be gone: same host and no such PID (or an unreadable,
    old lock file). A lock from another host is never stale: its process cannot be checked."""
    if "stale_unreadable" in holder:
        return bool(holder["stale_unreadable"])
    if holder.get("host") != host:
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def _release(path: Path) -> None:
    if path not in _held_locks:
        return
    _held_locks.discard(path)
    holder = _read_lock(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@atexit.register
def _release_all() -> None:
    for path in list(_held_locks):
        try:
            _release(path)
        except OSError:
            pass


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _manifest_problem(manifest: Any) -> str | None:
    """What makes a parsed manifest.json not one :class:`RunDir` wrote (None: nothing)."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("fingerprint", ""), str):
        return "'fingerprint' is not a string"
    stages = manifest.get("stages")
    if not isinstance(stages, dict):
        return "'stages' is not an object"
    for name, record in stages.items():
        if not isinstance(record, dict) or not isinstance(record.get("finished"), (int, float)):
            return f"stage {name!r} has no finish time"
    return None


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
            manifest = json.loads(self.manifest_path.read_text())
            problem = _manifest_problem(manifest)
        except (json.JSONDecodeError, UnicodeDecodeError):
            problem = "not JSON"
        if problem:
            raise ConfigError(f"corrupt run manifest {self.manifest_path} ({problem}); restore it from a copy, "
                              "or start a new run directory")
        return manifest

    @classmethod
    def open(cls, root: Path, cfg: RunConfig, resume: bool) -> "RunDir":
        """Create a new run directory, or reopen one to resume (same config only).

        Takes the run's lock (:meth:`acquire_lock`; call it on rank 0 only): a second process
        opening the same run is refused while this one lives. The lock is released by
        :meth:`release_lock`, and at the latest when this process exits.
        """
        run = cls(root)
        if resume and not run.manifest_path.is_file():
            raise ConfigError(f"--resume: {root} is not a run directory (no {MANIFEST})")
        if not resume and not run.manifest_path.is_file():
            run._refuse_foreign_files()
        try:
            run.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(e, run.root) from None
        run.acquire_lock()
        try:
            manifest = run.manifest()
            if resume:
                if manifest.get("fingerprint") != cfg.fingerprint():
                    raise ConfigError(f"--resume: {root} was made by a different config; "
                                      "start a new run directory or resume with its own config.yaml")
            elif run.manifest_path.is_file() and manifest.get("stages"):
                raise ConfigError(f"run directory {root} already holds a run; use --resume {root} or another --out")
            if not run.manifest_path.is_file() or not resume:
                try:
                    cfg.save(run.root / CONFIG)
                    write_json_atomic(run.manifest_path, {"fingerprint": cfg.fingerprint(), "created": time.time(),
                                                          "stages": {}})
                except StorageError as e:  # no manifest yet: --resume (its advice) would find no run
                    if "; free some space" not in str(e):
                        raise
                    raise StorageError(f"{str(e).split('; free some space')[0]}; the run in {root} has not "
                                       "started: free some space and run the same command again") from None
        except BaseException:
            run.release_lock()
            raise
        return run

    def _refuse_foreign_files(self) -> None:
        """A new run goes into a missing or empty folder, or one holding only what a run that
        stopped before its manifest left (config.yaml, a lock): never over files it did not write."""
        try:
            foreign = sorted(p.name for p in self.root.iterdir() if p.name not in (CONFIG, LOCK))
        except FileNotFoundError:
            return
        except OSError as e:
            raise StorageError(f"cannot read the run directory {self.root}: {e.strerror or e}") from None
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ConfigError(f"run directory {self.root} is not empty and holds no run (no {MANIFEST}; it has "
                              f"{shown}); choose a new --out folder or empty this one")

    # -------------------------------------------------------------------------- the lock

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK

    def acquire_lock(self) -> None:
        """Create ``RUN/.lock`` holding this host and PID, or refuse with one line naming the
        process that holds it. A lock left by a process that no longer exists on this host (a
        ``kill -9``) is stale: it is replaced, with a warning. This process may take its own lock
        again (a resume in the same Python session). Released at exit at the latest."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(3):  # a stale lock removed by us, or by a racing process, is retried
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(self.lock_path)
                if holder is None:
                    continue  # removed meanwhile
                if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                    _held_locks.add(self.lock_path)
                    return
                if not _lock_is_stale(holder, me["host"]):
                    if "pid" not in holder:
                        raise StorageError(f"run directory {self.root} is being opened by another process "
                                           f"({self.lock_path} was just created); try again in a moment")
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since") or 0))
                    raise StorageError(
                        f"run directory {self.root} is in use by PID {holder.get('pid')} on "
                        f"{holder.get('host')} (since {since}); wait for it to finish, or delete "
                        f"{self.lock_path} if that process no longer exists")
                log.warning(f"{self.lock_path}: removing the stale lock of PID {holder.get('pid')} "
                            f"on {holder.get('host')}, which no longer runs")
                self.lock_path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise write_error(e, self.lock_path) from None
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(me))
            except OSError as e:
                self.lock_path.unlink(missing_ok=True)
                raise write_error(e, self.lock_path) from None
            _held_locks.add(self.lock_path)
            return
        raise StorageError(f"could not take the lock {self.lock_path}: other processes keep replacing it")

    def release_lock(self) -> None:
        """Remove ``RUN/.lock`` if this process holds it (a no-op otherwise)."""
        _release(self.lock_path)

    def is_done(self, stage: str) -> bool:
        return stage in self.manifest()["stages"] and (self.root / stage).is_dir()

    def unfinish(self, stage: str) -> None:
        """Drop a finished stage from the manifest (its files stay): it runs again on resume."""
        manifest = self.manifest()
        if manifest["stages"].pop(stage, None) is not None:
            write_json_atomic(self.manifest_path, manifest)

    def path(self, stage: str) -> Path:
        return self.root / stage

    @contextmanager
    def stage(self, name: str, enabled: bool = True, in_place: bool = False) -> Iterator[Path]:
        """Yield a scratch folder for stage ``name``; commit it only if the block succeeds.

        With ``enabled=False`` (ranks other than 0) the block runs against a throw-away folder.
        ``in_place``: the block writes into ``RUN/<name>/`` itself, whose contents survive a crash
        (the label stage's store resumes shard by shard); it is committed the same way, and every
        rank gets that folder (a store is written by all ranks).
        """
        start = time.time()
        if in_place:
            final = self.root / name
            if enabled:
                final.mkdir(parents=True, exist_ok=True)
            yield final
            if enabled:
                self._commit(name, start)
            return
        if not enabled:
            with tempfile.TemporaryDirectory() as scratch:
                yield Path(scratch)
            return
        partial = self.root / f".partial-{name}"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        yield partial
        final = self.root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        self._commit(name, start)

    def _commit(self, name: str, start: float) -> None:
        final = self.root / name
        manifest = self.manifest()
        manifest["stages"][name] = {"finished": time.time(), "seconds": time.time() - start,
                                    "files": sorted(p.name for p in final.iterdir())}
        write_json_atomic(self.manifest_path, manifest)
