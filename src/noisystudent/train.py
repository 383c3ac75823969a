"""Stages 1 and 4: train a classifier on labeled images, optionally joined by pseudo-labeled ones.

One plain loop serves the teacher (labeled only) and the students (labeled + pseudo-labeled):
each step concatenates a labeled batch of B images with a pseudo-labeled batch of ratio x B
images and minimises the mean cross-entropy against soft targets over the whole batch (labeled
targets are one-hot with label smoothing). The epoch with the best validation top-1 is kept.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from .config import TrainConfig
from .distributed import DistContext
from .evaluate import evaluate_classifier
from .progress import progress_bar


@dataclass
class TrainOutcome:
    """What a training stage produced: the best-validation weights and how it got there."""

    state_dict: dict
    best_epoch: int
    best_val_top1: float
    epochs: int
    steps: int
    images_seen: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def _endless(loader: DataLoader, sampler) -> Iterator:
    """Cycle a loader forever, reshuffling every pass (DistributedSampler needs set_epoch)."""
    epoch = 0
    while True:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _loader(dataset: Dataset, batch_size: int, ctx: DistContext, seed: int, num_workers: int) -> Iterator:
    if ctx.distributed:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=seed, drop_last=False)
    else:
        sampler = RandomSampler(dataset, replacement=len(dataset) < batch_size,
                                num_samples=max(len(dataset), batch_size),
                                generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=num_workers, persistent_workers=num_workers > 0,
                        pin_memory=ctx.device.type == "cuda")
    return _endless(loader, sampler)


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off


def steps_per_epoch(num_labeled: int, num_pseudo: int, batch_size: int, ratio: float) -> int:
    """An epoch is one pass over the larger of the labeled and the pseudo-labeled streams."""
    steps = math.ceil(num_labeled / batch_size)
    if num_pseudo and ratio > 0:
        steps = max(steps, math.ceil(num_pseudo / max(1, round(batch_size * ratio))))
    return max(1, steps)


def train_classifier(model: nn.Module, labeled: Dataset, val: Dataset, cfg: TrainConfig, *,
                     num_classes: int, epochs: float, lr: float, ctx: DistContext,
                     pseudo: Dataset | None = None, seed: int = 0, num_workers: int = 0,
                     progress: bool = True, desc: str = "train",
                     on_epoch: Callable[[dict], None] | None = None) -> TrainOutcome:
    """Train ``model`` in place; returns the best-validation weights (the model ends holding them)."""
    device = ctx.device
    model.to(device)
    world = ctx.world_size
    use_pseudo = pseudo is not None and len(pseudo) > 0 and cfg.unlabeled_ratio > 0
    lab_bs = max(1, cfg.batch_size // world)
    unl_bs = max(1, round(cfg.batch_size * cfg.unlabeled_ratio) // world) if use_pseudo else 0
    per_epoch = steps_per_epoch(len(labeled), len(pseudo) if use_pseudo else 0, cfg.batch_size,
                                cfg.unlabeled_ratio)
    total_steps = max(1, math.ceil(epochs * per_epoch))
    num_epochs = math.ceil(total_steps / per_epoch)

    train_model = model
    if ctx.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = create_optimizer_v2(model, opt=cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    sched_kwargs = dict(decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate) if cfg.scheduler == "step" else {}
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.scheduler, num_epochs=num_epochs,
                                       warmup_epochs=int(cfg.warmup_epochs), step_on_epochs=False,
                                       updates_per_epoch=per_epoch, warmup_lr=lr * 0.01, min_lr=0.0,
                                       **sched_kwargs)
    loss_fn = SoftTargetCrossEntropy()
    lab_iter = _loader(labeled, lab_bs, ctx, seed, num_workers)
    unl_iter = _loader(pseudo, unl_bs, ctx, seed + 1, num_workers) if use_pseudo else None

    best = {"top1": -1.0, "epoch": -1, "state": copy.deepcopy(model.state_dict())}
    history: list[dict] = []
    start, seen, step = time.time(), 0, 0
    bar = progress_bar(range(total_steps), desc=desc, unit="step", enabled=progress and ctx.is_main)
    running = 0.0
    for step in bar:
        train_model.train()
        x, y = next(lab_iter)
        targets = smoothed_one_hot(y, num_classes, cfg.label_smoothing)
        if unl_iter is not None:
            xu, tu = next(unl_iter)
            x, targets = torch.cat([x, xu]), torch.cat([targets, tu.float()])
        x, targets = x.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        loss = loss_fn(train_model(x), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(num_updates=step + 1)
        seen += len(x) * world
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}", refresh=False)
        epoch_done = (step + 1) % per_epoch == 0 or step + 1 == total_steps
        epoch = (step + 1 + per_epoch - 1) // per_epoch
        if epoch_done and (epoch % cfg.eval_every == 0 or step + 1 == total_steps):
            metrics = evaluate_classifier(model, val, device, ctx=ctx)
            record = {"epoch": epoch, "step": step + 1, "loss": running, "val_top1": metrics["top1"],
                      "val_top5": metrics["top5"], "lr": optimizer.param_groups[0]["lr"],
                      "seconds": time.time() - start}
            history.append(record)
            if on_epoch:
                on_epoch(record)
            if metrics["top1"] > best["top1"]:
                best = {"top1": metrics["top1"], "epoch": epoch, "state": copy.deepcopy(model.state_dict())}
    model.load_state_dict(best["state"])
    return TrainOutcome(state_dict=best["state"], best_epoch=best["epoch"], best_val_top1=best["top1"],
                        epochs=num_epochs, steps=step + 1, images_seen=seen, seconds=time.time() - start,
                        history=history)
