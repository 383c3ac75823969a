"""Labeling throughput: ``label_to_store`` against a plain PyTorch inference loop.

Both label the same JPEG files with the same teacher, transform, batch size and number of
DataLoader workers. The plain loop is the idiomatic one: ``DataLoader`` + ``model.eval()`` +
``torch.no_grad()`` in fp32, keeping top-k of the softmax. The labeling stage adds what it does for
real: BatchNorm folded into convolutions, channels-last tensors, ``inference_mode``, bf16 autocast
only if it is faster *and* agrees with fp32 on >= 99.9% of top-1 labels (measured at start; a
randomly initialised teacher usually fails that bar, so it runs in fp32), whole-shard workers and
atomic Parquet shards. Its time includes everything the call does (listing the folder, preparing
the model, calibrating precision, writing the store).

The teacher is randomly initialised with 1000 classes; its BatchNorm statistics are set from the
benchmark images first, so activations (and hence the arithmetic) are those of a working network
rather than of a degenerate one. Runs alternate (plain, ours, plain, ours, ...) so that load from
other processes on a shared machine hits both alike; the median of each is reported.

    python benchmarks/label_throughput.py [--model efficientnet_b0] [--images 2000] ...

The last line printed is a JSON object with ``ours_img_s``, ``plain_img_s``, ``speedup`` and
``bytes_per_image`` (the store's size per labeled image, at 1000 classes, top-5).
``ours_loop_img_s`` is the labeling loop alone (without listing, model preparation and precision
calibration), for reference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from noisystudent.data.datasets import class_folder_samples, read_image
from noisystudent.label.store import load_pseudo_labels
from noisystudent.data.pool import folder_source
from noisystudent.label.inference import default_num_workers, label_to_store
from noisystudent.models.factory import create_model
from noisystudent.data.transforms import eval_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """Smooth random colour fields with some texture, saved as JPEG in 100-image subfolders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((size, size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
        sub = folder / f"{i // 100:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(sub / f"{i:06d}.jpg", quality=90)


class Files(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(read_image(self.paths[i], "RGB")), i


def plain_loop(model, paths, transform, batch_size, num_workers, top_k=5):
    """The idiomatic baseline: DataLoader, eval mode, no_grad, fp32."""
    loader = DataLoader(Files(paths, transform), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model.eval()
    top1 = []
    with torch.no_grad():
        for x, _ in loader:
            prob, idx = torch.softmax(model(x), dim=1).topk(top_k, dim=1)
            top1.append(idx[:, 0].numpy())
    return np.concatenate(top1)


def calibrate_batchnorm(model, paths, transform, n=512, batch_size=128):
    """Set BatchNorm running statistics from the data (cumulative average over ``n`` images)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, min(n, len(paths)), batch_size):
            model(torch.stack([transform(read_image(p, "RGB")) for p in paths[i:i + batch_size]]))
    model.eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--file-size", type=int, default=160, help="side of the JPEG files")
    ap.add_argument("--input-size", type=int, default=128, help="side of the model input (resize + centre crop)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=default_num_workers())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--shard-size", type=int, default=1024)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="label_throughput_"))
    try:
        make_images(work / "images", args.images, args.file_size)
        paths = [p for p, _ in class_folder_samples(work / "images", "benchmark")[0]]
        transform = eval_transform(args.input_size, 3, MEAN, STD)
        model = create_model(args.model, args.classes, 3)
        calibrate_batchnorm(model, paths, transform)
        print(f"{args.model}, {args.images} JPEGs {args.file_size}px -> {args.input_size}px, batch {args.batch_size}, "
              f"{args.workers} worker(s), {torch.get_num_threads()} threads", file=sys.stderr)

        plain_rates, ours_rates, ours_loop_rates, manifest, plain_top1 = [], [], [], None, None
        for r in range(args.rounds):
            t = time.perf_counter()
            plain_top1 = plain_loop(model, paths, transform, args.batch_size, args.workers)
            plain_rates.append(len(paths) / (time.perf_counter() - t))

            store = work / f"store-{r}"
            t = time.perf_counter()
            manifest = label_to_store(model, folder_source(work / "images", args.shard_size), store,
                                      transform=transform, num_classes=args.classes, teacher=args.model,
                                      top_k=5, batch_size=args.batch_size, num_workers=args.workers, progress=False)
            ours_rates.append(manifest.num_rows / (time.perf_counter() - t))
            ours_loop_rates.append(manifest.run["images_per_s"])  # the labeling loop alone, without setup
            print(f"round {r + 1}: plain {plain_rates[-1]:.0f} img/s, ours {ours_rates[-1]:.0f} img/s "
                  f"({manifest.run['precision']})", file=sys.stderr)

        labels = load_pseudo_labels(store)
        rel = [str(p.relative_to(work / "images")) for p in paths]
        assert labels.keys == rel, "the store and the plain loop saw different images"
        agreement = float((labels.predicted == plain_top1).mean())
        ours, plain = statistics.median(ours_rates), statistics.median(plain_rates)
        loop = statistics.median(ours_loop_rates)
        result = {"ours_img_s": round(ours, 1), "plain_img_s": round(plain, 1), "speedup": round(ours / plain, 3),
                  "ours_loop_img_s": round(loop, 1), "speedup_without_setup": round(loop / plain, 3),
                  "bytes_per_image": round(manifest.bytes_per_image, 2), "num_classes": args.classes,
                  "top1_agreement_with_plain": agreement, "precision": manifest.run["precision"],
                  "calibration": manifest.run["calibration"], "model": args.model, "images": len(paths),
                  "input_size": args.input_size, "batch_size": args.batch_size, "workers": args.workers,
                  "threads": torch.get_num_threads(), "rounds": args.rounds,
                  "ours_runs": [round(x, 1) for x in ours_rates], "plain_runs": [round(x, 1) for x in plain_rates]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
