"""Stages 1 and 4: train a classifier on labeled images, optionally joined by pseudo-labeled ones.

One plain loop serves the teacher (labeled only) and the students (labeled + pseudo-labeled):
each step concatenates a labeled batch of B images with a pseudo-labeled batch of ratio x B
images and minimises the mean cross-entropy against soft targets over the whole batch (labeled
targets are one-hot with label smoothing). The epoch with the best validation top-1 is kept.

Many processes (``torchrun``): B and ratio x B are *global* batches. Each of the W processes
takes 1/W of both, DDP averages the gradients, so one step is the same update as one process
holding the whole batch. The data streams are defined globally (:class:`StreamSampler`): the
images of step k do not depend on W (their random augmentation does). Rank 0 alone logs and
writes checkpoints.

Crash safety (``checkpoint_dir``): a checkpoint every ``train.checkpoint_every`` steps and at the
end (see :mod:`noisystudent.train.state`); a stage finds its latest checkpoint and continues from
it. SIGTERM finishes the current step, writes a checkpoint and raises :class:`TrainingPreempted`.

Exact resume: on CPU, a resumed run ends with the same weights and metrics, bit for bit, as an
uninterrupted one with the same seed, number of processes and threads, for any ``num_workers``.
Two things make it so. Input noise: each batch's augmentation RNGs (Python ``random``, which
timm's RandAugment uses, NumPy, torch) are seeded from its position in the stream, in whichever
process loads it. Model noise (dropout, stochastic depth): the torch generators of each rank are
saved in the checkpoint. A dataset with its own private RNG is outside this guarantee, and CUDA
kernels are not bitwise deterministic, so on GPUs a resumed run is equivalent, not identical.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config.schema import TrainConfig
from ..runtime.distributed import (DistContext, all_gather_object, all_reduce_sum, any_rank, barrier, broadcast_object,
                          convert_sync_batchnorm, local_batch_size, wrap_ddp)
from ..runtime.errors import CheckpointError, ConfigError
from ..runtime.cpu import ThreadGovernor, cpu_settings
from ..runtime.precision import choose_train_precision, resolve_precision
from ..data.device_input import DeviceInput, host_view
from ..evaluate.classifier import evaluate_classifier
from ..runtime.progress import progress_bar
from .shuffle import FeistelPermutation
from .state import (CHECKPOINT_FORMAT, TrainingPreempted, capture_rng_state, catch_sigterm,
                          checkpoint_path, ignore_sigterm_in_worker, load_checkpoint_file,
                          load_latest_checkpoint, restore_rng_state, save_checkpoint)

__all__ = ["TrainOutcome", "TrainingPreempted", "train_classifier", "resolve_precision", "build_optimizer",
           "build_scheduler", "StreamSampler", "steps_per_epoch", "smoothed_one_hot"]

log = logging.getLogger("noisystudent")


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
    resumed_from_step: int = 0  # 0: started from scratch
    checkpoint: Path | None = None  # the last training checkpoint written or read
    precision: str = "fp32"  # what trained: fp32, bf16 or fp16 (train.precision auto resolved)
    precision_info: dict = field(default_factory=dict)  # why: requested, reason, measured img/s
    thread_changes: list[dict] = field(default_factory=list)  # CPU threads changed mid-stage (ThreadGovernor)


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with label smoothing: 1 - s on the label, plus s / K everywhere."""
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off


def steps_per_epoch(num_labeled: int, num_pseudo: int, batch_size: int, ratio: float) -> int:
    """An epoch is one pass over the larger of the labeled and the pseudo-labeled streams."""
    steps = math.ceil(num_labeled / batch_size)
    if num_pseudo and ratio > 0:
        steps = max(steps, math.ceil(num_pseudo / max(1, round(batch_size * ratio))))
    return max(1, steps)


