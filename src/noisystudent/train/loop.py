"""The trainer as one function call: :func:`train_classifier`, for scripts, benchmarks and tests.

The pipeline builds a :class:`~noisystudent.train.trainer.Recipe` from each resolved stage and runs
it with :class:`~noisystudent.train.trainer.Trainer`; this module keeps the older keyword form
(the run's ``train`` section plus epochs, lr and seed) and re-exports the loop's building blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch.nn as nn
from torch.utils.data import Dataset

from ..config.schema import TrainConfig
from ..runtime.distributed import DistContext
from ..runtime.precision import resolve_precision
from .components import build_optimizer, build_scheduler
from .state import TrainingPreempted
from .streams import SeededSamples, StreamSampler, smoothed_one_hot, steps_per_epoch
from .trainer import Hooks, Recipe, RunContext, Trainer, TrainOutcome

__all__ = ["TrainOutcome", "TrainingPreempted", "train_classifier", "resolve_precision", "build_optimizer",
           "build_scheduler", "StreamSampler", "SeededSamples", "steps_per_epoch", "smoothed_one_hot"]


def train_classifier(model: nn.Module, labeled: Dataset, val: Dataset, cfg: TrainConfig, *,
                     num_classes: int, epochs: float, lr: float, ctx: DistContext,
                     pseudo: Dataset | None = None, seed: int = 0, num_workers: int = 0,
                     progress: bool = True, desc: str = "train",
                     on_epoch: Callable[[dict], None] | None = None,
                     checkpoint_dir: Path | None = None, keep_best: bool = True) -> TrainOutcome:
    """``Trainer(Recipe(desc, num_classes, epochs, lr, cfg, seed, keep_best), RunContext(ctx,
    num_workers, progress, checkpoint_dir, on_epoch)).fit(model, labeled, val, pseudo)``: see
    :meth:`~noisystudent.train.trainer.Trainer.fit`."""
    recipe = Recipe(name=desc, num_classes=num_classes, epochs=epochs, lr=lr, train=cfg, seed=seed,
                    keep_best=keep_best)
    run = RunContext(ctx=ctx, num_workers=num_workers, progress=progress, checkpoint_dir=checkpoint_dir,
                     callbacks=[Hooks(on_epoch=on_epoch)] if on_epoch else [])
    return Trainer(recipe, run).fit(model, labeled, val, pseudo)
