"""Small training scenarios shared by the training tests, runnable as a script for subprocess and
torchrun tests (``python tests/_train_scenarios.py MODE OUT``). Holds no tests itself."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from _tiny import TinyNet
from noisystudent.config.schema import DataConfig, NoiseConfig, TrainConfig
from noisystudent.data.datasets import TransformedSet
from noisystudent.data.splits import build_splits
from noisystudent.runtime.distributed import DistContext
from noisystudent.models.factory import create_model
from noisystudent.train.loop import train_classifier
from noisystudent.data.transforms import eval_transform, train_transform

NUM_CLASSES = 10


class SoftLabeled(Dataset):
    """Unlabeled images with fixed random soft targets (stand-ins for a teacher's labels)."""

    def __init__(self, images, transform, n: int):
        self.images, self.transform, self.n = images, transform, n
        logits = np.random.default_rng(123).normal(size=(n, NUM_CLASSES)) * 2
        p = np.exp(logits - logits.max(1, keepdims=True))
        self.targets = torch.from_numpy((p / p.sum(1, keepdims=True)).astype(np.float32))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.transform(self.images.load(i)), self.targets[i]


class Recorder(Dataset):
    """Records every index it is asked for; optionally sends a signal to its own process when
    loading the ``signal_at``-th image (SIGKILL: a crash at an arbitrary point, no clean-up)."""

    def __init__(self, dataset: Dataset, signal_at: int | None = None, signum: int = signal.SIGKILL):
        self.dataset, self.signal_at, self.signum, self.fetched = dataset, signal_at, signum, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        self.fetched.append(int(i))
        if len(self.fetched) == self.signal_at:
            os.kill(os.getpid(), self.signum)
        return self.dataset[i]


def digits_data(num_pseudo: int = 96, augment: bool = True):
    """Labeled (50 images, augmented), pseudo-labeled and validation sets from the digits."""
    splits = build_splits(DataConfig(labels_per_class=5, val_per_class=4, test_per_class=4), 0)
    noise = NoiseConfig(augment=augment, randaugment_magnitude=9)
    noisy = train_transform(16, splits.channels, splits.mean, splits.std, noise, False)
    clean = eval_transform(16, splits.channels, splits.mean, splits.std)
    labeled = TransformedSet(splits.labeled, noisy)
    pseudo = SoftLabeled(splits.unlabeled, noisy, num_pseudo)
    val = TransformedSet(splits.val, clean)
    return labeled, pseudo, val


def noisy_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("ns_cnn_s", NUM_CLASSES, 1, dropout=0.3, drop_path=0.1)


def student_config(**overrides) -> TrainConfig:
    # fp32: `auto` is chosen by timing, which two processes compared bit for bit could do differently
    base = dict(batch_size=8, unlabeled_ratio=3, lr=0.05, checkpoint_every=3, keep_checkpoints=2, precision="fp32")
    base.update(overrides)
    return TrainConfig(**base)


def outcome_summary(outcome) -> dict:
    return {"best_val_top1": outcome.best_val_top1, "best_epoch": outcome.best_epoch, "steps": outcome.steps,
            "history": [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in outcome.history],
            "resumed_from_step": outcome.resumed_from_step}


# ------------------------------------------------------------------------------ script modes


def tiny_stage(ctx, data, stage: str, checkpoint_dir: Path, use_pseudo: bool = True, pseudo_signal_at=None):
    """Teacher (labeled only) or student stage of TinyNet: 7 steps of 8 labeled + 24 pseudo images."""
    labeled, pseudo, val = data
    torch.manual_seed(0)
    model = TinyNet()
    lab, pse = Recorder(labeled), Recorder(pseudo, pseudo_signal_at, signal.SIGTERM)
    cfg = TrainConfig(batch_size=8, unlabeled_ratio=3, lr=0.1, momentum=0.9, weight_decay=0.0,
                      checkpoint_every=2, keep_checkpoints=2, precision="fp32")
    outcome = train_classifier(model, lab, val, cfg, num_classes=NUM_CLASSES, epochs=1, lr=0.1, ctx=ctx,
                               pseudo=pse if use_pseudo else None, seed=5, progress=False, desc=stage,
                               checkpoint_dir=checkpoint_dir)
    return model, outcome, {"labeled": lab.fetched, "pseudo": pse.fetched}


def run_distributed(out: Path) -> None:
    """Teacher then student with TinyNet under torchrun (or one plain process); then the student
    again, pre-empted by a SIGTERM that only the last rank receives. Without input noise: random
    augmentation is drawn per rank's batch, so it depends on the number of processes."""
    from noisystudent.runtime.distributed import cleanup, init_distributed
    from noisystudent.train.loop import TrainingPreempted

    ctx = init_distributed("cpu")
    data = digits_data(num_pseudo=64, augment=False)
    result, fetched = {}, {}
    for stage in ("teacher", "student"):
        model, outcome, fetched[stage] = tiny_stage(ctx, data, stage, out / "checkpoints" / stage,
                                                    use_pseudo=stage == "student")
        result[stage] = outcome_summary(outcome)
        if ctx.is_main:
            torch.save(model.state_dict(), out / f"{stage}-weights.pt")
    (out / f"fetched-rank{ctx.rank}.json").write_text(json.dumps(fetched))
    if ctx.is_main:
        (out / "result.json").write_text(json.dumps(result))
    if ctx.distributed:
        last = ctx.rank == ctx.world_size - 1
        try:  # the last rank loads its 29th pseudo-labeled image (of 12 a step) in step 3
            tiny_stage(ctx, data, "student", out / "checkpoints" / "preempted",
                       pseudo_signal_at=29 if last else None)
            report = {"preempted": False}
        except TrainingPreempted as e:
            report = {"preempted": True, "message": str(e), "checkpoint": str(e.checkpoint)}
        (out / f"preempted-rank{ctx.rank}.json").write_text(json.dumps(report))
    cleanup(ctx)


def run_resumable(out: Path, signal_at: int | None = None, signum: int = signal.SIGKILL,
                  checkpoint_dir: Path | None = None) -> dict:
    """A noisy student stage (augmentation, dropout, drop path, EMA) with checkpoints every 3 of
    its 21 steps (8 labeled images a step). Writes and returns the outcome and final weights."""
    labeled, pseudo, val = digits_data()
    model = noisy_model()
    outcome = train_classifier(model, Recorder(labeled, signal_at, signum), val,
                               student_config(ema=True, ema_decay=0.9), num_classes=NUM_CLASSES, epochs=3,
                               lr=0.05, ctx=DistContext(), pseudo=pseudo, seed=3, progress=False,
                               desc="student-1", checkpoint_dir=checkpoint_dir or out / "checkpoints")
    result = outcome_summary(outcome)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "weights.pt")
    (out / "result.json").write_text(json.dumps(result))
    return {"result": result, "weights": model.state_dict()}


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # two shared cores: one thread per process keeps runs predictable
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "distributed":
        run_distributed(out)
    elif mode == "resumable":
        run_resumable(out, int(sys.argv[3]) if len(sys.argv) > 3 else None)
    else:
        raise SystemExit(f"unknown mode {mode}")
