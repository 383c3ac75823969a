"""The fix-res stage: fine-tune the last student at its test resolution with shallow blocks frozen.

Training at a lower resolution than the test resolution is cheaper, but the statistics the
network sees change with the resolution (Touvron et al., "Fixing the train-test resolution
discrepancy", NeurIPS 2019). The paper trains at the lower resolution, then fine-tunes for 1.5
epochs at the test resolution on un-augmented labeled images "with the shallow layers frozen".

What "frozen" means here follows the official code (google-research/noisystudent, flag
``fix_layer_num``): the first ``n`` blocks, counted one by one in network order (MBConv blocks
for EfficientNet, residual blocks for ``ns_cnn_*``, bottlenecks for ResNets), and the stem in
front of them keep their weights *and* their BatchNorm statistics (their BN runs in inference
mode, ``training and trainable`` in the official code); the later blocks, the head convolution
and BN, and the classifier train, their BN statistics adapting to the new resolution.

Default ``n`` (``frozen_blocks=None``): every block except those of the last stage, so the last
stage, the head (conv + BN) and the classifier are fine-tuned. Why: FixRes restricts the fine-tune
to the very last layers plus the BatchNorm before the global pooling; the official Noisy Student
code makes the count a flag (``fix_layer_num``) and publishes no value. Freezing up to the last
stage keeps FixRes's choice at the granularity of blocks while letting the deepest stage's BN
statistics re-adapt. Measured on Fashion-MNIST with a 3-block CNN (benchmarks/fixres_fashion.py),
freezing fewer blocks did better there; set ``finetune.frozen_blocks`` to choose.

The fine-tune itself is :func:`noisystudent.train.loop.train_classifier` on the labeled images
(un-augmented, at the test resolution), with the fine-tune's own lr, epochs and batch size: it
has the same optimizer, mixed precision, deterministic data order, DDP and resumable
checkpoints as every other training stage. Only the trainable parameters reach the optimizer
(timm's parameter groups skip the others), and the frozen modules' BatchNorm stays in eval mode
through the loop's ``model.train()`` calls.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch.nn as nn
from torch.utils.data import Dataset

from ..config.schema import TrainConfig
from ..evaluate.classifier import evaluate_classifier
from ..runtime.distributed import DistContext
from ..runtime.errors import ConfigError
from .loop import TrainOutcome, steps_per_epoch, train_classifier


# ------------------------------------------------------------------------------ blocks


@dataclass
class BlockLayout:
    """A network cut into stem, blocks (shallow to deep) and the stage of each block."""

    stem: list[str]
    blocks: list[str]
    stages: list[int]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def default_frozen(self) -> int:
        """Every block but those of the last stage."""
        last = self.stages[-1] if self.stages else 0
        return sum(1 for s in self.stages if s != last)


def _has_state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def _stem_before(model: nn.Module, first: str) -> list[str]:
    stem = []
    for name, child in model.named_children():
        if name == first:
            return stem
        if _has_state(child):
            stem.append(name)
    return stem


def block_layout(model: nn.Module) -> BlockLayout:
    """The blocks of timm EfficientNets/MobileNets (``model.blocks``: stages of blocks), of our
    ``ns_cnn_*`` (``model.blocks``: one flat sequence, stages from ``model.stage_depths``) and of
    ResNet-style models (``layer1``..``layerN``)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and len(blocks) > 0:
        if all(isinstance(s, nn.Sequential) for s in blocks):
            names = [f"blocks.{i}.{j}" for i, s in enumerate(blocks) for j in range(len(s))]
            stages = [i for i, s in enumerate(blocks) for _ in range(len(s))]
        else:
            names = [f"blocks.{i}" for i in range(len(blocks))]
            depths = list(getattr(model, "stage_depths", None) or [len(blocks)])
            if sum(depths) != len(blocks):
                depths = [len(blocks)]
            stages = [i for i, d in enumerate(depths) for _ in range(d)]
        return BlockLayout(stem=_stem_before(model, "blocks"), blocks=names, stages=stages)
    layers = []
    while isinstance(getattr(model, f"layer{len(layers) + 1}", None), nn.Sequential):
        layers.append(getattr(model, f"layer{len(layers) + 1}"))
    if layers:
        names = [f"layer{i + 1}.{j}" for i, s in enumerate(layers) for j in range(len(s))]
        stages = [i for i, s in enumerate(layers) for _ in range(len(s))]
        return BlockLayout(stem=_stem_before(model, "layer1"), blocks=names, stages=stages)
    raise ConfigError(f"fix-res: cannot find the blocks of {type(model).__name__} (supported: timm "
                      "EfficientNet/MobileNet-style `blocks`, ResNet-style `layer1..N`, ns_cnn_*); "
                      "set finetune.frozen_blocks=0 to fine-tune everything")


def default_frozen_blocks(model: nn.Module) -> int:
    """The default of ``frozen_blocks``: all blocks except the last stage's."""
    return block_layout(model).default_frozen


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def freeze_shallow_blocks(model: nn.Module, n: int | None) -> list[str]:
    """Freeze the stem and the first ``n`` blocks (``None``: :func:`default_frozen_blocks`).

    Frozen modules stop requiring gradients and stay in eval mode even when ``model.train()`` is
    called, so their BatchNorm statistics do not change either. ``n == 0`` freezes nothing.
    Returns the names of the frozen modules (stem first, then blocks, shallow to deep); undo
    with :func:`unfreeze`.
    """
    layout = block_layout(model)
    if n is None:
        n = layout.default_frozen
    if not 0 <= n <= layout.num_blocks:
        raise ConfigError(f"finetune.frozen_blocks={n}, but {model_name(model)} has "
                          f"{layout.num_blocks} blocks (0..{layout.num_blocks})")
    if n == 0:
        return []
    names = layout.stem + layout.blocks[:n]
    for name in names:
        m = model.get_submodule(name)
        for p in m.parameters():
            p.requires_grad_(False)
        m.train = functools.partial(_stay_in_eval, m)  # an instance attribute shadows Module.train
        m.eval()
    return names


