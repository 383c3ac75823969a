"""The trainer's small parts: optimizer, schedule, EMA, precision choice, and the rank-0 buffers.

Each is built from the recipe's :class:`~noisystudent.config.schema.TrainConfig` by a factory of
a well-kept library (timm's optimizer, scheduler and EMA; torch's autocast and gradient scaler),
with the few settings the official code fixes differently written down here.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from ..config.schema import TrainConfig
from ..runtime.cpu import cpu_settings
from ..runtime.distributed import DistContext, broadcast_object, collective_failure
from ..runtime.precision import PrecisionCache, choose_train_precision, resolve_precision


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


class ExponentialMovingAverage(ModelEmaV3):
    """timm's ModelEmaV3 with the official code's decay schedule (TF's ExponentialMovingAverage
    with ``num_updates``): ``min(decay, (1 + step) / (10 + step))``, so the average of a short or
    young run is not dominated by the random initialisation."""

    def get_decay(self, step: int | None = None) -> float:
        return self.decay if step is None else min(self.decay, (1 + step) / (10 + step))


def grad_scaler(device: torch.device, enabled: bool):
    """Loss scaling for fp16; a pass-through otherwise (torch < 2.3 has only the CUDA class)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def cpu_copy(state: dict) -> dict:
    """A detached CPU copy of a state dict (the best epoch's weights outlive the training net)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def share_rank0_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics and counters), in place.

    Under DDP each rank updates its BatchNorm statistics from its own share of the batch, so
    after a step the ranks hold different buffers, and a rank evaluating its shard of the
    validation or test split measured a model nobody saves. Broadcasting rank 0's, rather than
    averaging all ranks', is what DDP itself does before every forward (``broadcast_buffers``),
    and it keeps the result a function of rank 0's state alone: rank 0's buffers are the ones
    checkpointed and saved, so a stage resumed from a checkpoint (all ranks then load rank 0's)
    evaluates exactly as an uninterrupted one, and one process (a no-op here) is unchanged.
    """
    if not ctx.distributed:
        return
    try:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
    except RuntimeError as e:
        raise (collective_failure(e, "share_rank0_buffers") or e) from None


class Precision:
    """The stage's precision: a resumed stage keeps the one it started with (so ``auto`` cannot
    flip between runs); otherwise :func:`~noisystudent.runtime.precision.choose_train_precision`
    on the first batch, every rank measuring (as they will train: side by side) and rank 0's
    choice applying to all. ``autocast()`` is the context a forward pass runs in."""

    def __init__(self, requested: str, resumed: str, net: nn.Module, batch: tuple | None, loss_fn,
                 ctx: DistContext, cache: PrecisionCache | None = None):
        self.name, self.dtype, self.info = self._choose(requested, resumed, net, batch, loss_fn, ctx, cache)
        self.device_type = ctx.device.type

    @staticmethod
    def _choose(requested, resumed, net, batch, loss_fn, ctx, cache):
        if resumed and (requested == "auto" or requested == resumed):
            dtype = resolve_precision(resumed, ctx.device)
            return resumed, dtype, {"requested": requested, "reason": "resumed: the precision the stage started with"}
        if batch is None:  # no step left to run
            return "fp32", None, {"requested": requested, "reason": "no training step"}
        name, dtype, info = choose_train_precision(requested, net, batch[0], batch[1], loss_fn, cache=cache)
        chosen = broadcast_object(name, ctx)
        if chosen != name:
            info = dict(info, chosen=chosen, reason=f"rank 0 chose {chosen} ({info['reason']} here)")
            name, dtype = chosen, resolve_precision(chosen, ctx.device)
        if ctx.device.type == "cpu":  # the rates depend on the threads: keep them with the choice
            info = dict(info, cpu=cpu_settings())
        return name, dtype, info

    def autocast(self):
        """The forward pass's context: autocast to the chosen dtype, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        """One line for the log: the reason, and the measured rates behind an automatic choice."""
        info = self.info
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


__all__ = ["build_optimizer", "build_scheduler", "ExponentialMovingAverage", "grad_scaler", "cpu_copy",
           "share_rank0_buffers", "Precision"]
