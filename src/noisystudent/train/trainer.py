"""The trainer: one loop for the teacher, the students, the baseline and the fix-res fine-tune.

What to train (:class:`Recipe`: epochs, lr, optimizer, schedule, batch sizes, unlabeled ratio,
precision, EMA, label smoothing, patience, frozen blocks, which epoch to keep) is apart from where
and how it runs (:class:`RunContext`: ranks and device, DataLoader workers, progress bar,
checkpoint folder, callbacks). :meth:`Trainer.fit` reads as the loop; its parts are small
components: the data (:class:`~noisystudent.train.streams.JointBatches`), the checkpoints
(:class:`~noisystudent.train.checkpointer.Checkpointer`), the precision
(:class:`~noisystudent.train.components.Precision`) and evaluation (:meth:`_Fit.evaluate`).

Each step concatenates a labeled batch of B images with a pseudo-labeled batch of ratio x B
images and minimises the mean cross-entropy against soft targets over the whole batch (labeled
targets are one-hot with label smoothing). The epoch with the best validation top-1 is kept
(``keep_best``; fix-res keeps the last). With ``patience`` a stage stops when validation top-1 has
not improved for that many evaluations in a row; ``epochs`` stays the cap and the learning-rate
schedule spans the cap. The decision is read from the evaluation history, which every rank holds
identically and every checkpoint saves, so all ranks stop at the same step and a resumed stage
stops where an uninterrupted one does.

Many processes (``torchrun``): B and ratio x B are *global* batches; each of the W processes takes
1/W of both and DDP averages the gradients, so a step is the same update as one process holding
the whole batch. Before every evaluation all ranks take rank 0's buffers (BatchNorm statistics),
so the reported numbers are those of the model rank 0 saves. Rank 0 alone logs, calls the
callbacks and writes checkpoints.

Crash safety (``checkpoint_dir``): a checkpoint every ``checkpoint_every`` steps and at the end;
a stage finds its latest checkpoint and continues from it. SIGTERM finishes the current step,
writes a checkpoint and raises :class:`~noisystudent.train.state.TrainingPreempted`.

Exact resume: on CPU, a resumed run ends with the same weights and metrics, bit for bit, as an
uninterrupted one with the same seed, number of processes and threads, for any ``num_workers``.
Input noise: each batch's augmentation RNGs are seeded from its position in the stream
(:mod:`noisystudent.train.streams`). Model noise (dropout, stochastic depth): the torch generators
of each rank are saved in the checkpoint. A dataset with its own private RNG is outside this
guarantee, and CUDA kernels are not bitwise deterministic, so on GPUs a resumed run is
equivalent, not identical.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import Dataset

from ..config.schema import TrainConfig
from ..config.stages import ResolvedStage, epochs_key
from ..data.device_input import EvalCache
from ..evaluate.classifier import evaluate_classifier
from ..runtime.cpu import ThreadGovernor
from ..runtime.distributed import (DistContext, all_reduce_sum, any_rank, convert_sync_batchnorm,
                                   local_batch_size, wrap_ddp)
from ..runtime.errors import ConfigError
from ..runtime.precision import PrecisionCache, resolve_precision
from ..runtime.progress import progress_bar
from .checkpointer import Checkpointer, Progress
from .components import (ExponentialMovingAverage, Precision, build_optimizer, build_scheduler, cpu_copy,
                         grad_scaler, share_rank0_buffers)
from .freeze import freeze_shallow_blocks, unfreeze
from .state import TrainingPreempted, catch_sigterm
from .streams import JointBatches, mix_seed, steps_per_epoch

log = logging.getLogger("noisystudent")
# Below this many optimizer steps a stage learns little (a digits student of 3 passes over a small
# pseudo-labeled set took 9 steps and stayed at chance); the user is told, not refused.
FEW_STEPS = 100


# ------------------------------------------------------------------------------ what and where


@dataclass(frozen=True)
class Recipe:
    """What to train: everything that changes the weights a stage ends with.

    ``train`` holds the optimizer, schedule, global batch size, unlabeled ratio, precision, EMA,
    label smoothing, patience and checkpoint cadence (a stage's resolved ``train`` section).
    ``epochs`` is the length (the cap, with ``train.patience``), ``lr`` the peak learning rate.
    ``keep_best``: return the best-validation epoch's weights (False: the last, as fix-res).
    ``frozen_blocks``: the stem and the first n blocks keep their weights and BatchNorm
    statistics (None: all but the last stage's, the fix-res default; 0: nothing frozen).
    """

    name: str  # the stage: in log lines, and in the checkpoint's setup
    num_classes: int
    epochs: float
    lr: float
    train: TrainConfig
    seed: int = 0
    keep_best: bool = True
    frozen_blocks: int | None = 0
    epochs_key: str = "train.epochs"  # the config key a user raises to train longer (named in warnings)

    @classmethod
    def of_stage(cls, stage: ResolvedStage, num_classes: int) -> "Recipe":
        """The recipe of a :class:`~noisystudent.config.stages.ResolvedStage` (its ``train``
        section, epochs, lr and seed); the fix-res stage keeps its last weights and freezes its
        shallow blocks."""
        if stage.train is None:
            raise ConfigError(f"stage {stage.name} has no resolved training settings")
        fixres = stage.role == "fixres"
        return cls(name=stage.name, num_classes=num_classes, epochs=stage.epochs, lr=stage.lr, train=stage.train,
                   seed=stage.seed, keep_best=not fixres, frozen_blocks=stage.frozen_blocks if fixres else 0,
                   epochs_key=epochs_key(stage))


@dataclass
class Hooks:
    """Plain functions as a callback: ``Hooks(on_epoch=history.add)``."""

    on_epoch: Callable[[dict], None] | None = None
    on_step: Callable[[dict], None] | None = None


@dataclass
class RunContext:
    """Where and how a recipe runs; nothing here changes the weights.

    ``callbacks``: objects with an ``on_epoch(record)`` and/or ``on_step(record)`` method, called
    on rank 0 only. ``on_epoch`` gets every evaluation record (epoch, step, loss, val_top1,
    val_top5, lr, seconds); ``on_step``, every ``step_every`` steps, ``{step, epoch, loss, lr,
    img_s, seconds}`` (loss: rank 0's smoothed training loss; img_s: images per second over all
    ranks since the last call). ``checkpoint_dir``: where the stage's resumable checkpoints live
    (None: no checkpoints, no SIGTERM handling). ``eval_cache`` keeps the validation set on the
    device after its first pass; ``precision_cache`` keeps ``auto``'s measurements: each stage gets
    its own unless the caller shares one (the pipeline shares both across a run's stages).
    """

    ctx: DistContext = field(default_factory=DistContext)
    num_workers: int = 0
    progress: bool = True
    checkpoint_dir: Path | None = None
    callbacks: list[Any] = field(default_factory=list)
    step_every: int = 10
    eval_cache: EvalCache = field(default_factory=EvalCache)
    precision_cache: PrecisionCache = field(default_factory=PrecisionCache)


@dataclass
class TrainOutcome:
    """What a training stage produced: the selected weights and how it got there."""

    state_dict: dict
    best_epoch: int
    best_val_top1: float
    epochs: int  # epochs trained (the cap unless stopped early)
    steps: int  # steps trained
    images_seen: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    resumed_from_step: int = 0  # 0: started from scratch
    checkpoint: Path | None = None  # the last training checkpoint written or read
    precision: str = "fp32"  # what trained: fp32, bf16 or fp16 (train.precision auto resolved)
    precision_info: dict = field(default_factory=dict)  # why: requested, reason, measured img/s
    thread_changes: list[dict] = field(default_factory=list)  # CPU threads changed mid-stage (ThreadGovernor)
    stopped_early: bool = False  # train.patience ended the stage before its epochs
    stopped_at_epoch: int | None = None  # the epoch it stopped after (None: ran to the cap)
    frozen: list[str] = field(default_factory=list)  # modules kept frozen (fix-res)
    trainable_params: int = 0


def evaluations_without_improvement(history: list[dict]) -> int:
    """Evaluations since validation top-1 last improved (0: the latest is the best so far)."""
    scores = [r["val_top1"] for r in history]
    return len(scores) - 1 - scores.index(max(scores)) if scores else 0


def patience_exhausted(history: list[dict], patience: int | None) -> bool:
    """Early stopping: ``patience`` evaluations in a row without a better validation top-1."""
    return patience is not None and bool(history) and evaluations_without_improvement(history) >= patience


# ------------------------------------------------------------------------------ the trainer


class Trainer:
    """Runs a :class:`Recipe` in a :class:`RunContext`: ``Trainer(recipe, run).fit(model, labeled, val)``."""

    def __init__(self, recipe: Recipe, run: RunContext | None = None):
        self.recipe, self.run = recipe, run or RunContext()

    def fit(self, model: nn.Module, labeled: Dataset, val: Dataset, pseudo: Dataset | None = None) -> TrainOutcome:
        """Train ``model`` in place; returns the selected weights (the model ends holding them).

        ``labeled`` yields ``(image, class index)``, ``pseudo`` yields ``(image, soft target)``.
        ``train.batch_size`` labeled and ``round(batch_size x unlabeled_ratio)`` pseudo-labeled
        images make one step, over all processes together (both must divide by the number of
        processes). With ``train.ema`` the EMA weights are evaluated and returned. If the
        checkpoint folder holds a checkpoint of this setup, training continues from it. Raises
        :class:`TrainingPreempted` after writing a checkpoint if SIGTERM arrives.
        """
        frozen = self._freeze(model)
        try:
            fit = _Fit(self.recipe, self.run, model, labeled, val, pseudo)
            fit.start()
            fit.loop()
            return fit.finish(frozen)
        finally:
            if frozen:
                unfreeze(model, frozen)

    def _freeze(self, model: nn.Module) -> list[str]:
        """The recipe's frozen blocks (before the optimizer is built: it takes trainable parameters only)."""
        if self.recipe.frozen_blocks == 0:
            return []
        model.to(self.run.ctx.device)
        frozen = freeze_shallow_blocks(model, self.recipe.frozen_blocks)
        if not any(p.requires_grad for p in model.parameters()):
            unfreeze(model, frozen)
            raise ConfigError("fix-res: every parameter is frozen; lower finetune.frozen_blocks")
        return frozen


@dataclass
class _Plan:
    """The stage's length and batches, worked out from the recipe and the data sizes."""

    lab_batch: int
    unl_batch: int  # 0: no pseudo-labeled images
    per_epoch: int
    total_steps: int

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.per_epoch)

    @classmethod
    def of(cls, recipe: Recipe, labeled: Dataset, pseudo: Dataset | None, ctx: DistContext) -> "_Plan":
        cfg = recipe.train
        use_pseudo = pseudo is not None and len(pseudo) > 0 and cfg.unlabeled_ratio > 0
        lab_batch = cfg.batch_size
        unl_batch = max(1, round(cfg.batch_size * cfg.unlabeled_ratio)) if use_pseudo else 0
        local_batch_size(lab_batch, ctx, "train.batch_size")
        if use_pseudo:
            local_batch_size(unl_batch, ctx, "train.batch_size x train.unlabeled_ratio")
        per_epoch = steps_per_epoch(len(labeled), len(pseudo) if use_pseudo else 0, lab_batch, cfg.unlabeled_ratio)
        return cls(lab_batch, unl_batch, per_epoch, max(1, math.ceil(recipe.epochs * per_epoch)))


class _Fit:
    """One call of :meth:`Trainer.fit`: the parts it builds and the loop's state."""

    def __init__(self, recipe: Recipe, run: RunContext, model: nn.Module, labeled: Dataset, val: Dataset,
                 pseudo: Dataset | None):
        self.recipe, self.run, self.cfg, self.ctx = recipe, run, recipe.train, run.ctx
        self.model, self.labeled, self.val, self.pseudo = model, labeled, val, pseudo
        self.plan = _Plan.of(recipe, labeled, pseudo, self.ctx)
        resolve_precision(self.cfg.precision, self.ctx.device)  # a precision this device cannot run fails first
        self._build_parts()
        # Ranks start from the caller's common seed; each draws its own dropout / drop-path masks.
        torch.manual_seed(mix_seed(recipe.seed, 2, self.ctx.rank))
        self.checkpointer = Checkpointer(run.checkpoint_dir, self._setup(), self._saved_parts(),
                                         self.cfg.keep_checkpoints, self.ctx)

    def _build_parts(self) -> None:
        cfg, ctx, model = self.cfg, self.ctx, self.model
        # The network that trains is the caller's model, or with sync_bn a copy whose BatchNorm layers
        # are synchronised (the caller's model keeps plain layers and receives the weights at the end).
        self.net = net = convert_sync_batchnorm(copy.deepcopy(model), ctx) if cfg.sync_bn and ctx.distributed else model
        net.to(ctx.device)
        if cfg.channels_last:
            net.to(memory_format=torch.channels_last)
        self.ema = ExponentialMovingAverage(net, decay=cfg.ema_decay) if cfg.ema else None
        self.eval_net = self.ema.module if self.ema is not None else net
        self.optimizer = build_optimizer(net, cfg, self.recipe.lr)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.recipe.lr, self.plan.per_epoch,
                                         self.plan.total_steps)
        self.scaler = grad_scaler(ctx.device, enabled=cfg.precision == "fp16")
        self.train_net = wrap_ddp(torch.compile(net) if cfg.compile else net, ctx)
        self.loss_fn = SoftTargetCrossEntropy()

    def _setup(self) -> dict:
        """What must match for a checkpoint to continue this run (the number of processes may change)."""
        seed, plan, net = self.recipe.seed, self.plan, self.net
        self.streams = {"labeled": {"seed": mix_seed(seed, 0), "size": len(self.labeled),
                                    "global_batch": plan.lab_batch}}
        if plan.unl_batch:
            self.streams["pseudo"] = {"seed": mix_seed(seed, 1), "size": len(self.pseudo),
                                      "global_batch": plan.unl_batch}
        return {"stage": self.recipe.name, "streams": self.streams, "total_steps": plan.total_steps,
                "per_epoch": plan.per_epoch, "num_classes": self.recipe.num_classes,
                "optimizer": self.cfg.optimizer, "ema": self.cfg.ema,
                "params": sum(p.numel() for p in net.parameters()),
                "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad)}  # fix-res freezes some

    def _saved_parts(self) -> dict:
        parts = {"model": self.net, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}
        if self.ema is not None:
            parts["ema"] = self.ema
        return parts

    # -------------------------------------------------------------------------- before the loop

    def start(self) -> None:
        """Resume (or start), open the data streams, choose the precision."""
        ctx, name = self.ctx, self.recipe.name
        self.progress, running_loss = Progress(best_state=cpu_copy(self.eval_net.state_dict())), 0.0
        resumed = self.checkpointer.resume()
        if resumed is not None:
            self.progress, running_loss = resumed.progress, resumed.running_loss
            if ctx.is_main:
                log.info(f"[{name}] resuming from {resumed.path} (step {self.progress.step}/{self.plan.total_steps})")
        self.start_step = self.progress.step
        if ctx.is_main and resumed is None and self.plan.total_steps < FEW_STEPS:
            log.warning(f"[{name}] only {self.plan.total_steps} optimizer steps ({self.recipe.epochs:g} passes of "
                        f"{self.plan.per_epoch} steps over {self._images()}): too few to learn much; raise "
                        f"{self.recipe.epochs_key}")
        self.batches = JointBatches(self.labeled, self.pseudo, self.streams, ctx, self.start_step,
                                    self.run.num_workers, self.cfg.channels_last, self.recipe.num_classes,
                                    self.cfg.label_smoothing)
        # The first batch is loaded before the loop: `auto` measures the precision on it. (Loading
        # draws from no global RNG, see SeededSamples, so this changes nothing else.)
        self.first = next(self.batches) if self.steps_left() else None
        self.precision = Precision(self.cfg.precision, self.progress.precision, self.net, self.first, self.loss_fn,
                                   ctx, cache=self.run.precision_cache)
        self.progress.precision = self.precision.name
        if ctx.is_main and self.first is not None:
            log.info(f"[{name}] precision {self.precision.name}: {self.precision.describe()}")
        # On a CPU, the thread count follows what other processes leave free (when it is ours to set).
        self.governor = ThreadGovernor(name) if ctx.device.type == "cpu" else None
        self.running = torch.tensor(running_loss, device=ctx.device)

    def _images(self) -> str:
        pseudo = f" + {len(self.pseudo)} pseudo-labeled" if self.plan.unl_batch else ""
        return f"{len(self.labeled)} labeled{pseudo} images"

    def steps_left(self) -> bool:
        return self.progress.step < self.plan.total_steps and not self.stopped_early()

    def stopped_early(self) -> bool:
        return patience_exhausted(self.progress.history, self.cfg.patience)

    # -------------------------------------------------------------------------- the loop

    def loop(self) -> None:
        """Step, evaluate at epoch ends, checkpoint, until the cap, early stopping or SIGTERM."""
        self.started = self.last_report = self.epoch_started = time.time()
        steps = range(self.start_step, self.plan.total_steps if self.steps_left() else self.start_step)
        self.bar = progress_bar(steps, desc=self.recipe.name, unit="step", enabled=self.run.progress and self.ctx.is_main)
        with catch_sigterm(enabled=self.checkpointer.enabled) as preemption:
            for step in self.bar:
                self.train_step(step)
                self.progress.step = done = step + 1
                epoch = math.ceil(done / self.plan.per_epoch)
                if (done % self.plan.per_epoch == 0 and epoch % self.cfg.eval_every == 0) or done == self.plan.total_steps:
                    self.evaluate(epoch, done)
                self.report_step(done)
                stop_early = self.stopped_early()
                # All ranks must agree to stop at the same step, or the others would hang in DDP.
                # (Early stopping needs no vote: every rank holds the same history.)
                preempted = self.checkpointer.enabled and any_rank(preemption.requested, self.ctx)
                due = (done == self.plan.total_steps or stop_early
                       or (self.cfg.checkpoint_every > 0 and done % self.cfg.checkpoint_every == 0))
                if self.checkpointer.enabled and (due or preempted):
                    self.progress.seconds, self.started = self.progress.seconds + time.time() - self.started, time.time()
                    self.checkpointer.save(self.progress, float(self.running))
                if preempted:
                    raise TrainingPreempted(
                        f"[{self.recipe.name}] stopped by SIGTERM after step {done}/{self.plan.total_steps}; checkpoint "
                        f"written to {self.checkpointer.last}; run again with --resume to continue from it",
                        self.checkpointer.last)
                if stop_early:
                    if self.ctx.is_main:
                        log.info(f"[{self.recipe.name}] early stop after epoch {epoch}: validation top-1 has not "
                                 f"improved for {self.cfg.patience} evaluation(s)")
                    break
        self.batches.close()

    def train_step(self, step: int) -> None:
        """One optimizer update on the next joint batch."""
        self.train_net.train()
        if self.governor is not None:
            self.governor.tick()
        (x, targets), self.first = self.first or next(self.batches), None
        with self.precision.autocast():
            logits = self.train_net(x)
        loss = self.loss_fn(logits.float(), targets)  # the mean over this rank's share; DDP averages ranks
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # the scaler is a pass-through unless fp16
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step_update(num_updates=step + 1)
        if self.ema is not None:
            self.ema.update(self.net, step=step + 1)
        # Kept on the device: reading it every step would stall the GPU queue.
        self.running = loss.detach() if step == 0 else 0.9 * self.running + 0.1 * loss.detach()

    def evaluate(self, epoch: int, done: int) -> None:
        """Validation top-1/top-5 of the evaluated weights (EMA or live), on rank 0's buffers;
        keeps the selected epoch's weights and tells the callbacks."""
        val_started = time.time()  # the epoch's training ends here (train_seconds, val_seconds)
        share_rank0_buffers(self.eval_net, self.ctx)
        metrics = evaluate_classifier(self.eval_net, self.val, self.ctx.device, ctx=self.ctx,
                                      num_workers=self.run.num_workers, channels_last=self.cfg.channels_last,
                                      cache=self.run.eval_cache)
        # Ranks hold equal shares, so the mean of their running losses is the global one.
        loss_value = all_reduce_sum(self.running.detach().clone(), self.ctx).item() / self.ctx.world_size
        state = self.progress
        record = {"epoch": epoch, "step": done, "loss": loss_value, "val_top1": metrics["top1"],
                  "val_top5": metrics["top5"], "lr": self.optimizer.param_groups[0]["lr"],
                  "seconds": state.seconds + time.time() - self.started,
                  "train_seconds": val_started - self.epoch_started, "val_seconds": time.time() - val_started}
        self.epoch_started = time.time()
        state.history.append(record)
        if metrics["top1"] > state.best_top1 or not self.recipe.keep_best:
            state.best_top1, state.best_epoch = metrics["top1"], epoch
            state.best_state = cpu_copy(self.eval_net.state_dict())
        if self.ctx.is_main:
            log.info(f"[{self.recipe.name}] epoch {epoch}/{self.plan.num_epochs} step {done}/{self.plan.total_steps} "
                     f"loss {record['loss']:.3f} val top-1 {record['val_top1']:.2f}")
            self._call("on_epoch", record)

    def report_step(self, done: int) -> None:
        """The progress bar's postfix and the ``on_step`` callbacks (rank 0, every few steps)."""
        if not self.ctx.is_main:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        if getattr(self.bar, "disable", True) is False and done % 10 == 0:
            self.bar.set_postfix(loss=f"{float(self.running):.3f}", lr=f"{lr:.3g}", refresh=False)
        wants = any(callable(getattr(cb, "on_step", None)) for cb in self.run.callbacks)
        if wants and done % max(1, self.run.step_every) == 0:
            now = time.time()
            images = min(self.run.step_every, done - self.start_step) * (self.plan.lab_batch + self.plan.unl_batch)
            self._call("on_step", {"step": done, "epoch": done / self.plan.per_epoch, "loss": float(self.running),
                                   "lr": lr, "img_s": images / max(now - self.last_report, 1e-9),
                                   "seconds": self.progress.seconds + now - self.started})
            self.last_report = now

    def _call(self, hook: str, record: dict) -> None:
        for cb in self.run.callbacks:
            fn = getattr(cb, hook, None)
            if callable(fn):
                fn(record)

    # -------------------------------------------------------------------------- after the loop

    def finish(self, frozen: list[str]) -> TrainOutcome:
        """Load the selected weights into the caller's model and describe the stage."""
        state, plan = self.progress, self.plan
        self.model.load_state_dict(state.best_state)
        self.model.to(self.ctx.device)
        stopped = self.stopped_early() and state.step < plan.total_steps
        return TrainOutcome(
            state_dict=state.best_state, best_epoch=state.best_epoch, best_val_top1=state.best_top1,
            epochs=math.ceil(state.step / plan.per_epoch), steps=state.step,
            images_seen=state.step * (plan.lab_batch + plan.unl_batch),
            seconds=state.seconds + time.time() - self.started, history=state.history,
            resumed_from_step=self.start_step, checkpoint=self.checkpointer.last, precision=self.precision.name,
            precision_info=self.precision.info, thread_changes=self.governor.changes if self.governor else [],
            stopped_early=stopped, stopped_at_epoch=state.history[-1]["epoch"] if stopped else None,
            frozen=frozen, trainable_params=sum(p.numel() for p in self.net.parameters() if p.requires_grad))