def unfreeze(model: nn.Module, names: list[str]) -> None:
    """Undo :func:`freeze_shallow_blocks` (the caller's train/eval mode applies again)."""
    for name in names:
        m = model.get_submodule(name)
        if "train" in m.__dict__:
            del m.__dict__["train"]
        for p in m.parameters():
            p.requires_grad_(True)
    model.train(model.training)


def model_name(model: nn.Module) -> str:
    from ..models.factory import model_architecture

    return model_architecture(model)


# ------------------------------------------------------------------------------ the stage


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


def fixres_train_config(cfg: TrainConfig, batch_size: int | None = None) -> TrainConfig:
    """The training settings of the fine-tune: the run's optimizer, weight decay, label smoothing,
    precision and checkpointing, with its own batch size (None: ``cfg.batch_size``) and a short
    schedule of its own: cosine from the lr to 0 without warm-up, no EMA. ``sync_bn`` is off: it
    would replace the frozen BatchNorm layers by new ones that no longer stay in eval mode."""
    return dataclasses.replace(cfg, batch_size=batch_size or cfg.batch_size, scheduler="cosine",
                               warmup_epochs=0.0, ema=False, sync_bn=False)


def _evaluate(model: nn.Module, val: Dataset, test: Dataset | None, ctx: DistContext) -> dict:
    out = {}
    for split, ds in (("val", val), ("test", test)):
        if ds is None:
            continue
        m = evaluate_classifier(model, ds, ctx.device, ctx=ctx)
        out[f"{split}_top1"], out[f"{split}_top5"] = m["top1"], m["top5"]
    return out


def finetune_fixres(model: nn.Module, labeled: Dataset, val: Dataset, cfg: TrainConfig, *, num_classes: int,
                    epochs: float, lr: float, ctx: DistContext, test: Dataset | None = None,
                    frozen_blocks: int | None = None, batch_size: int | None = None, seed: int = 0,
                    num_workers: int = 0, progress: bool = False, desc: str = "fixres",
                    on_epoch: Callable[[dict], None] | None = None, checkpoint_dir: Path | None = None,
                    keep_frozen: bool = False) -> FinetuneOutcome:
    """Fine-tune ``model`` in place at the test resolution; ``labeled``/``val``/``test`` must yield
    images already transformed at that resolution without augmentation.

    The stem and the first ``frozen_blocks`` blocks are frozen (weights and BN statistics; see
    :func:`freeze_shallow_blocks`); the rest trains with :func:`train_classifier` for ``epochs``
    passes over ``labeled`` (fractions allowed) at learning rate ``lr``, with the settings of
    :func:`fixres_train_config` (``cfg``: the run's ``train`` section; ``batch_size`` images per
    step over all processes, None: ``cfg.batch_size``). The final weights are kept (no best-epoch
    selection: the validation split is what the before/after numbers are measured on).
    ``checkpoint_dir``: resumable checkpoints, as for any training stage; a killed fine-tune
    called again with the same model, data and settings continues from the latest one. Top-1 and
    top-5 on ``val`` (and ``test``) are measured before and after. The model ends with the
    fine-tuned weights, unfrozen unless ``keep_frozen``. ``epochs == 0`` trains nothing.
    """
    model.to(ctx.device)
    layout = block_layout(model)
    frozen = freeze_shallow_blocks(model, frozen_blocks)
    n_frozen = sum(1 for name in frozen if name in set(layout.blocks))
    train_cfg = fixres_train_config(cfg, batch_size)
    start = time.time()
    try:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if n_train == 0:
            raise ConfigError("fix-res: every parameter is frozen; lower finetune.frozen_blocks")
        n_all = sum(p.numel() for p in model.parameters())
        before = _evaluate(model, val, test, ctx)
        outcome, earlier = None, 0.0
        if epochs > 0:
            t0 = time.time()
            outcome = train_classifier(model, labeled, val, train_cfg, num_classes=num_classes, epochs=epochs,
                                       lr=lr, ctx=ctx, seed=seed, num_workers=num_workers, progress=progress,
                                       desc=desc, on_epoch=on_epoch, checkpoint_dir=checkpoint_dir,
                                       keep_best=False)
            earlier = max(0.0, outcome.seconds - (time.time() - t0))  # training time before a resume
            after = _evaluate(model, val, test, ctx)
        else:
            after = dict(before)
    finally:
        if not keep_frozen:
            unfreeze(model, frozen)
    model.eval()
    per_epoch = steps_per_epoch(len(labeled), 0, train_cfg.batch_size, 0)
    steps = outcome.steps if outcome else 0
    return FinetuneOutcome(frozen=frozen, frozen_blocks=n_frozen, total_blocks=layout.num_blocks,
                           trainable_params=n_train, frozen_params=n_all - n_train, before=before,
                           after=after, epochs=steps / per_epoch, steps=steps,
                           images_seen=outcome.images_seen if outcome else 0, lr=lr,
                           seconds=time.time() - start + earlier,
                           history=outcome.history if outcome else [], train=outcome)
