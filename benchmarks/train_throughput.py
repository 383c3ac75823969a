"""Training throughput: our student training loop against a plain PyTorch loop, side by side.

Both loops train the same model from the same initial weights on the same data (the default
experiment's digits: labeled images plus pseudo-labeled images with soft targets, both through
the default noisy transform), with the same joint batch (B labeled + ratio x B pseudo-labeled),
the same loss and SGD (fp32 in the plain loop). Ours runs ``train_classifier`` with the default
``train`` settings (``precision: auto``, which on a CPU is bf16 where a calibration on the first
batch measures it faster, else fp32, chosen in the warm-up and cached for the process;
``--precision fp32`` compares the loops alone; no channels_last, no compile, no EMA, no
checkpoints), timed end to end, including its set-up; both loops end with the same validation
pass (20 images), as any training loop that selects a model does. The two
loops alternate, after a warm-up of each; throughputs are medians over the repeats and the
speedup is the median of the per-repeat ratios ours / plain (robust to drifting machine load).

    python benchmarks/train_throughput.py               # the last line is JSON
    python benchmarks/train_throughput.py --variants    # also ours with bf16 and channels_last
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from noisystudent.config.schema import load_config
from noisystudent.data.datasets import TransformedSet
from noisystudent.data.splits import build_splits
from noisystudent.runtime.distributed import DistContext
from noisystudent.evaluate.classifier import evaluate_classifier
from noisystudent.models.factory import create_model
from noisystudent.train.loop import steps_per_epoch, train_classifier
from noisystudent.data.transforms import eval_transform, train_transform


class SoftTargets(Dataset):
    """Unlabeled images with fixed soft targets, as a teacher's pseudo labels would be."""

    def __init__(self, images, transform, num_classes: int):
        self.images, self.transform = images, transform
        logits = np.random.default_rng(0).normal(size=(len(images), num_classes)) * 3
        p = np.exp(logits - logits.max(1, keepdims=True))
        self.targets = torch.from_numpy((p / p.sum(1, keepdims=True)).astype(np.float32))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images.load(i)), self.targets[i]


def plain_loop(model, labeled, pseudo, *, steps: int, batch: int, ratio: float, num_classes: int,
               lr: float, momentum: float, weight_decay: float, smoothing: float) -> None:
    """The loop one writes from the PyTorch tutorials: two shuffled loaders, concat, SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    lab = DataLoader(labeled, batch_size=batch, shuffle=True, drop_last=True)
    unl = DataLoader(pseudo, batch_size=round(batch * ratio), shuffle=True, drop_last=True)

    def forever(loader):
        while True:
            yield from loader

    lab_it, unl_it = forever(lab), forever(unl)
    model.train()
    for _ in range(steps):
        x, y = next(lab_it)
        xu, tu = next(unl_it)
        labels = F.one_hot(y, num_classes).float() * (1 - smoothing) + smoothing / num_classes
        targets = torch.cat([labels, tu])
        loss = torch.sum(-targets * F.log_softmax(model(torch.cat([x, xu])), dim=-1), dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ns_cnn_s", help="student model (default: the digits default)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each loop")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: stable timings on shared cores)")
    parser.add_argument("--precision", default="auto", help="train.precision of ours (the plain loop is fp32)")
    parser.add_argument("--variants", action="store_true", help="also time ours with bf16 and channels_last")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(None)  # the default experiment: digits, its noise and train settings
    splits = build_splits(cfg.data, cfg.seed)
    size = cfg.data.image_size
    noisy = train_transform(size, splits.channels, splits.mean, splits.std, cfg.noise, cfg.data.flip)
    clean = eval_transform(size, splits.channels, splits.mean, splits.std)
    labeled = TransformedSet(splits.labeled, noisy)
    pseudo = SoftTargets(splits.unlabeled, noisy, splits.num_classes)
    val = Subset(TransformedSet(splits.val, clean), range(20))  # ours evaluates once at the end
    t = cfg.train
    batch, ratio = t.batch_size, t.unlabeled_ratio
    images_per_step = batch + round(batch * ratio)
    per_epoch = steps_per_epoch(len(labeled), len(pseudo), batch, ratio)
    torch.manual_seed(0)
    initial = create_model(args.model, splits.num_classes, splits.channels, cfg.noise.dropout,
                           cfg.noise.drop_path)

    chosen: dict[str, str] = {}

    def ours(steps: int, **overrides) -> float:
        model = copy.deepcopy(initial)
        train_cfg = dataclasses.replace(t, eval_every=10**6, **{"precision": args.precision, **overrides})
        start = time.perf_counter()
        outcome = train_classifier(model, labeled, val, train_cfg, num_classes=splits.num_classes,
                                   epochs=(steps - 0.5) / per_epoch, lr=t.lr, ctx=DistContext(),
                                   pseudo=pseudo, seed=0, progress=False)
        if "precision" not in overrides:  # the default variant, "ours"
            chosen[outcome.precision] = outcome.precision_info.get("reason", "")
        return steps * images_per_step / (time.perf_counter() - start)

    def plain(steps: int) -> float:
        model = copy.deepcopy(initial)
        start = time.perf_counter()
        plain_loop(model, labeled, pseudo, steps=steps, batch=batch, ratio=ratio,
                   num_classes=splits.num_classes, lr=t.lr, momentum=t.momentum,
                   weight_decay=t.weight_decay, smoothing=t.label_smoothing)
        evaluate_classifier(model, val, torch.device("cpu"))  # the same final validation as ours
        return steps * images_per_step / (time.perf_counter() - start)

    variants = {"ours": dict(), "plain": None}
    if args.variants:
        variants.update({"ours_bf16": dict(precision="bf16"), "ours_channels_last": dict(channels_last=True)})
    for name, overrides in variants.items():  # warm-up: allocator and oneDNN kernel caches
        ours(2, **overrides) if overrides is not None else plain(2)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # alternate who goes first
        for name in order:
            overrides = variants[name]
            rates[name].append(ours(args.steps, **overrides) if overrides is not None else plain(args.steps))
    # Each repeat runs the loops back to back, so the ratio within a repeat cancels most of the
    # drift in the load other processes put on the machine; the speedup is the median ratio.
    median = {name: statistics.median(v) for name, v in rates.items()}
    for name, v in rates.items():
        print(f"{name:<20} median {median[name]:8.1f} img/s   runs: " + " ".join(f"{x:.1f}" for x in v))
    paired = [o / p for o, p in zip(rates["ours"], rates["plain"])]
    print("ours / plain per repeat: " + " ".join(f"{x:.3f}" for x in paired))
    result = {"ours_img_s": round(median["ours"], 1), "plain_img_s": round(median["plain"], 1),
              "speedup": round(statistics.median(paired), 3)}
    for name in variants:
        if name not in ("ours", "plain"):
            result[f"{name}_img_s"] = round(median[name], 1)
    result.update(model=args.model, images_per_step=images_per_step, steps=args.steps, repeats=args.repeats,
                  threads=args.threads, device="cpu",
                  precision=f"{'/'.join(sorted(chosen))} ({args.precision})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
