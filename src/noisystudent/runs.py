"""Work on a finished run or a checkpoint, as the command line does it: the API behind
``noisystudent evaluate``, ``label CHECKPOINT POOL`` and ``report``.

Each function takes paths and settings and returns what it made; the CLI only parses its arguments,
calls one of these and prints the result. The run directory's layout comes from
:mod:`noisystudent.runtime.rundir` (the one module that names a run's stages and files).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config.schema import Config, load_config
from .runtime import rundir as layout
from .runtime.errors import NoisyStudentError
from .runtime.rundir import RunDir

log = logging.getLogger("noisystudent")


@dataclass
class Evaluation:
    """What :func:`evaluate_run` made: per model, the suites' results (as ``robustness.json``)."""

    results: dict[str, dict]
    out_dir: Path  # where robustness.json and the plots are
    report: Path | None = None  # the run's rebuilt HTML report, when the run was evaluated in place

    @property
    def results_file(self) -> Path:
        return self.out_dir / layout.ROBUSTNESS


def run_models(run_dir: Path) -> dict[str, Path]:
    """The models a finished run's evaluation compares: its teacher (first stage) and the model it
    hands over (``summary.json``'s ``final`` stage; in a summary without one, its last stage)."""
    run = RunDir(run_dir)
    summary_path = run.root / layout.SUMMARY
    if not summary_path.is_file():
        raise NoisyStudentError(f"{run.root} is not a finished run directory (no {layout.SUMMARY})")
    try:
        summary = json.loads(summary_path.read_text())
        stages = summary["stages"]
        final = (summary.get("final") or {}).get("stage") or stages[-1]["name"]
        names = [stages[0]["name"], final]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
        raise NoisyStudentError(f"{summary_path} lists no stages; is it a run's summary?") from None
    return {name: run.file(name, layout.MODEL) for name in dict.fromkeys(names)}


def evaluate_config(target: Path, config: str | Path | None = None, overrides: Sequence[str] = (),
                    suites: str | None = None, max_images: int | None = None) -> Config:
    """The config :func:`evaluate_run` uses for ``target``: ``config`` (default: a run's own
    ``config.yaml``, or the built-in digits experiment for a checkpoint), then ``overrides``, then
    ``suites`` (comma-separated) and ``max_images`` as the ``evaluate.*`` keys they stand for."""
    overrides = list(overrides)
    if suites:
        overrides.append(f"evaluate.suites=[{suites}]")
    if max_images:
        overrides.append(f"evaluate.max_images={max_images}")
    if config is None and Path(target).is_dir():
        config = Path(target) / layout.CONFIG
    return load_config(config, overrides)


def evaluate_run(target: Path, cfg: Config, *, out: Path | None = None, progress: bool = True) -> Evaluation:
    """The robustness suites of ``cfg.evaluate`` on the test split of ``cfg.data``.

    ``target`` is a finished run directory (its teacher and final model, :func:`run_models`) or a
    checkpoint file. A run evaluated without ``out`` gets the results as its ``evaluate`` stage
    (under the run's lock, committed only when complete; finished (suite, model) results survive a
    kill in the run's checkpoints folder), and its report is rebuilt. Otherwise the results go to
    ``out`` (default for a checkpoint: ``evaluate-<name>`` beside it).
    """
    from .data.splits import build_splits
    from .evaluate.classifier import evaluate_checkpoints
    from .runtime.distributed import select_device

    target = Path(target)
    if target.is_dir():
        checkpoints = run_models(target)
    elif target.is_file():
        checkpoints = {target.stem: target}
        out = out if out is not None else target.parent / f"evaluate-{target.stem}"
    else:
        raise NoisyStudentError(f"evaluate: {target} is neither a run directory nor a checkpoint file")
    splits = build_splits(cfg.data, cfg.seed, require_unlabeled=False, log_splits=False)
    kwargs = dict(channels=splits.channels, device=select_device(cfg.device), seed=cfg.seed, progress=progress)
    if out is not None:
        out = Path(out)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            results = evaluate_checkpoints(checkpoints, splits.test, cfg.evaluate, out_dir=out, **kwargs)
        except BaseException:  # a bad checkpoint: leave no empty evaluate-<name>/ behind (only ours)
            if created and not any(out.iterdir()):
                out.rmdir()
            raise
        return Evaluation(results, out)
    run = RunDir(target)
    run.acquire_lock()
    try:
        progress_dir = run.checkpoint_dir(layout.EVALUATE)
        with run.stage(layout.EVALUATE) as scratch:
            results = evaluate_checkpoints(checkpoints, splits.test, cfg.evaluate, out_dir=scratch,
                                           progress_dir=progress_dir, **kwargs)
        shutil.rmtree(progress_dir, ignore_errors=True)
    finally:
        run.release_lock()
    return Evaluation(results, run.path(layout.EVALUATE), report=report_run(target)["html"])


def report_run(run_dir: Path) -> dict[str, Path]:
    """Build (or rebuild) a run's HTML and Markdown report: ``{"html": Path, "md": Path}``. The
    pseudo-label thumbnails need the run's pool; without it the report is made without them."""
    from .pipeline import open_pool
    from .report.build import build_report

    try:
        pool = open_pool(Path(run_dir))
    except (NoisyStudentError, OSError) as e:
        log.warning(f"report: no pseudo-label thumbnails ({e})")
        pool = None
    return build_report(Path(run_dir), pool=pool)


@dataclass
class Labeling:
    """What :func:`label_pool` made: the store, and whether this process speaks for the job
    (rank 0 under torchrun; every rank wrote its share of the store)."""

    store: Path
    rows: int
    is_main: bool


def label_pool(checkpoint: Path, source: str | Path, out: Path, *, shard_size: int,
               device: str = "auto", top_k: int, temperature: float, batch_size: int,
               num_workers: int | None = None, precision: str = "auto", progress: bool = True) -> Labeling:
    """Label a pool (what ``data.unlabeled`` accepts: a folder, a file list, tar shards) with a
    checkpoint, as the pipeline's label stage does (its clean transform, eval mode), into a
    resumable pseudo-label store at ``out``. Under torchrun every process labels its share. The store
    keeps the top-k probabilities; hard labels are chosen when selecting (``pseudo.hard``)."""
    from .data.pool import path_source
    from .label.inference import label_to_store
    from .models.checkpoint import clean_transform, load_model
    from .runtime.distributed import cleanup, init_distributed

    model, meta = load_model(Path(checkpoint))
    pool = path_source(source, shard_size)
    ctx = init_distributed(device)
    try:
        manifest = label_to_store(
            model, pool, Path(out), transform=clean_transform(meta), num_classes=meta["num_classes"],
            teacher=str(checkpoint), top_k=top_k, temperature=temperature, batch_size=batch_size,
            num_workers=num_workers, ctx=ctx, precision=precision, progress=progress)
    finally:
        cleanup(ctx)
    return Labeling(Path(out), manifest.num_rows, ctx.is_main)
