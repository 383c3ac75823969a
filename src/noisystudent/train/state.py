"""Resumable training checkpoints and pre-emption: a crash costs minutes, not days.

A checkpoint holds everything a training stage needs to continue exactly where it stopped: the
model, optimizer, scheduler, EMA and gradient-scaler states, every rank's random number
generator states, the position in the data streams, the best-validation weights and the
history. It is one file per step, ``step-000001200.pt``, written by rank 0 only:

* atomically: written to a hidden temporary file, flushed to disk, then renamed over the final
  name, so a SIGKILL at any moment leaves complete checkpoints only (a torn temporary file at
  worst, which is ignored and removed);
* loadable with ``torch.load(weights_only=True)``: tensors and plain Python data only, so
  loading a checkpoint cannot run code;
* the last ``keep`` are kept; if the newest cannot be read, the one before it is used.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..runtime.errors import CheckpointError, TrainingPreempted  # noqa: F401 - the loop raises it from here
from ..runtime.files import atomic_write, read_torch_file, write_error
from ..runtime.workers import ignore_sigterm_in_worker  # noqa: F401 - the loop's loaders use it from here

log = logging.getLogger("noisystudent")

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^step-(\d+)\.pt$")
_TEMP = re.compile(r"^\.step-(\d+)\.pt(?:\.\d+)?\.tmp$")


# ------------------------------------------------------------------------------ RNG states


def capture_rng_state() -> dict:
    """This process's Python, NumPy and torch (CPU and CUDA) generator states as plain data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ files


def checkpoint_path(directory: Path, step: int) -> Path:
    """Where the checkpoint taken after ``step`` optimizer updates lives."""
    return Path(directory) / f"step-{step:09d}.pt"


def list_checkpoints(directory: Path | None) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (temporary files are not listed)."""
    if directory is None or not Path(directory).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(directory: Path, step: int, payload: dict, keep: int) -> Path:
    """Write ``payload`` atomically as the checkpoint of ``step``; keep the newest ``keep``."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, directory) from None
    path = checkpoint_path(directory, step)
    # fsync: the data must be on disk before the rename makes it visible; a full disk is one
    # StorageError line and removes the partial file
    atomic_write(path, lambda f: torch.save(payload, f), fsync=True)
    _fsync_dir(directory)  # and the rename itself must survive a power cut
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a directory; the rename still happened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint_file(path: Path) -> dict:
    """Read one training checkpoint (tensors and plain data only; memory-mapped, on the CPU)."""
    payload = read_torch_file(path, "noisystudent training checkpoint", mmap=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a noisystudent training checkpoint (format "
                              f"{CHECKPOINT_FORMAT})")
    return payload


def load_latest_checkpoint(directory: Path | None) -> tuple[Path, dict] | None:
    """The newest readable checkpoint in ``directory`` and its contents (None if there is none).

    Leftover temporary files from a write that was killed are removed; a complete file that
    cannot be read (a disk error) is skipped with a warning in favour of the one before it.
    """
    if directory is None or not Path(directory).is_dir():
        return None
    for p in Path(directory).iterdir():
        if _TEMP.match(p.name):
            p.unlink(missing_ok=True)
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint_file(path)
        except CheckpointError as e:
            log.warning(f"{e}; trying an older checkpoint")
    return None


# ------------------------------------------------------------------------------ pre-emption


@dataclass
class PreemptionFlag:
    """Set by the SIGTERM handler; the training loop checks it between steps."""

    requested: bool = False


@contextmanager
def catch_sigterm(enabled: bool = True) -> Iterator[PreemptionFlag]:
    """Turn SIGTERM into a flag for the duration of the block, then restore the previous handler.

    Schedulers (SLURM, Kubernetes, torchrun) send SIGTERM some seconds before they kill a job.
    Stopping in the middle of a step would leave nothing to save; the loop instead finishes the
    step, writes a checkpoint and raises :class:`TrainingPreempted`. Signal handlers can only be
    installed from the main thread; elsewhere (or when ``enabled`` is false) SIGTERM keeps its
    current behaviour.
    """
    flag = PreemptionFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.requested = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
