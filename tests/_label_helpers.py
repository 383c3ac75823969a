"""Shared pieces of the label-store tests: a tiny teacher (tests/_tiny.py's TinyNet), a tiny
transform, synthetic stores.

Also imported by the subprocess scripts of those tests (kill/resume, torchrun), which put this
folder on ``sys.path``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from _tiny import TinyNet
from noisystudent.label.store import StoreHeader, write_header, write_shard
from noisystudent.data.transforms import eval_transform

SIZE = 8
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def teacher_net(num_classes: int = 10) -> TinyNet:
    """The tests' TinyNet with BatchNorm on three channels: enough structure for BN folding and
    varied, confident predictions."""
    return TinyNet(num_classes, in_chans=3, batch_norm=True)


class KillAfter(nn.Module):
    """Wraps a model; SIGKILLs its own process on forward call number ``after + 1``.

    ``bool()`` on the input makes it untraceable by torch.fx, so the labeling pipeline keeps the
    wrapper (and its counter) instead of tracing through it; the reference run uses the same
    wrapper with ``after=None`` so both run the same (unfolded) arithmetic.
    """

    def __init__(self, inner: nn.Module, after: int | None):
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.shape[0] >= 0) and self.after is not None:
            self.calls += 1
            if self.calls > self.after:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x)


def transform():
    return eval_transform(SIZE, 3, MEAN, STD)


def random_store(store_dir: Path, shard_rows: list[int], num_classes: int, seed: int = 0, top_k: int = 3,
                 quantize: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A store of random pseudo labels written shard by shard; returns (confidence, predicted) of
    all rows in order. ``quantize`` rounds probabilities to that many levels, creating many ties."""
    rng = np.random.default_rng(seed)
    header = StoreHeader(num_classes=num_classes, teacher="random", top_k=top_k, temperature=1.0,
                         precision="fp32", source={"kind": "test", "num_shards": len(shard_rows)})
    write_header(store_dir, header)
    confs, preds = [], []
    for i, n in enumerate(shard_rows):
        logits = rng.standard_normal((n, num_classes)) * rng.uniform(0.5, 4.0, (n, 1))
        logits[np.arange(n), rng.integers(0, num_classes, n) % max(1, num_classes - 2)] += 2.0  # skewed classes
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        if quantize:
            p = np.round(p * quantize) / quantize
        idx = np.argsort(-p, axis=1, kind="stable")[:, :top_k].astype(np.int32)
        prob = np.take_along_axis(p, idx, 1).astype(np.float32)
        write_shard(store_dir, header, i, f"s{i}", [f"img/{i}/{j}" for j in range(n)], idx, prob)
        confs.append(prob[:, 0])
        preds.append(idx[:, 0])
    return np.concatenate(confs), np.concatenate(preds)


# ------------------------------------------------------------------ subprocess entry points

NUM_CLASSES = 10
NUM_IMAGES = 300  # 5 shards of 64 (the last one 44), 4 batches of 16 per shard
SHARD_SIZE, BATCH_SIZE = 64, 16


def source():
    from noisystudent.data.pool import SyntheticSource

    return SyntheticSource(NUM_IMAGES, shard_size=SHARD_SIZE, size=SIZE, bad_every=29)


def label(store: Path, model: nn.Module, ctx=None, num_workers: int = 2):
    from noisystudent.label.inference import label_to_store

    return label_to_store(model, source(), store, transform=transform(), num_classes=NUM_CLASSES, teacher="tiny",
                          top_k=3, batch_size=BATCH_SIZE, num_workers=num_workers, precision="fp32",
                          ctx=ctx, progress=False)


def main(argv: list[str]) -> None:
    """``kill STORE N``: label, SIGKILLed at forward call N + 1.
    ``dist STORE``: label under torchrun."""
    mode, store = argv[0], Path(argv[1])
    if mode == "kill":
        label(store, KillAfter(teacher_net(NUM_CLASSES), int(argv[2])))
    elif mode == "dist":
        from noisystudent.runtime.distributed import cleanup, init_distributed

        ctx = init_distributed("cpu")
        label(store, teacher_net(NUM_CLASSES), ctx=ctx, num_workers=1)
        cleanup(ctx)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
