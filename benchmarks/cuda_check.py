"""CUDA paths and throughput, for a machine with a GPU (CI has none, so this is run by hand).

Exercises what only a GPU runs: the student training loop (``train_classifier``) in fp32, bf16
autocast and fp16 autocast with loss scaling, channels_last and EMA; evaluation on the device;
and the labeling stage (``label_to_store``: BatchNorm folding, precision calibration, pinned
whole-shard workers). Each training variant is timed against a plain loop over tensors already on
the GPU (no data loading at all), which is the ceiling for that model and precision.

Our loop's rate is the steady state: a short and a long run of each variant are timed, and the
rate is the difference in images over the difference in time, so start-up costs (loader workers,
cuDNN autotuning, the validation pass) cancel. The labeler runs first, since a time box that ends
the script early should not always cut the same check.

    python benchmarks/cuda_check.py [--model efficientnet_b0] [--size 224] [--steps 60]
    python benchmarks/cuda_check.py --device cpu --model ns_cnn_s --size 32 ...   # a smoke run

The last line printed is a JSON object: ``train`` (images/s per variant, ours and the ceiling,
final loss), ``label`` (images/s, chosen precision) and ``device``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from noisystudent.config.schema import TrainConfig
from noisystudent.runtime.distributed import DistContext, select_device
from noisystudent.data.pool import folder_source
from noisystudent.label.inference import label_to_store
from noisystudent.models.factory import create_model
from noisystudent.train.loop import resolve_precision, train_classifier
from noisystudent.data.transforms import eval_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class RandomImages(Dataset):
    """``n`` normalised images drawn from a bank of 64, with class or soft targets: the loop's
    data path (workers, pinned collation, host-to-device copies) without decoding cost."""

    def __init__(self, n: int, size: int, num_classes: int, soft: bool, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.bank = torch.randn(64, 3, size, size, generator=g)
        self.n, self.num_classes, self.soft = n, num_classes, soft

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = self.bank[i % 64]
        if self.soft:
            t = torch.full((self.num_classes,), 0.1 / (self.num_classes - 1))
            t[i % self.num_classes] = 0.9
            return x, t
        return x, i % self.num_classes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(model_name: str, size: int, precision: str, channels_last: bool, ema: bool, steps: int,
             batch: int, ratio: float, device: torch.device, workers: int) -> tuple[float, float, int]:
    """Our loop for ``steps`` steps, end to end: (seconds, final loss, images seen)."""
    num_classes = 1000
    net = create_model(model_name, num_classes, 3, dropout=0.2, drop_path=0.2)
    unl = round(batch * ratio)
    labeled = RandomImages(batch * 4, size, num_classes, soft=False, seed=0)
    pseudo = RandomImages(unl * steps, size, num_classes, soft=True, seed=1)
    val = RandomImages(256, size, num_classes, soft=False, seed=2)
    cfg = TrainConfig(batch_size=batch, unlabeled_ratio=ratio, precision=precision, channels_last=channels_last,
                      ema=ema, checkpoint_every=0, lr=0.05)
    ctx = DistContext(device=device)
    started = time.perf_counter()
    out = train_classifier(net, labeled, val, cfg, num_classes=num_classes, epochs=1.0, lr=0.05, ctx=ctx,
                           pseudo=pseudo, num_workers=workers, progress=False, desc=f"{precision}")
    _sync(device)
    return time.perf_counter() - started, out.history[-1]["loss"], out.images_seen


def time_ours(model_name: str, size: int, precision: str, channels_last: bool, ema: bool, steps: int,
              batch: int, ratio: float, device: torch.device, workers: int) -> dict:
    """Steady-state images/s of our loop (a short and a long run; start-up costs cancel), and the
    end-to-end rate of the long run."""
    short = max(2, steps // 4)
    t_short, _, n_short = run_ours(model_name, size, precision, channels_last, ema, short, batch, ratio, device,
                                   workers)
    t_long, loss, n_long = run_ours(model_name, size, precision, channels_last, ema, steps, batch, ratio, device,
                                    workers)
    steady = (n_long - n_short) / (t_long - t_short) if t_long > t_short else None  # JSON has no NaN
    return {"img_s": steady, "end_to_end_img_s": n_long / t_long, "steps": steps, "loss": loss,
            "finite": bool(np.isfinite(loss))}


def time_ceiling(model_name: str, size: int, precision: str, steps: int, batch: int, device: torch.device) -> float:
    """A plain loop on tensors already on the GPU: model + loss + SGD and nothing else."""
    net = create_model(model_name, 1000, 3, dropout=0.2, drop_path=0.2).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    dtype = resolve_precision(precision, device)  # the same autocast dtype our loop uses
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    net.train()
    for i in range(steps + 5):
        if i == 5:
            _sync(device)
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


def time_labeling(model_name: str, size: int, images: int, device: torch.device, workers: int) -> dict:
    """label_to_store over a folder of JPEGs, precision chosen by its calibration."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        for i in range(images):
            low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            sub = folder / f"{i // 500:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(low).resize((size + 32, size + 32), Image.BICUBIC).save(sub / f"{i:06d}.jpg", quality=90)
        teacher = create_model(model_name, 1000, 3).eval()
        started = time.perf_counter()
        manifest = label_to_store(teacher, folder_source(folder, shard_size=1024), Path(tmp) / "store",
                                  transform=eval_transform(size, 3, MEAN, STD), num_classes=1000, teacher=model_name,
                                  device=device, batch_size=256, num_workers=workers, progress=False)
        _sync(device)
        seconds = time.perf_counter() - started
    run = manifest.run
    return {"img_s": images / seconds, "seconds": seconds, "images": images,
            "precision": run.get("precision"), "calibration": run.get("calibration")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet_b0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64, help="labeled images per step (x (1 + ratio) in all)")
    ap.add_argument("--ratio", type=float, default=3.0, help="pseudo-labeled : labeled")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--label-images", type=int, default=4096)
    ap.add_argument("--device", default="cuda", help="cuda (the point of this script), or cpu for a smoke run")
    args = ap.parse_args(argv)

    device = select_device(args.device)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "model": args.model,
              "size": args.size, "images_per_step": args.batch + round(args.batch * args.ratio), "train": {}}
    per_step = args.batch + round(args.batch * args.ratio)
    result["label"] = time_labeling(args.model, args.size, args.label_images, device, args.workers)
    print("label", result["label"], flush=True)
    variants = [("fp32", "fp32", True, False), ("bf16", "bf16", True, False),
                *([("fp16", "fp16", True, False)] if device.type == "cuda" else []),
                ("bf16 contiguous", "bf16", False, False), ("bf16 + EMA", "bf16", True, True)]
    for name, precision, cl, ema in variants:
        r = time_ours(args.model, args.size, precision, cl, ema, args.steps, args.batch, args.ratio, device,
                      args.workers)
        if name in ("fp32", "bf16", "fp16"):
            r["ceiling_img_s"] = time_ceiling(args.model, args.size, precision, args.steps, per_step, device)
            r["of_ceiling"] = r["img_s"] / r["ceiling_img_s"] if r["img_s"] else None
        result["train"][name] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
        print(name, result["train"][name], flush=True)
    if device.type == "cuda":
        result["max_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result, allow_nan=False))
    return result


if __name__ == "__main__":
    main()
