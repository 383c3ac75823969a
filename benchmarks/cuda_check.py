"""Training and labeling against the model-bound rate, for a machine with a GPU (CI has none).

The data is a folder of real JPEGs the script writes first (``--images``, sizes varied around 1.1
to 2.5 times ``--size`` on the short side, textured content at quality 90), so decoding, cropping
and RandAugment cost what they cost on ImageNet-like files. Two measurements:

- **training**: our student loop (``train_classifier``: labeled + pseudo-labeled joint batches of
  ``--batch`` + ratio x ``--batch`` images, the default noisy transform with RandAugment, bf16
  autocast, channels_last, ``--workers`` loader workers) against the model-bound rate: the same
  model, batch, precision and layout stepping over tensors already on the device (forward,
  soft-target loss, backward, SGD and nothing else). Our rate is the steady state: after a
  warm-up run (cuDNN autotuning), a short and a long run are timed, and the rate is the
  difference in images over the difference in time, so start-up costs (workers, the final
  validation pass) cancel.
- **labeling**: ``label_to_store`` over the JPEG folder (precision and decoder chosen by its own
  measurements) against model-bound inference (the same prepared teacher, batch and precision
  on device tensors); steady state again from a short (a quarter of the pool) and a long run.

    python benchmarks/cuda_check.py                      # the GPU check: efficientnet_b0, 224 px, 256 + 256
    python benchmarks/cuda_check.py --variants           # also fp32, fp16, bf16 contiguous, bf16 + EMA
    python benchmarks/cuda_check.py --device cpu --model ns_cnn_s --size 32 --steps 8 --batch 4 \\
        --workers 0 --images 64                          # the CPU smoke run (tests/test_cuda_check_benchmark.py)

The last line printed is a JSON object with ``train_ratio`` (our steady-state training rate over
the model-bound rate, bf16 channels_last) and ``label_ratio`` (labeling over model-bound
inference), and the details: ``train`` (per variant), ``label``, ``device``, ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from noisystudent.config.schema import NoiseConfig, TrainConfig
from noisystudent.data.datasets import FileImageSet, TransformedSet
from noisystudent.data.pool import folder_source
from noisystudent.data.transforms import eval_transform, train_transform
from noisystudent.label.inference import label_to_store, prepare_model
from noisystudent.models.factory import create_model
from noisystudent.runtime.distributed import DistContext, select_device
from noisystudent.runtime.precision import resolve_precision
from noisystudent.train.loop import steps_per_epoch, train_classifier

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NUM_CLASSES = 1000


# ------------------------------------------------------------------------------ the JPEG folder


def _write_one(args: tuple) -> None:
    """One JPEG: smooth colour fields plus fine texture (so it compresses and decodes like a
    photograph, not like flat colour or white noise), its size drawn around ``size``."""
    path, size, seed = args
    rng = np.random.default_rng(seed)
    short = int(size * rng.uniform(1.1, 2.5))
    long = int(short * rng.uniform(1.0, 1.5))
    w, h = (long, short) if rng.random() < 0.7 else (short, long)  # mostly landscape, as ImageNet
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    texture = rng.normal(0, 18, (h, w, 1))
    pixels = np.clip(np.asarray(base, dtype=np.float32) + texture, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def write_jpegs(folder: Path, n: int, size: int, workers: int) -> list[Path]:
    """``n`` JPEGs in ``folder/a`` (the first quarter: the short labeling run) and ``folder/b``."""
    first = max(1, n // 4)
    paths = [folder / ("a" if i < first else "b") / f"{i:06d}.jpg" for i in range(n)]
    for sub in ("a", "b"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(p, size, i) for i, p in enumerate(paths)]
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            pool.map(_write_one, jobs, chunksize=64)
    else:
        for job in jobs:
            _write_one(job)
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ training


def _datasets(paths: list[Path], size: int):
    """Labeled (class targets), pseudo-labeled (soft targets) and validation sets over the JPEGs,
    through the default noisy transform (crop, flip, RandAugment 2 ops at magnitude 27)."""
    n = len(paths)
    images = FileImageSet(paths, np.arange(n) % NUM_CLASSES)
    noisy = train_transform(size, 3, MEAN, STD, NoiseConfig(), flip=True)
    rng = np.random.default_rng(0)
    soft = np.full((n, NUM_CLASSES), 0.1 / (NUM_CLASSES - 1), dtype=np.float32)
    soft[np.arange(n), rng.integers(0, NUM_CLASSES, n)] = 0.9
    val = TransformedSet(FileImageSet(paths[:256], np.arange(min(256, n)) % NUM_CLASSES),
                         eval_transform(size, 3, MEAN, STD))
    return TransformedSet(images, noisy), TransformedSet(images, noisy, targets=soft), val


def run_ours(data, model_name: str, precision: str, channels_last: bool, ema: bool, steps: int, batch: int,
             ratio: float, device: torch.device, workers: int) -> tuple[float, float, int]:
    """Our loop for ``steps`` steps, end to end: (seconds, final loss, images seen)."""
    labeled, pseudo, val = data
    net = create_model(model_name, NUM_CLASSES, 3, dropout=0.2, drop_path=0.2)
    cfg = TrainConfig(batch_size=batch, unlabeled_ratio=ratio, precision=precision, channels_last=channels_last,
                      ema=ema, checkpoint_every=0, lr=0.05, eval_every=10**6)
    per_epoch = steps_per_epoch(len(labeled), len(pseudo), batch, ratio)
    started = time.perf_counter()
    out = train_classifier(net, labeled, val, cfg, num_classes=NUM_CLASSES, epochs=(steps - 0.5) / per_epoch,
                           lr=0.05, ctx=DistContext(device=device), pseudo=pseudo, num_workers=workers,
                           progress=False, desc=precision)
    _sync(device)
    return time.perf_counter() - started, out.history[-1]["loss"], out.images_seen


def time_ours(data, model_name: str, precision: str, channels_last: bool, ema: bool, steps: int, batch: int,
              ratio: float, device: torch.device, workers: int) -> dict:
    """Steady-state images/s of our loop (a short and a long run after a warm-up; start-up costs
    cancel), and the end-to-end rate of the long run."""
    args = (model_name, precision, channels_last, ema)
    run_ours(data, *args, 2, batch, ratio, device, workers)  # cuDNN autotuning, allocator, page cache
    short = max(2, steps // 4)
    t_short, _, n_short = run_ours(data, *args, short, batch, ratio, device, workers)
    t_long, loss, n_long = run_ours(data, *args, steps, batch, ratio, device, workers)
    steady = (n_long - n_short) / (t_long - t_short) if t_long > t_short else None  # JSON has no NaN
    return {"img_s": steady, "end_to_end_img_s": n_long / t_long, "steps": steps, "loss": loss,
            "finite": bool(np.isfinite(loss))}


def time_model_bound(model_name: str, size: int, precision: str, channels_last: bool, steps: int, batch: int,
                     device: torch.device) -> float:
    """The same model, batch, precision and layout stepping over tensors already on the device:
    forward, soft-target loss, backward, SGD and nothing else."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = create_model(model_name, NUM_CLASSES, 3, dropout=0.2, drop_path=0.2).to(device, memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    target = torch.softmax(torch.randn(batch, NUM_CLASSES, device=device), 1)
    dtype = resolve_precision(precision, device)  # the autocast dtype our loop uses
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    net.train()
    for i in range(steps + 5):
        if i == 5:
            _sync(device)
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = net(x)
        loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


