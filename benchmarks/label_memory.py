"""Peak memory of streaming labeling does not grow with the size of the unlabeled pool.

Labels synthetic pools of 10^4, 10^5 and 10^6 tiny images (8x8, synthesised from their index by
``SyntheticSource``, so nothing is held or stored up front) with a tiny conv net, each size in a
fresh subprocess, through the real ``label_to_store`` path (DataLoader workers, shards, Parquet
store, manifest). Reports the peak resident set size of the labeling process (and, separately, of
its DataLoader worker), measured by ``getrusage`` in that subprocess.

    python benchmarks/label_memory.py [--sizes 10000 100000 1000000]

The last line printed is a JSON object: ``peak_rss_mb`` per size, and ``ratio_largest_to_smallest``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

SIZE = 8


class Tiny(nn.Module):
    """A two-layer conv net for 8x8 RGB images."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16 * (SIZE // 2) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def to_tensor(img) -> torch.Tensor:
    """uint8 HWC PIL image -> float CHW in [0, 1] (cheap, so 10^6 images take about a minute)."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def child(n: int, store: Path, batch_size: int, shard_size: int) -> dict:
    from noisystudent.data.pool import SyntheticSource
    from noisystudent.label.inference import label_to_store

    torch.manual_seed(0)
    t = time.perf_counter()
    manifest = label_to_store(Tiny(), SyntheticSource(n, shard_size=shard_size, size=SIZE), store,
                              transform=to_tensor, num_classes=10, teacher="tiny", top_k=3, batch_size=batch_size,
                              num_workers=1, precision="fp32", progress=False)
    seconds = time.perf_counter() - t
    assert manifest.complete and manifest.num_rows == n
    # ru_maxrss is in KiB on Linux: the peak of this process, and of its (waited-for) workers.
    return {"images": n, "seconds": round(seconds, 1), "images_per_s": round(n / seconds),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "store_mb": round(manifest.num_bytes / 2**20, 2), "shards": manifest.num_shards}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--shard-size", type=int, default=8192)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.store, args.batch_size, args.shard_size)))
        return {}

    runs = {}
    with tempfile.TemporaryDirectory(prefix="label_memory_") as tmp:
        for n in args.sizes:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--store", str(Path(tmp) / str(n)),
                                  "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)],
                                 capture_output=True, text=True, check=True)
            runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(runs[n]), file=sys.stderr)
    peaks = {str(n): r["peak_rss_mb"] for n, r in runs.items()}
    smallest, largest = runs[min(runs)]["peak_rss_mb"], runs[max(runs)]["peak_rss_mb"]
    result = {"peak_rss_mb": peaks, "worker_peak_rss_mb": {str(n): r["worker_peak_rss_mb"] for n, r in runs.items()},
              "ratio_largest_to_smallest": round(largest / smallest, 3),
              "seconds": {str(n): r["seconds"] for n, r in runs.items()},
              "batch_size": args.batch_size, "shard_size": args.shard_size, "image_size": SIZE}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