# ------------------------------------------------------------------------------ data streams

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A well-spread 64-bit seed from a few integers (splitmix64), the same on every platform."""
    z = 0
    for v in values:
        z = (z + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z


class StreamSampler(Sampler):
    """This rank's share of an endless shuffled stream over a dataset of ``size`` items.

    The stream is a concatenation of permutations of ``range(size)``, one per pass, each keyed
    by ``(seed, pass)`` (:class:`~noisystudent.train.shuffle.FeistelPermutation`: no pool-sized array). Global batch k is stream positions ``[k G, (k+1) G)``; rank r takes
    the slice ``[k G + r b, k G + (r+1) b)`` with ``b = G / world_size``. So the union of the
    ranks' batches of step k is the same set of images for any number of processes, and starting
    at step k (a resume) is arithmetic: no image is loaded to get there. Yields
    ``(position, index)`` pairs for :class:`SeededSamples`.
    """

    def __init__(self, size: int, global_batch: int, ctx: DistContext, seed: int, start_step: int = 0):
        self.size, self.global_batch, self.seed, self.start_step = size, global_batch, seed, start_step
        self.local_batch = local_batch_size(global_batch, ctx)
        self.rank = ctx.rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        current_pass, order = -1, None
        step = self.start_step
        while True:
            first = step * self.global_batch + self.rank * self.local_batch
            positions = np.arange(first, first + self.local_batch, dtype=np.int64)
            passes, offsets = np.divmod(positions, self.size)
            indices = np.empty_like(offsets)
            for pass_ in np.unique(passes):  # a batch spans at most a few passes
                if pass_ != current_pass:  # each pass's order is keyed once; O(1) memory at any size
                    current_pass, order = pass_, FeistelPermutation(self.size, _mix(self.seed, 0, int(pass_)))
                mask = passes == pass_
                indices[mask] = order[offsets[mask]]
            yield from zip(positions.tolist(), indices.tolist())
            step += 1


class SeededSamples(Dataset):
    """Loads a batch of ``(position, index)`` items with the global RNGs (Python, NumPy, torch
    CPU) seeded from ``(seed, position of the batch's first item)``: a batch's augmentation
    depends on where it sits in the stream, not on which DataLoader worker loads it nor on what
    ran before, so a resumed run draws the same noise. The caller's RNG states are restored
    afterwards, so loading in the main process (``num_workers=0``) does not disturb the model's
    dropout. (Seeding once per batch, not per image: re-seeding three Mersenne twisters costs
    ~40 us, as much as augmenting a small image.)"""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            s = _mix(self.seed, 1, items[0][0])
            random.seed(s)
            np.random.seed(s >> 32)  # NumPy's legacy seed takes 32 bits
            torch.default_generator.manual_seed(s)  # CPU only: never touch CUDA generators here
            return [self.dataset[index] for _, index in items]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def _stream(dataset: Dataset, global_batch: int, ctx: DistContext, seed: int, start_step: int,
            num_workers: int, channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(model input, target)`` batches of this rank's share of ``dataset``, on the
    device, from global step ``start_step`` on. Workers return uint8 images (the dataset's
    :func:`~noisystudent.data.device_input.host_view`), pinned on CUDA; the device does the
    rest (:class:`~noisystudent.data.device_input.DeviceInput`). A dataset that can only be
    streamed (a WebDataset pool's selection) makes its own host batches."""
    view, transform = host_view(dataset)
    if hasattr(view, "stream"):
        host = view.stream(global_batch, ctx, seed, start_step, num_workers)
    else:
        sampler = StreamSampler(len(view), global_batch, ctx, seed, start_step)
        host = iter(DataLoader(SeededSamples(view, seed), batch_size=sampler.local_batch, sampler=sampler,
                               num_workers=num_workers, pin_memory=ctx.device.type == "cuda",
                               worker_init_fn=ignore_sigterm_in_worker if num_workers else None,
                               generator=torch.Generator()))  # its own: creating it must not draw from torch's RNG
    inp = DeviceInput(ctx.device, transform.normalize if transform else None, channels_last)
    return ((inp(x), y) for x, y in inp.batches(host))


# ------------------------------------------------------------------------------ building blocks


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory; no weight decay on biases and norm layers (as the official code).
    Only parameters that require gradients are optimized (timm's parameter groups skip the rest:
    the frozen blocks of fix-res).

    For ``rmsproptf`` (the paper's optimizer) the official epsilon 1e-3 is used; timm's default
    (1e-10) would make the first steps enormous where the squared-gradient average is tiny.
    """
    extra = {"eps": 1e-3} if cfg.optimizer.lower().endswith("rmsproptf") else {}
    return create_optimizer_v2(model, opt=cfg.optimizer, lr=lr, weight_decay=cfg.weight_decay,
                               momentum=cfg.momentum, **extra)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, lr: float, per_epoch: int,
                    total_steps: int):
    """timm's scheduler factory, stepped per update: cosine to 0 over the run, or the paper's
    staircase decay (x ``decay_rate`` every ``decay_epochs`` epochs), after linear warm-up."""
    extra = dict(decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate) if cfg.scheduler == "step" else {}
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.scheduler, num_epochs=total_steps / per_epoch,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=lr * 0.01, min_lr=0.0,
                                       step_on_epochs=False, updates_per_epoch=per_epoch, **extra)
    return scheduler


class _ExponentialMovingAverage(ModelEmaV3):
    """timm's ModelEmaV3 with the official code's decay schedule (TF's ExponentialMovingAverage
    with ``num_updates``): ``min(decay, (1 + step) / (10 + step))``, so the average of a short or
    young run is not dominated by the random initialisation."""

    def get_decay(self, step: int | None = None) -> float:
        return self.decay if step is None else min(self.decay, (1 + step) / (10 + step))


def _grad_scaler(device: torch.device, enabled: bool):
    """Loss scaling for fp16; a pass-through otherwise (torch < 2.3 has only the CUDA class)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


@dataclass
class _Progress:
    """What the loop has done so far; saved in every checkpoint."""

    step: int = 0
    seconds: float = 0.0  # training time spent before this process started (resumes)
    best_top1: float = -1.0
    best_epoch: int = -1
    best_state: dict = field(default_factory=dict)  # weights of the selected epoch, on the CPU
    history: list = field(default_factory=list)
    precision: str = ""  # the precision chosen when the stage started ("": not yet chosen)


# ------------------------------------------------------------------------------ checkpoints


def _save_checkpoint(directory: Path, setup: dict, parts: dict, progress: _Progress, running_loss: float,
                     keep: int, ctx: DistContext) -> Path:
    """Every rank contributes its RNG states and running loss; rank 0 writes. Returns the path."""
    ranks = all_gather_object({"rng": capture_rng_state(), "loss": running_loss}, ctx)
    path = checkpoint_path(directory, progress.step)
    if ctx.is_main:
        payload = {"format": CHECKPOINT_FORMAT, "setup": setup, "step": progress.step, "ranks": ranks,
                   "streams": {name: {"seed": s["seed"], "size": s["size"], "global_batch": s["global_batch"],
                                      "next_step": progress.step} for name, s in setup["streams"].items()},
                   "progress": dict(vars(progress)),
                   **{name: obj.state_dict() for name, obj in parts.items()}}
        save_checkpoint(directory, progress.step, payload, keep)
    barrier(ctx)  # nobody runs ahead (or exits, on SIGTERM) before the file is complete
    return path


def _resume(directory: Path | None, setup: dict, parts: dict,
            ctx: DistContext) -> tuple[_Progress, float, Path] | None:
    """Load the latest checkpoint of this stage into ``parts``; returns the loop's progress, this
    rank's running loss and the checkpoint's path, or None if there is no checkpoint."""
    found = load_latest_checkpoint(directory) if ctx.is_main else None
    path = broadcast_object(found[0] if found else None, ctx)  # every rank resumes from the same file
    if path is None:
        return None
    ckpt = found[1] if found else load_checkpoint_file(path)
    for key in setup:
        if ckpt["setup"].get(key) != setup[key]:
            raise CheckpointError(f"{path} belongs to another training setup ({key}: "
                                  f"{ckpt['setup'].get(key)!r} there, {setup[key]!r} now); delete "
                                  f"{Path(path).parent} to start this stage over")
    for name, obj in parts.items():
        obj.load_state_dict(ckpt[name])
    ranks = ckpt["ranks"]
    if len(ranks) == ctx.world_size:
        restore_rng_state(ranks[ctx.rank]["rng"])
    elif ctx.is_main:
        log.warning(f"{path} was written by {len(ranks)} process(es), this run has {ctx.world_size}: "
                    "the data order continues unchanged, but dropout masks differ from an uninterrupted run")
    loss = ranks[ctx.rank]["loss"] if len(ranks) == ctx.world_size else ranks[0]["loss"]
    return _Progress(**ckpt["progress"]), loss, Path(path)


# ------------------------------------------------------------------------------ the loop


def _choose_precision(requested: str, resumed: str, net: nn.Module, batch: tuple | None, loss_fn,
                      ctx: DistContext) -> tuple[str, torch.dtype | None, dict]:
    """The stage's precision: a resumed stage keeps the one it started with (so ``auto`` cannot
    flip between runs); otherwise :func:`choose_train_precision` on the first batch, every rank
    measuring (as they will train: side by side) and rank 0's choice applying to all."""
    if resumed and (requested == "auto" or requested == resumed):
        dtype = resolve_precision(resumed, ctx.device)
        return resumed, dtype, {"requested": requested, "reason": "resumed: the precision the stage started with"}
    if batch is None:  # no step left to run
        return "fp32", None, {"requested": requested, "reason": "no training step"}
    name, dtype, info = choose_train_precision(requested, net, batch[0], batch[1], loss_fn)
    chosen = broadcast_object(name, ctx)
    if chosen != name:
        info = dict(info, chosen=chosen, reason=f"rank 0 chose {chosen} ({info['reason']} here)")
        name, dtype = chosen, resolve_precision(chosen, ctx.device)
    if ctx.device.type == "cpu":  # the rates depend on the threads: keep them with the choice
        info = dict(info, cpu=cpu_settings())
    return name, dtype, info


def _describe_precision(info: dict) -> str:
    """One line for the log: the reason, and the measured rates behind an automatic choice."""
    text = f"{info['reason']}"
    if "fp32_img_s" in info:
        text += (f"; fp32 {info['fp32_img_s']:g} img/s, bf16 {info['bf16_img_s']:g} img/s"
                 f"{' (measured earlier in this process)' if info.get('cached') else ''}")
    if "cpu" in info:
        cpu = info["cpu"]
        others = cpu["configured"].get("threads", {}).get("others_busy_cores")
        text += (f"; {cpu['threads']} CPU thread(s)"
                 f"{f' (other processes kept {others:.1f} cores busy at start-up)' if others else ''}"
                 + "".join(f", {k}={v}" for k, v in cpu["env"].items()))
    return text


def train_classifier(model: nn.Module, labeled: Dataset, val: Dataset, cfg: TrainConfig, *,
                     num_classes: int, epochs: float, lr: float, ctx: DistContext,
                     pseudo: Dataset | None = None, seed: int = 0, num_workers: int = 0,
                     progress: bool = True, desc: str = "train",
                     on_epoch: Callable[[dict], None] | None = None,
                     checkpoint_dir: Path | None = None, keep_best: bool = True) -> TrainOutcome:
    """Train ``model`` in place; returns the best-validation weights (the model ends holding them).

    ``labeled`` yields ``(image, class index)``, ``pseudo`` yields ``(image, soft target)``.
    ``cfg.batch_size`` labeled and ``round(cfg.batch_size * cfg.unlabeled_ratio)`` pseudo-labeled
    images make one step, over all processes together (both must divide by the number of
    processes). With ``cfg.ema`` the EMA weights are evaluated and returned. ``on_epoch`` gets
    every evaluation record, on rank 0 only. ``checkpoint_dir``: where this stage's resumable
    checkpoints live (a folder that survives a crash); if it holds one, training continues from
    it. ``keep_best=False`` returns the final weights instead of the best-validation ones.
    Raises :class:`TrainingPreempted` after writing a checkpoint if SIGTERM arrives.
    """
    device = ctx.device
    use_pseudo = pseudo is not None and len(pseudo) > 0 and cfg.unlabeled_ratio > 0
    lab_batch = cfg.batch_size
    unl_batch = max(1, round(cfg.batch_size * cfg.unlabeled_ratio)) if use_pseudo else 0
    local_batch_size(lab_batch, ctx, "train.batch_size")
    if use_pseudo:
        local_batch_size(unl_batch, ctx, "train.batch_size x train.unlabeled_ratio")
    per_epoch = steps_per_epoch(len(labeled), len(pseudo) if use_pseudo else 0, lab_batch,
                                cfg.unlabeled_ratio)
    total_steps = max(1, math.ceil(epochs * per_epoch))
    num_epochs = math.ceil(total_steps / per_epoch)
    resolve_precision(cfg.precision, device)  # a precision this device cannot run fails before any work

    # The network that trains is the caller's model, or with sync_bn a copy whose BatchNorm layers
    # are synchronised (the caller's model keeps plain layers and receives the weights at the end).
    net = convert_sync_batchnorm(copy.deepcopy(model), ctx) if cfg.sync_bn and ctx.distributed else model
    net.to(device)
    if cfg.channels_last:
        net.to(memory_format=torch.channels_last)
    ema = _ExponentialMovingAverage(net, decay=cfg.ema_decay) if cfg.ema else None
    eval_net = ema.module if ema is not None else net
    optimizer = build_optimizer(net, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, lr, per_epoch, total_steps)
    scaler = _grad_scaler(device, enabled=cfg.precision == "fp16")
    train_net = wrap_ddp(torch.compile(net) if cfg.compile else net, ctx)
    loss_fn = SoftTargetCrossEntropy()
    # Ranks start from the caller's common seed; each draws its own dropout / drop-path masks.
    torch.manual_seed(_mix(seed, 2, ctx.rank))

    streams = {"labeled": {"seed": _mix(seed, 0), "size": len(labeled), "global_batch": lab_batch}}
    if use_pseudo:
        streams["pseudo"] = {"seed": _mix(seed, 1), "size": len(pseudo), "global_batch": unl_batch}
    # What must match for a checkpoint to continue this run (the number of processes may change).
    setup = {"stage": desc, "streams": streams, "total_steps": total_steps, "per_epoch": per_epoch,
             "num_classes": num_classes, "optimizer": cfg.optimizer, "ema": cfg.ema,
             "params": sum(p.numel() for p in net.parameters()),
             "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad)}  # fix-res freezes some
    parts = {"model": net, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    if ema is not None:
        parts["ema"] = ema
    state = _Progress(best_state=_cpu_copy(eval_net.state_dict()))
    resumed = _resume(checkpoint_dir, setup, parts, ctx) if checkpoint_dir is not None else None
    last_checkpoint, running_loss = None, 0.0
    if resumed is not None:
        state, running_loss, last_checkpoint = resumed
        if ctx.is_main:
            log.info(f"[{desc}] resuming from {last_checkpoint} (step {state.step}/{total_steps})")
    start_step = state.step

    # Each stream is copied to the device on its own (pinned, non-blocking) and joined there:
    # a joint batch concatenated on the CPU would be an unpinned copy, synchronous to send.
    lab_iter = _stream(labeled, lab_batch, ctx, streams["labeled"]["seed"], start_step, num_workers,
                       cfg.channels_last)
    unl_iter = (_stream(pseudo, unl_batch, ctx, streams["pseudo"]["seed"], start_step, num_workers,
                        cfg.channels_last) if use_pseudo else None)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(lab_iter)
        targets = smoothed_one_hot(y, num_classes, cfg.label_smoothing)
        if unl_iter is not None:
            xu, tu = next(unl_iter)
            x, targets = torch.cat([x, xu]), torch.cat([targets, tu.float()])  # cat keeps channels_last
        return x, targets

    # The first batch is loaded before the loop: `auto` measures the precision on it. (Loading
    # draws from no global RNG, see SeededSamples, so this changes nothing else.)
    first = next_batch() if start_step < total_steps else None
    precision, autocast_dtype, precision_info = _choose_precision(cfg.precision, state.precision, net, first,
                                                                  loss_fn, ctx)
    state.precision = precision
    if ctx.is_main and first is not None:
        log.info(f"[{desc}] precision {precision}: {_describe_precision(precision_info)}")
    autocast = (functools.partial(torch.autocast, device.type, dtype=autocast_dtype) if autocast_dtype
                else contextlib.nullcontext)
    # On a CPU, the thread count follows what other processes leave free (when it is ours to set).
    governor = ThreadGovernor(desc) if device.type == "cpu" else None
    running = torch.tensor(running_loss, device=device)
    started = time.time()
    bar = progress_bar(range(start_step, total_steps), desc=desc, unit="step",
                       enabled=progress and ctx.is_main)
    with catch_sigterm(enabled=checkpoint_dir is not None) as preemption:
        for step in bar:
            train_net.train()
            if governor is not None:
                governor.tick()
            (x, targets), first = first or next_batch(), None
            with autocast():
                logits = train_net(x)
            loss = loss_fn(logits.float(), targets)  # the mean over this rank's share; DDP averages ranks
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # the scaler is a pass-through unless fp16
            scaler.step(optimizer)
            scaler.update()
            scheduler.step_update(num_updates=step + 1)
            if ema is not None:
                ema.update(net, step=step + 1)
            # Kept on the device: reading it every step would stall the GPU queue.
            running = loss.detach() if step == 0 else 0.9 * running + 0.1 * loss.detach()
            state.step = done = step + 1

            epoch = math.ceil(done / per_epoch)
            if (done % per_epoch == 0 and epoch % cfg.eval_every == 0) or done == total_steps:
                metrics = evaluate_classifier(eval_net, val, device, ctx=ctx, num_workers=num_workers,
                                              channels_last=cfg.channels_last)
                # Ranks hold equal shares, so the mean of their running losses is the global one.
                loss_value = all_reduce_sum(running.detach().clone(), ctx).item() / ctx.world_size
                record = {"epoch": epoch, "step": done, "loss": loss_value, "val_top1": metrics["top1"],
                          "val_top5": metrics["top5"], "lr": optimizer.param_groups[0]["lr"],
                          "seconds": state.seconds + time.time() - started}
                state.history.append(record)
                if metrics["top1"] > state.best_top1 or not keep_best:
                    state.best_top1, state.best_epoch = metrics["top1"], epoch
                    state.best_state = _cpu_copy(eval_net.state_dict())
                if ctx.is_main:
                    log.info(f"[{desc}] epoch {epoch}/{num_epochs} step {done}/{total_steps} loss "
                             f"{record['loss']:.3f} val top-1 {record['val_top1']:.2f}")
                    if on_epoch:
                        on_epoch(record)
            if ctx.is_main and getattr(bar, "disable", True) is False and done % 10 == 0:
                bar.set_postfix(loss=f"{float(running):.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                                refresh=False)

            # All ranks must agree to stop at the same step, or the others would hang in DDP.
            stop = checkpoint_dir is not None and any_rank(preemption.requested, ctx)
            due = done == total_steps or (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0)
            if checkpoint_dir is not None and (due or stop):
                state.seconds, started = state.seconds + time.time() - started, time.time()
                last_checkpoint = _save_checkpoint(Path(checkpoint_dir), setup, parts, state, float(running),
                                                   cfg.keep_checkpoints, ctx)
            if stop:
                raise TrainingPreempted(
                    f"[{desc}] stopped by SIGTERM after step {done}/{total_steps}; checkpoint written to "
                    f"{last_checkpoint}; run again with --resume to continue from it", last_checkpoint)
    del lab_iter, unl_iter  # stop DataLoader workers now rather than at garbage collection

    model.load_state_dict(state.best_state)
    model.to(device)
    return TrainOutcome(state_dict=state.best_state, best_epoch=state.best_epoch,
                        best_val_top1=state.best_top1, epochs=num_epochs, steps=total_steps,
                        images_seen=total_steps * (lab_batch + unl_batch),
                        seconds=state.seconds + time.time() - started, history=state.history,
                        resumed_from_step=start_step, checkpoint=last_checkpoint, precision=precision,
                        precision_info=precision_info, thread_changes=governor.changes if governor else [])
