"""The stage runner: everything about a stage that is not its step of the algorithm.

A stage function takes its inputs and an output folder and returns its result; it knows nothing of
ranks, resumes or commits. :meth:`StageRunner.stage` wraps it: a stage the manifest lists is not
run again (its result is loaded from disk); otherwise the function runs on every rank (training
and labeling, which are distributed inside) or on rank 0 alone (selection, evaluation), writing
into ``RUN/.partial-<stage>/`` on rank 0 and a throw-away folder elsewhere; the folder is committed
when the function returns; every rank waits for the commit; an error on rank 0 in a rank-0 stage
stops the other ranks with a one-line error instead of leaving them waiting.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, TypeVar

from .distributed import DistContext, barrier, broadcast_object
from .errors import DamagedOutputError, NoisyStudentError
from .rundir import RunDir, write_json_atomic

log = logging.getLogger("noisystudent")
T = TypeVar("T")


class StageFailed(NoisyStudentError):
    """A stage failed on rank 0 (the other ranks raise this; rank 0 raises the error itself)."""


class StageRunner:
    """Runs the stages of one run directory in one process of the job."""

    def __init__(self, run: RunDir, ctx: DistContext):
        self.run, self.ctx = run, ctx

    @classmethod
    def open(cls, root: Path, cfg, resume: bool, ctx: DistContext) -> "StageRunner":
        """Open (or create) the run directory on rank 0 (which takes its lock); every rank waits
        for it, and an error there (a refused resume, a held lock) stops all ranks."""
        run, error = RunDir(root), None
        if ctx.is_main:
            try:
                run = RunDir.open(root, cfg, resume)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = e
        failed = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", ctx)
        if error is not None:
            raise error
        if failed:
            raise StageFailed(f"rank 0 could not open {root} ({failed})")
        return cls(run, ctx)

    def done(self, name: str) -> bool:
        """Whether stage ``name`` finished, as rank 0 sees it (every rank takes the same branch)."""
        return broadcast_object(self.run.is_done(name), self.ctx)

    def stage(self, name: str, work: Callable[[Path], T], load: Callable[[Path], T], *,
              every_rank: bool = True, in_place: bool = False) -> T:
        """Run ``work(out_dir)`` for stage ``name`` unless it finished; returns its result, or
        ``load(stage_dir)`` for a finished stage (and on ranks that did not run a rank-0 stage)."""
        if self.done(name):
            try:
                finished = load(self.run.path(name))
                log.info(f"[{name}] finished earlier; skipping (resume)")
                return finished
            except DamagedOutputError as e:  # every rank reads the same files, so all take this branch
                self._damaged(name, e)
        runs_here = every_rank or self.ctx.is_main
        result, error = None, None
        if runs_here:
            try:
                with self.run.stage(name, enabled=self.ctx.is_main, in_place=in_place) as out:
                    result = work(out)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = e
        if not every_rank:  # the others are waiting for rank 0: tell them whether it worked
            failed = broadcast_object(None if error is None else f"{type(error).__name__}: {error}", self.ctx)
            if failed and error is None:
                raise StageFailed(f"[{name}] failed on rank 0 ({failed}); see rank 0's log")
        if error is not None:
            raise error
        barrier(self.ctx)  # the stage is committed before any rank reads it
        if self.ctx.is_main:  # its resumable training checkpoints are no longer needed
            shutil.rmtree(self.run.checkpoint_dir(name), ignore_errors=True)
        return result if runs_here and every_rank else load(self.run.path(name))

    def _damaged(self, name: str, error: DamagedOutputError) -> None:
        """A finished stage whose files were lost or cut short since: it is no longer finished
        (rank 0 drops it from the manifest) and runs again; an in-place stage (labeling) redoes only
        what is missing. Never advise a resume that would skip it again."""
        log.warning(f"[{name}] finished earlier, but {error}; running it again")
        if self.ctx.is_main:
            self.run.unfinish(name)
        barrier(self.ctx)

    def write_json(self, path: Path, obj) -> None:
        """A run-level file (data.json, summary.json), written once by rank 0."""
        if self.ctx.is_main:
            write_json_atomic(path, obj)
