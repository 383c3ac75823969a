"""Where a run's time goes: start-up, data scan, each stage (a training stage split into its
epochs' training and validation, the final measurement and the rest), the report.

:class:`PhaseClock` collects the seconds as the run goes and writes them as summary.json's
``phases``; :func:`process_start` is when this process started (for the start-up phase).
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import contextmanager
from typing import Iterator

# What each kind of plan stage is called in the breakdown.
STAGE_PHASE = {"train": "training", "label": "labeling", "select": "selection", "finish": "evaluate"}


def process_start() -> float | None:
    """This process's start as a ``time.time()`` value, from /proc (Linux); None elsewhere.

    The standard library has no portable call for it (psutil would be a new dependency for one
    number), and /proc/self/stat gives it in clock ticks after boot."""
    try:
        with open("/proc/self/stat") as f:
            # the command name (field 2) may hold spaces: the fields after it follow its ')'
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


@contextmanager
def startup_imports(freeze: bool) -> Iterator[None]:
    """A command's heavy imports (torch, timm, torchvision, matplotlib) with the cyclic garbage
    collector paused; with ``freeze`` (a command's process, not a call from Python code) what they
    built is then moved out of the collector's sight (``gc.freeze``).

    Importing creates hundreds of thousands of long-lived objects and almost no garbage, yet each
    full collection it triggers walks the whole heap built so far: seven of them during a run's
    start-up, about 1 s of CPU on the 2-core benchmark machine (issue 28). Frozen, the imported
    modules are also skipped by every collection the run makes later. Without ``freeze`` (tests,
    notebooks) only the pause applies, and the collector is re-enabled as it was."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()


class PhaseClock:
    """The run's phases in seconds, in the order they happened.

    ``started``: when the clock's total begins (the process start for a command; the call for the
    Python API). ``stage_detail`` holds what a stage measured inside itself (a training stage's
    epochs, its final measurement)."""

    def __init__(self, started: float | None = None):
        self.started = time.time() if started is None else started
        self.flat: dict[str, float] = {}
        self.stages: list[dict] = []
        self.stage_detail: dict[str, dict] = {}

    def add(self, name: str, seconds: float) -> None:
        self.flat[name] = self.flat.get(name, 0.0) + max(0.0, seconds)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            self.add(name, time.time() - t0)

    @contextmanager
    def stage(self, name: str, kind: str) -> Iterator[None]:
        """Time one stage of the plan (made here, or a finished one loaded)."""
        t0 = time.time()
        try:
            yield
        finally:
            self.stages.append({"stage": name, "phase": STAGE_PHASE.get(kind, kind),
                                "seconds": max(0.0, time.time() - t0), **self.stage_detail.pop(name, {})})

    def as_dict(self) -> dict:
        """summary.json's ``phases``: ``total`` (from ``started``), the named phases, each stage
        with its breakdown, and ``other`` (the total less everything named: summary, logging)."""
        total = time.time() - self.started
        named = sum(self.flat.values()) + sum(s["seconds"] for s in self.stages)
        return {"total": total, **self.flat, "stages": list(self.stages), "other": max(0.0, total - named)}


def training_breakdown(history: list[dict], first_step: int = 0) -> dict:
    """A training stage's epochs from its evaluation records (those after ``first_step``: the ones
    this process trained): per epoch training and validation seconds, and their totals."""
    epochs = [{"epoch": r["epoch"], "train": r["train_seconds"], "val": r["val_seconds"]}
              for r in history if r.get("step", 0) > first_step and "train_seconds" in r]
    return {"train": sum(e["train"] for e in epochs), "val": sum(e["val"] for e in epochs), "epochs": epochs}


PHASE_WORDS = {"startup": "start-up", "data_scan": "data scan", "final_measurement": "final measurement",
               "train": "train", "val": "validation"}


def format_phases(phases: dict) -> str:
    """One line for the log: each phase's seconds, a training stage's split in brackets."""
    parts = [f"{PHASE_WORDS.get(k, k)} {v:.1f}s" for k, v in phases.items()
             if k not in ("total", "stages", "other") and isinstance(v, (int, float))]
    for s in phases.get("stages") or []:
        inner = [f"{PHASE_WORDS[k]} {s[k]:.1f}s" for k in ("train", "val", "final_measurement") if k in s]
        parts.append(f"{s['stage']} {s['seconds']:.1f}s" + (f" ({', '.join(inner)})" if inner else ""))
    return ", ".join(parts + [f"other {phases.get('other', 0):.1f}s"]) + f"; total {phases.get('total', 0):.1f}s"
