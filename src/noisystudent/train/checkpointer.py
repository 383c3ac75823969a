"""The trainer's checkpoints: what the loop has done so far, saved and resumed.

A checkpoint (see :mod:`noisystudent.train.state` for the file format and its atomic writes)
holds the parts (model, optimizer, scheduler, gradient scaler, EMA), every rank's RNG states and
running loss, and the loop's :class:`Progress`: step, time, best epoch and its weights, history.
Resuming also checks that the checkpoint belongs to the same training setup.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.distributed import DistContext, all_gather_object, barrier, broadcast_object
from ..runtime.errors import CheckpointError
from .state import (CHECKPOINT_FORMAT, capture_rng_state, checkpoint_path, load_checkpoint_file,
                    load_latest_checkpoint, restore_rng_state, save_checkpoint)

log = logging.getLogger("noisystudent")


@dataclass
class Progress:
    """What the loop has done so far; saved in every checkpoint."""

    step: int = 0
    seconds: float = 0.0  # training time spent before this process started (resumes)
    best_top1: float = -1.0
    best_epoch: int = -1
    best_state: dict = field(default_factory=dict)  # weights of the selected epoch, on the CPU
    history: list = field(default_factory=list)
    precision: str = ""  # the precision chosen when the stage started ("": not yet chosen)


@dataclass
class Resumed:
    """What a checkpoint gave back besides the parts' states."""

    progress: Progress
    running_loss: float  # this rank's smoothed loss
    path: Path


class Checkpointer:
    """Saves and resumes one stage's checkpoints in ``directory`` (None: checkpointing is off).

    ``setup`` is what must match for a checkpoint to continue this run (the number of processes
    may change); ``parts`` are the objects whose ``state_dict`` is saved. Every rank calls
    :meth:`save` and :meth:`resume` (collectives inside); rank 0 alone reads and writes files.
    """

    def __init__(self, directory: Path | None, setup: dict, parts: dict, keep: int, ctx: DistContext):
        self.directory = Path(directory) if directory is not None else None
        self.setup, self.parts, self.keep, self.ctx = setup, parts, keep, ctx
        self.last: Path | None = None  # the last checkpoint written or read

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def save(self, progress: Progress, running_loss: float) -> Path:
        """Every rank contributes its RNG states and running loss; rank 0 writes. Returns the path."""
        ctx = self.ctx
        ranks = all_gather_object({"rng": capture_rng_state(), "loss": running_loss}, ctx)
        path = checkpoint_path(self.directory, progress.step)
        if ctx.is_main:
            payload = {"format": CHECKPOINT_FORMAT, "setup": self.setup, "step": progress.step, "ranks": ranks,
                       "streams": {name: {"seed": s["seed"], "size": s["size"], "global_batch": s["global_batch"],
                                          "next_step": progress.step}
                                   for name, s in self.setup["streams"].items()},
                       "progress": dict(vars(progress)),
                       **{name: obj.state_dict() for name, obj in self.parts.items()}}
            save_checkpoint(self.directory, progress.step, payload, self.keep)
        barrier(ctx)  # nobody runs ahead (or exits, on SIGTERM) before the file is complete
        self.last = path
        return path

    def resume(self) -> Resumed | None:
        """Load the latest checkpoint of this stage into the parts and this rank's RNG states;
        None if checkpointing is off or there is no checkpoint yet."""
        if not self.enabled:
            return None
        ctx = self.ctx
        found = load_latest_checkpoint(self.directory) if ctx.is_main else None
        path = broadcast_object(found[0] if found else None, ctx)  # every rank resumes from the same file
        if path is None:
            return None
        ckpt = found[1] if found else load_checkpoint_file(path)
        self._check_setup(ckpt, path)
        for name, obj in self.parts.items():
            obj.load_state_dict(ckpt[name])
        ranks = ckpt["ranks"]
        same_world = len(ranks) == ctx.world_size
        if same_world:
            restore_rng_state(ranks[ctx.rank]["rng"])
        elif ctx.is_main:
            log.warning(f"{path} was written by {len(ranks)} process(es), this run has {ctx.world_size}: "
                        "the data order continues unchanged, but dropout masks differ from an uninterrupted run")
        self.last = Path(path)
        return Resumed(Progress(**ckpt["progress"]), ranks[ctx.rank if same_world else 0]["loss"], Path(path))

    def _check_setup(self, ckpt: dict, path: Path) -> None:
        for key in self.setup:
            if ckpt["setup"].get(key) != self.setup[key]:
                raise CheckpointError(f"{path} belongs to another training setup ({key}: "
                                      f"{ckpt['setup'].get(key)!r} there, {self.setup[key]!r} now); delete "
                                      f"{Path(path).parent} to start this stage over")
