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
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from ..runtime.distributed import DistContext
from ..runtime.errors import ConfigError
from ..evaluate.classifier import evaluate_classifier
from ..runtime.progress import progress_bar


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

    def metrics(self) -> dict:
        """Flat numbers for metrics.json / the summary: ``val_top1_before``, ``test_top1_after``..."""
        out = {f"{k}_before": v for k, v in self.before.items()}
        out.update({f"{k}_after": v for k, v in self.after.items()})
        out.update(frozen_blocks=self.frozen_blocks, total_blocks=self.total_blocks,
                   trainable_params=self.trainable_params, frozen_params=self.frozen_params,
                   finetune_epochs=self.epochs, finetune_steps=self.steps, finetune_lr=self.lr,
                   images_seen=self.images_seen, seconds=self.seconds)
        return out


def _evaluate(model: nn.Module, val: Dataset, test: Dataset | None, ctx: DistContext) -> dict:
    out = {}
    for split, ds in (("val", val), ("test", test)):
        if ds is None:
            continue
        m = evaluate_classifier(model, ds, ctx.device, ctx=ctx)
        out[f"{split}_top1"], out[f"{split}_top5"] = m["top1"], m["top5"]
    return out


def _batches(dataset: Dataset, batch_size: int, ctx: DistContext, seed: int, num_workers: int):
    if ctx.distributed:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=seed, drop_last=False)
    else:
        sampler = RandomSampler(dataset, replacement=len(dataset) < batch_size,
                                num_samples=max(len(dataset), batch_size),
                                generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=num_workers, pin_memory=ctx.device.type == "cuda")
    epoch = 0
    while True:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def finetune_fixres(model: nn.Module, labeled: Dataset, val: Dataset, *, frozen_blocks: int | None = None,
                    epochs: float = 1.5, lr: float, batch_size: int, ctx: DistContext | None = None,
                    test: Dataset | None = None, optimizer: str = "sgd", momentum: float = 0.9,
                    weight_decay: float = 1e-5, label_smoothing: float = 0.1, seed: int = 0,
                    num_workers: int = 0, progress: bool = False, desc: str = "fix-res",
                    keep_frozen: bool = False) -> FinetuneOutcome:
    """Fine-tune ``model`` in place at the test resolution; ``labeled``/``val``/``test`` must yield
    images already transformed at that resolution without augmentation.

    The stem and the first ``frozen_blocks`` blocks are frozen (weights and BN statistics; see
    :func:`freeze_shallow_blocks`), the rest trains for ``epochs`` passes over ``labeled``
    (``batch_size`` images per step, over all processes) with cross-entropy and label smoothing,
    learning rate ``lr`` decayed to 0 by a cosine. Top-1/top-5 on ``val`` (and ``test``) are
    measured before and after. The model ends with the fine-tuned weights, unfrozen unless
    ``keep_frozen``.
    """
    ctx = ctx or DistContext(device=next(model.parameters()).device)
    device = ctx.device
    model.to(device)
    layout = block_layout(model)
    frozen = freeze_shallow_blocks(model, frozen_blocks)
    n_frozen = sum(1 for name in frozen if name in set(layout.blocks))
    start = time.time()
    try:
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("fix-res: every parameter is frozen; lower finetune.frozen_blocks")
        n_train = sum(p.numel() for p in trainable)
        n_all = sum(p.numel() for p in model.parameters())
        before = _evaluate(model, val, test, ctx)

        world = ctx.world_size
        per_rank = max(1, batch_size // world)
        per_epoch = max(1, math.ceil(len(labeled) / batch_size))
        total = math.ceil(epochs * per_epoch) if epochs > 0 else 0
        train_model: nn.Module = model
        if ctx.distributed and total:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = create_optimizer_v2(model, opt=optimizer, lr=lr, weight_decay=weight_decay, momentum=momentum)
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
        batches = _batches(labeled, per_rank, ctx, seed, num_workers) if total else None
        history: list[dict] = []
        running, seen = 0.0, 0
        bar = progress_bar(range(total), desc=desc, unit="step", enabled=progress and ctx.is_main)
        for step in bar:
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))  # cosine from lr to 0
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * scale
            train_model.train()  # frozen modules stay in eval mode (see freeze_shallow_blocks)
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
            loss = F.cross_entropy(train_model(x), y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(x) * world
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            if (step + 1) % per_epoch == 0 or step + 1 == total:
                history.append({"epoch": (step + 1) / per_epoch, "step": step + 1, "loss": running,
                                "lr": opt.param_groups[0]["lr"], "seconds": time.time() - start})
        model.eval()
        after = _evaluate(model, val, test, ctx)
    finally:
        if not keep_frozen:
            unfreeze(model, frozen)
    return FinetuneOutcome(frozen=frozen, frozen_blocks=n_frozen, total_blocks=layout.num_blocks,
                           trainable_params=n_train, frozen_params=n_all - n_train, before=before,
                           after=after, epochs=total / per_epoch, steps=total, images_seen=seen, lr=lr,
                           seconds=time.time() - start, history=history)


def fixres_enabled(enabled: bool | None, train_size: int, test_size: int | None) -> bool:
    """``finetune.enabled``: explicit, or (null) on when the test resolution exceeds the train one."""
    if enabled is not None:
        return enabled
    return test_size is not None and test_size > train_size
