"""The fix-res stage: fine-tune the last student at its test resolution with shallow blocks frozen.

Training at a lower resolution than the test resolution is cheaper, but the statistics the
network sees change with the resolution (Touvron et al., "Fixing the train-test resolution
discrepancy", NeurIPS 2019). The paper trains at the lower resolution, then fine-tunes for 1.5
epochs at the test resolution on un-augmented labeled images "with the shallow layers frozen".

What "frozen" means (the stem and the first ``n`` blocks keep their weights and BatchNorm
statistics, as the official code's ``fix_layer_num``) is :mod:`noisystudent.train.freeze`.

Default ``n`` (``frozen_blocks=None``): every block except those of the last stage, so the last
stage, the head (conv + BN) and the classifier are fine-tuned. Why: FixRes restricts the fine-tune
to the very last layers plus the BatchNorm before the global pooling; the official Noisy Student
code makes the count a flag (``fix_layer_num``) and publishes no value. Freezing up to the last
stage keeps FixRes's choice at the granularity of blocks while letting the deepest stage's BN
statistics re-adapt. Measured on Fashion-MNIST with a 3-block CNN (benchmarks/fixres_fashion.py),
freezing fewer blocks did better there; set ``finetune.frozen_blocks`` to choose.

The fine-tune itself is a :class:`~noisystudent.train.trainer.Recipe` run by the one
:class:`~noisystudent.train.trainer.Trainer` (:meth:`Recipe.of_stage` of the resolved fix-res
stage): the labeled images un-augmented at the test resolution, the fine-tune's own lr, epochs and
batch size, the settings of :func:`~noisystudent.config.stages.fixres_train_config`, the shallow
blocks frozen and the last weights kept. It has the same optimizer, mixed precision, deterministic
data order, DDP and resumable checkpoints as every other training stage. Only the trainable
parameters reach the optimizer (timm's parameter groups skip the others), and the frozen modules'
BatchNorm stays in eval mode through the loop's ``model.train()`` calls. :func:`finetune` adds
the before/after measurement at the test resolution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch.nn as nn
from torch.utils.data import Dataset

from ..config.schema import TrainConfig
from ..config.stages import fixres_train_config
from ..evaluate.classifier import evaluate_classifier
from ..runtime.distributed import DistContext
from ..runtime.errors import ConfigError
from .freeze import (BlockLayout, block_layout, default_frozen_blocks, freeze_shallow_blocks, frozen_module_names,
                     unfreeze)
from .streams import steps_per_epoch
from .trainer import Hooks, Recipe, RunContext, Trainer, TrainOutcome

__all__ = ["FinetuneOutcome", "finetune", "finetune_fixres", "fixres_train_config", "BlockLayout", "block_layout",
           "default_frozen_blocks", "freeze_shallow_blocks", "unfreeze"]


@dataclass
class FinetuneOutcome:
    """What the fix-res stage did, with top-1/top-5 before and after at the test resolution."""

    frozen: list[str]
    frozen_blocks: int
    total_blocks: int
    trainable_params: int
    frozen_params: int
    before: dict
    after: dict
    epochs: float
    steps: int
    images_seen: int
    lr: float
    seconds: float
    history: list[dict] = field(default_factory=list)
    train: TrainOutcome | None = None  # the training loop's outcome; None when epochs == 0

    def metrics(self) -> dict:
        """Flat numbers for metrics.json / the summary: ``val_top1_before``, ``test_top1_after``..."""
        out = {f"{k}_before": v for k, v in self.before.items()}
        out.update({f"{k}_after": v for k, v in self.after.items()})
        out.update(frozen_blocks=self.frozen_blocks, total_blocks=self.total_blocks,
                   trainable_params=self.trainable_params, frozen_params=self.frozen_params,
                   finetune_epochs=self.epochs, finetune_steps=self.steps, finetune_lr=self.lr,
                   images_seen=self.images_seen, seconds=self.seconds,
                   resumed_from_step=self.train.resumed_from_step if self.train else 0)
        return out


def _evaluate(model: nn.Module, val: Dataset, test: Dataset | None, ctx: DistContext) -> dict:
    out = {}
    for split, ds in (("val", val), ("test", test)):
        if ds is None:
            continue
        m = evaluate_classifier(model, ds, ctx.device, ctx=ctx)
        out[f"{split}_top1"], out[f"{split}_top5"] = m["top1"], m["top5"]
    return out


def finetune(trainer: Trainer, model: nn.Module, labeled: Dataset, val: Dataset,
             test: Dataset | None = None) -> FinetuneOutcome:
    """Run the fix-res ``trainer`` (a recipe with ``keep_best=False`` and frozen blocks) on
    ``model`` in place, with top-1/top-5 on ``val`` (and ``test``) measured before and after;
    ``labeled``/``val``/``test`` must yield images already transformed at the test resolution
    without augmentation. The model ends with the fine-tuned weights, unfrozen, in eval mode.
    ``recipe.epochs == 0`` trains nothing."""
    recipe, ctx = trainer.recipe, trainer.run.ctx
    model.to(ctx.device)
    layout = block_layout(model)
    frozen = frozen_module_names(model, recipe.frozen_blocks)
    inside = lambda name: any(name == f or name.startswith(f + ".") for f in frozen)  # noqa: E731
    n_train = sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and not inside(name))
    if n_train == 0:
        raise ConfigError("fix-res: every parameter is frozen; lower finetune.frozen_blocks")
    start = time.time()
    before = _evaluate(model, val, test, ctx)
    outcome, earlier, after = None, 0.0, dict(before)
    if recipe.epochs > 0:
        t0 = time.time()
        outcome = trainer.fit(model, labeled, val)
        earlier = max(0.0, outcome.seconds - (time.time() - t0))  # training time before a resume
        after = _evaluate(model, val, test, ctx)
    model.eval()
    per_epoch = steps_per_epoch(len(labeled), 0, recipe.train.batch_size, 0)
    steps = outcome.steps if outcome else 0
    return FinetuneOutcome(frozen=frozen, frozen_blocks=sum(1 for name in frozen if name in set(layout.blocks)),
                           total_blocks=layout.num_blocks, trainable_params=n_train,
                           frozen_params=sum(p.numel() for p in model.parameters()) - n_train, before=before,
                           after=after, epochs=steps / per_epoch, steps=steps,
                           images_seen=outcome.images_seen if outcome else 0, lr=recipe.lr,
                           seconds=time.time() - start + earlier,
                           history=outcome.history if outcome else [], train=outcome)


def finetune_fixres(model: nn.Module, labeled: Dataset, val: Dataset, cfg: TrainConfig, *, num_classes: int,
                    epochs: float, lr: float, ctx: DistContext, test: Dataset | None = None,
                    frozen_blocks: int | None = None, batch_size: int | None = None, seed: int = 0,
                    num_workers: int = 0, progress: bool = False, desc: str = "fixres",
                    on_epoch: Callable[[dict], None] | None = None,
                    checkpoint_dir: Path | None = None) -> FinetuneOutcome:
    """:func:`finetune` as one call, for scripts and benchmarks: the recipe is the run's ``train``
    section ``cfg`` with :func:`fixres_train_config` (``batch_size`` images per step, None:
    ``cfg.batch_size``), ``epochs`` passes over ``labeled`` at ``lr``, the stem and the first
    ``frozen_blocks`` blocks frozen (None: all but the last stage's)."""
    recipe = Recipe(name=desc, num_classes=num_classes, epochs=epochs, lr=lr,
                    train=fixres_train_config(cfg, batch_size), seed=seed, keep_best=False,
                    frozen_blocks=frozen_blocks)
    run = RunContext(ctx=ctx, num_workers=num_workers, progress=progress, checkpoint_dir=checkpoint_dir,
                     callbacks=[Hooks(on_epoch=on_epoch)] if on_epoch else [])
    return finetune(Trainer(recipe, run), model, labeled, val, test)