# ------------------------------------------------------------------------------ labeling


def _label(teacher, model_name: str, folder: Path, store: Path, size: int, device: torch.device, workers: int,
           decode: str) -> tuple[float, dict]:
    started = time.perf_counter()
    manifest = label_to_store(teacher, folder_source(folder, shard_size=1024), store,
                              transform=eval_transform(size, 3, MEAN, STD), num_classes=NUM_CLASSES,
                              teacher=model_name, device=device, batch_size=256, num_workers=workers,
                              progress=False, decode=decode)
    _sync(device)
    return time.perf_counter() - started, manifest.run


def time_labeling(model_name: str, size: int, folder: Path, work: Path, device: torch.device, workers: int,
                  decode: str) -> dict:
    """Steady-state images/s of ``label_to_store`` (the first quarter of the pool, then all of it;
    set-up, calibration and worker start-up cancel), and the model-bound inference rate."""
    teacher = create_model(model_name, NUM_CLASSES, 3).eval()
    _label(teacher, model_name, folder / "a", work / "warm", size, device, workers, decode)  # cuDNN, page cache
    t_short, short = _label(teacher, model_name, folder / "a", work / "short", size, device, workers, decode)
    t_long, run = _label(teacher, model_name, folder, work / "long", size, device, workers, decode)
    n_short, n_long = short["images_labeled"], run["images_labeled"]
    steady = (n_long - n_short) / (t_long - t_short) if t_long > t_short else None
    bound = time_inference(teacher, size, run["precision"], device)
    return {"img_s": steady, "end_to_end_img_s": n_long / t_long, "images": n_long,
            "labeling_loop_img_s": run.get("images_per_s"), "model_bound_img_s": bound,
            "precision": run.get("precision"), "calibration": run.get("calibration"), "decode": run.get("decode")}


def time_inference(teacher, size: int, precision: str, device: torch.device, batch: int = 256,
                   batches: int = 20) -> float:
    """The labeler's prepared teacher (BatchNorm folded, channels_last) on device tensors."""
    net = prepare_model(teacher, device)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for i in range(batches + 3):
            if i == 3:
                _sync(device)
                started = time.perf_counter()
            torch.softmax(net(x).float(), 1).topk(5, dim=1)
    _sync(device)
    return batches * batch / (time.perf_counter() - started)


# ------------------------------------------------------------------------------ main


def _round(r: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=40, help="steps of the long training run (the short: a quarter)")
    ap.add_argument("--batch", type=int, default=256, help="labeled images per step (x (1 + ratio) in all)")
    ap.add_argument("--ratio", type=float, default=1.0,
                    help="pseudo-labeled : labeled (the paper: 1 for models this small, 3 from B7 on)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--images", type=int, default=8192, help="JPEGs written (training set and labeling pool)")
    ap.add_argument("--decode", default="auto", choices=("auto", "cpu", "cuda"), help="the labeler's decoder")
    ap.add_argument("--variants", action="store_true", help="also fp32, fp16, bf16 contiguous and bf16 + EMA")
    ap.add_argument("--device", default="cuda", help="cuda (the point of this script), or cpu for a smoke run")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    device = select_device(args.device)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    per_step = args.batch + round(args.batch * args.ratio)
    result = {"device": name, "torch": torch.__version__, "model": args.model, "size": args.size,
              "images_per_step": per_step, "workers": args.workers, "cpus": os.cpu_count(), "train": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        t = time.perf_counter()
        paths = write_jpegs(folder, args.images, args.size, max(1, args.workers))
        result["jpegs"] = {"images": len(paths), "seconds": round(time.perf_counter() - t, 1),
                           "mean_kb": round(sum(p.stat().st_size for p in paths) / len(paths) / 1024, 1)}
        print("jpegs", result["jpegs"], flush=True)

        result["label"] = _round(time_labeling(args.model, args.size, folder, Path(tmp), device, args.workers,
                                               args.decode))
        print("label", result["label"], flush=True)

        data = _datasets(paths, args.size)
        variants = [("bf16", "bf16", True, False)]
        if args.variants:
            variants += [("fp32", "fp32", True, False), *([("fp16", "fp16", True, False)] if device.type == "cuda"
                                                          else []),
                         ("bf16 contiguous", "bf16", False, False), ("bf16 + EMA", "bf16", True, True)]
        for label, precision, cl, ema in variants:
            r = time_ours(data, args.model, precision, cl, ema, args.steps, args.batch, args.ratio, device,
                          args.workers)
            if not ema:
                r["model_bound_img_s"] = time_model_bound(args.model, args.size, precision, cl, args.steps,
                                                          per_step, device)
                r["of_model_bound"] = r["img_s"] / r["model_bound_img_s"] if r["img_s"] else None
            result["train"][label] = _round(r)
            print(label, result["train"][label], flush=True)
    bf16, lab = result["train"]["bf16"], result["label"]
    result["train_ratio"] = bf16["of_model_bound"]
    result["label_ratio"] = (round(lab["img_s"] / lab["model_bound_img_s"], 3)
                             if lab["img_s"] and lab["model_bound_img_s"] else None)
    if device.type == "cuda":
        result["max_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, allow_nan=False))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
