"""Ours against timm on the same job: whole processes, alternated, median ratio (issue 28).

The same job runs through ``noisystudent run`` (teacher only: ``students=[]``,
``baseline.enabled=false``) and through a training script built from timm's own pieces the way
timm's ``train.py`` builds them: ``timm.data.create_dataset`` (an image folder),
``timm.data.create_loader`` (which makes the transform with ``create_transform``, the same
RandAugment string), ``timm.optim.create_optimizer_v2``, ``timm.scheduler.create_scheduler_v2``,
the standard step (``step_update`` every step, ``step`` every epoch), validation with
``timm.utils.accuracy`` after every epoch and a ``timm.utils.CheckpointSaver`` checkpoint per epoch,
as ``train.py`` does. ``--timm-train PATH`` runs timm's own ``train.py`` from a checkout instead.

Jobs (the images are written by the benchmark from the Fashion-MNIST IDX files in
/usr/share/datasets/fashion-mnist, 300 per class for training and 100 per class for validation):

* ``resnet18``: resnet18 at 32 px on grayscale PNGs, 2 epochs, batch 64, SGD lr 0.05,
  RandAugment n2 m9, 1 loader worker, fp32, ``OMP_NUM_THREADS=1``.
* ``efficientnet_b0``: the same at 64 px on RGB PNGs (each image tinted with its own colour).

Both sides: the same model (no dropout, no drop path), images, batch, epochs, cosine schedule
without warm-up, weight decay 5e-4, label smoothing 0.1, threads. Ours also measures the val
and test splits once more after training (the test split here is the validation folder), which
timm's loop does not do: its cost is in ours' phases as ``final_measurement``.

Each pair runs both sides as fresh processes, the order alternating from pair to pair; the
ratios are ours / timm per pair, reported as medians (robust to drifting load). Per-epoch time is
training + validation per epoch, from each side's own clock (ours: summary.json ``phases``); per
step is an epoch's training time over its steps (ours: 47 steps, a full pass; timm: 46, its loader
drops the last partial batch), the like-for-like training rate.

    python benchmarks/vs_timm.py                    # both jobs, 5 pairs each; the last line is JSON
    python benchmarks/vs_timm.py --job resnet18 --pairs 7
    python benchmarks/vs_timm.py --defaults         # each side's default precision and threads
    python benchmarks/vs_timm.py --timm-train ~/pytorch-image-models/train.py
    python benchmarks/vs_timm.py --quick            # a smoke test: few images, 1 pair, 1 epoch
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FASHION = Path("/usr/share/datasets/fashion-mnist")
JOBS = {"resnet18": {"model": "resnet18", "size": 32, "channels": 1},
        "efficientnet_b0": {"model": "efficientnet_b0", "size": 64, "channels": 3}}
AUGMENT = "rand-m9-n2"  # timm's string for ours' noise.randaugment_ops=2, randaugment_magnitude=9
MEAN, STD = 0.286, 0.353  # Fashion-MNIST's


def process_start() -> float:
    """When this process started (Linux /proc), for the start-up phase; now elsewhere. (A copy of
    noisystudent.runtime.phases.process_start: the timm side must not import noisystudent.)"""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


# ------------------------------------------------------------------------------ the images


def _idx(folder: Path, name: str):
    """An IDX file (the MNIST format: a magic, the dimensions, then uint8 values), gzipped."""
    import numpy as np

    with gzip.open(folder / name) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_images(root: Path, per_class: int, val_per_class: int, size: int, channels: int,
                 idx_dir: Path = FASHION) -> Path:
    """``root/train/<class>/*.png`` (``per_class`` each) and ``root/val/<class>/*.png``, from the
    Fashion-MNIST training IDX files; RGB images are resized to ``size`` and tinted per image."""
    import numpy as np
    from PIL import Image

    done = root / "complete"
    if done.is_file():
        return root
    images, labels = _idx(idx_dir, "train-images-idx3-ubyte.gz"), _idx(idx_dir, "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(0)
    for c in range(10):
        idx = np.flatnonzero(labels == c)[: per_class + val_per_class]
        for n, i in enumerate(idx):
            split = "train" if n < per_class else "val"
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i])
            if channels == 3:
                tint = rng.uniform(0.3, 1.0, size=3)
                rgb = (np.asarray(img.resize((size, size), Image.BILINEAR), np.float32)[..., None] * tint)
                img = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
            img.save(folder / f"{i:05d}.png")
    done.touch()
    return root


# ------------------------------------------------------------------------------ timm's side


def timm_loop(args: argparse.Namespace) -> dict:
    """One training run from timm's pieces, as train.py composes them; returns its phases."""
    started = process_start()
    import torch
    from timm.data import create_dataset, create_loader
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.models import create_model
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import CheckpointSaver, accuracy

    job = JOBS[args.job]
    torch.manual_seed(0)
    t_scan = time.time()
    phases = {"startup": t_scan - started}
    mode = "L" if job["channels"] == 1 else "RGB"
    train_set = create_dataset("", root=args.data, split="train", is_training=True, input_img_mode=mode)
    val_set = create_dataset("", root=args.data, split="val", input_img_mode=mode)
    phases["data_scan"] = time.time() - t_scan
    model = create_model(job["model"], num_classes=10, in_chans=job["channels"], drop_rate=0.0)
    mean, std = (MEAN,) * job["channels"], (STD,) * job["channels"]
    size = (job["channels"], job["size"], job["size"])
    device = torch.device("cpu")
    train_loader = create_loader(train_set, input_size=size, batch_size=args.batch, is_training=True,
                                 auto_augment=AUGMENT, mean=mean, std=std, num_workers=args.workers,
                                 device=device, use_prefetcher=False)
    val_loader = create_loader(val_set, input_size=size, batch_size=args.batch, is_training=False, mean=mean,
                               std=std, num_workers=args.workers, crop_pct=1.0, device=device, use_prefetcher=False)
    optimizer = create_optimizer_v2(model, opt="sgd", lr=args.lr, weight_decay=5e-4, momentum=0.9)
    updates_per_epoch = len(train_loader)
    scheduler, num_epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=0,
                                                min_lr=0.0, updates_per_epoch=updates_per_epoch)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(model=model, optimizer=optimizer, checkpoint_dir=str(out), recovery_dir=str(out),
                            decreasing=False, max_history=1)
    epochs, num_updates = [], 0
    for epoch in range(num_epochs):
        t_train = time.time()
        model.train()
        for x, y in train_loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
        t_val = time.time()
        model.eval()
        correct1 = correct5 = seen = 0
        with torch.no_grad():
            for x, y in val_loader:
                acc1, acc5 = accuracy(model(x), y, topk=(1, 5))
                correct1, correct5, seen = correct1 + acc1.item() * len(y), correct5 + acc5.item() * len(y), seen + len(y)
        top1 = correct1 / seen
        t_saved = time.time()  # the checkpoint is neither training nor validation (as ours' phases)
        scheduler.step(epoch + 1, top1)
        saver.save_checkpoint(epoch, metric=top1)
        epochs.append({"epoch": epoch + 1, "train": t_val - t_train, "val": t_saved - t_val, "val_top1": top1,
                       "checkpoint": time.time() - t_saved})
    phases["epochs"] = epochs
    phases["steps_per_epoch"] = updates_per_epoch
    phases["train"] = sum(e["train"] for e in epochs)
    phases["val"] = sum(e["val"] for e in epochs)
    phases["total"] = time.time() - started
    return phases


# ------------------------------------------------------------------------------ the two sides


def _env(args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if args.defaults:
        env.pop("OMP_NUM_THREADS", None)
    else:
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_ours(args: argparse.Namespace, data: Path, out: Path) -> dict:
    job = JOBS[args.job]
    sets = ["data.source=image-folder", f"data.train_dir={data / 'train'}", f"data.val_dir={data / 'val'}",
            f"data.test_dir={data / 'val'}", "data.labels_per_class=null", f"data.image_size={job['size']}",
            f"data.channels={job['channels']}", f"data.num_workers={args.workers}", "data.flip=true",
            f"teacher.model={job['model']}", f"teacher.epochs={args.epochs}", "students=[]", "baseline.enabled=false",
            f"train.batch_size={args.batch}", "train.optimizer=sgd", f"train.lr={args.lr}", "train.momentum=0.9",
            "train.weight_decay=0.0005", "train.scheduler=cosine", "train.warmup_epochs=0",
            "train.label_smoothing=0.1", "noise.randaugment_ops=2", "noise.randaugment_magnitude=9",
            "noise.dropout=0", "noise.drop_path=0", "evaluate.suites=[clean]", "tensorboard=false"]
    if not args.defaults:
        sets.append("train.precision=fp32")
    cmd = [sys.executable, "-m", "noisystudent", "run", "--out", str(out), "--quiet"]
    cmd += [a for s in sets for a in ("--set", s)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=_env(args), capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"ours failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    phases, row = summary["phases"], next(r for r in summary["stages"] if r["name"] == "teacher")
    return {"wall": wall, "phases": phases, "per_epoch": _per_epoch(_stage(phases, "teacher")),
            "per_step": _per_step(_stage(phases, "teacher"), row["steps"] / row["epochs"])}


def _stage(phases: dict, name: str) -> dict:
    return next(s for s in phases["stages"] if s["stage"] == name)


def _per_epoch(phases: dict) -> float:
    return statistics.mean(e["train"] + e["val"] for e in phases["epochs"])


def _per_step(phases: dict, steps_per_epoch: float) -> float:
    """Training seconds per step (an epoch of ours is a full pass, 47 steps of 64 on the 3,000
    images; timm's loader drops the last partial batch, 46 steps): the like-for-like training rate."""
    return statistics.mean(e["train"] for e in phases["epochs"]) / steps_per_epoch


def run_timm(args: argparse.Namespace, data: Path, out: Path) -> dict:
    if args.timm_train:  # timm's own train.py; its phases are not ours to read, only the wall time
        job = JOBS[args.job]
        cmd = [sys.executable, args.timm_train, "--data-dir", str(data), "--train-split", "train", "--val-split", "val",
               "--model", job["model"], "--num-classes", "10", "--in-chans", str(job["channels"]),
               "--input-img-mode", "L" if job["channels"] == 1 else "RGB", "--img-size", str(job["size"]),
               "-b", str(args.batch), "--epochs", str(args.epochs), "--opt", "sgd", "--lr", str(args.lr),
               "--momentum", "0.9", "--weight-decay", "5e-4", "--sched", "cosine", "--warmup-epochs", "0",
               "--cooldown-epochs", "0", "--aa", AUGMENT, "--smoothing", "0.1", "--workers", str(args.workers),
               "--no-prefetcher", "--device", "cpu", "--crop-pct", "1.0", "--mean", *[str(MEAN)] * job["channels"],
               "--std", *[str(STD)] * job["channels"], "--output", str(out), "--log-interval", "1000"]
    else:
        cmd = [sys.executable, __file__, "--timm-side", "--job", args.job, "--data", str(data), "--out", str(out),
               "--epochs", str(args.epochs), "--batch", str(args.batch), "--lr", str(args.lr),
               "--workers", str(args.workers)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=_env(args), capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"timm failed ({proc.returncode}): {proc.stderr[-2000:]}")
    if args.timm_train:
        return {"wall": wall, "phases": None, "per_epoch": None, "per_step": None}
    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall": wall, "phases": phases, "per_epoch": _per_epoch(phases),
            "per_step": _per_step(phases, phases["steps_per_epoch"])}


def compare(args: argparse.Namespace, workdir: Path) -> dict:
    """``args.pairs`` pairs of whole processes, the order alternating; medians of the ratios."""
    job = JOBS[args.job]
    data = write_images(workdir / f"images-{args.job}-{args.per_class}", args.per_class, args.val_per_class,
                        job["size"], job["channels"], Path(args.idx_dir))
    pairs = []
    for i in range(args.pairs):
        sides = {}
        order = ("ours", "timm") if i % 2 == 0 else ("timm", "ours")
        for side in order:
            out = workdir / f"{args.job}-{side}-{i}"
            sides[side] = (run_ours if side == "ours" else run_timm)(args, data, out)
        sides["load"] = os.getloadavg()[0]
        pairs.append(sides)
        epoch = {side: f"{sides[side]['per_epoch']:.2f}s" if sides[side]["per_epoch"] else "–"
                 for side in ("ours", "timm")}
        print(f"[{args.job}] pair {i + 1}/{args.pairs}: ours {sides['ours']['wall']:.1f}s, timm "
              f"{sides['timm']['wall']:.1f}s; per epoch ours {epoch['ours']}, timm {epoch['timm']}; "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    walls = [p["ours"]["wall"] / p["timm"]["wall"] for p in pairs]
    epochs = [p["ours"]["per_epoch"] / p["timm"]["per_epoch"] for p in pairs if p["timm"]["per_epoch"]]
    steps = [p["ours"]["per_step"] / p["timm"]["per_step"] for p in pairs if p["timm"]["per_step"]]
    mid = pairs[len(pairs) // 2]  # a representative pair's breakdowns (the middle one)
    return {"job": args.job, "model": job["model"], "image_size": job["size"], "channels": job["channels"],
            "pairs": len(pairs), "wall_ratio": statistics.median(walls), "wall_ratios": walls,
            "per_epoch_ratio": statistics.median(epochs) if epochs else None, "per_epoch_ratios": epochs,
            "per_step_ratio": statistics.median(steps) if steps else None, "per_step_ratios": steps,
            "loads": [p["load"] for p in pairs],
            "ours_wall": statistics.median(p["ours"]["wall"] for p in pairs),
            "timm_wall": statistics.median(p["timm"]["wall"] for p in pairs),
            "ours_per_epoch": statistics.median(p["ours"]["per_epoch"] for p in pairs),
            "timm_per_epoch": (statistics.median(p["timm"]["per_epoch"] for p in pairs) if epochs else None),
            "ours_phases": mid["ours"]["phases"], "timm_phases": mid["timm"]["phases"]}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> dict | None:
    """Run the comparison; prints a line per pair and per job, the JSON last, and returns it."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=[*JOBS, "both"], default="both")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke test: 10 + 5 images per class, 1 epoch, 1 pair")
    p.add_argument("--defaults", action="store_true", help="each side's default precision and threads")
    p.add_argument("--timm-train", help="timm's train.py to run instead of the loop from timm's pieces")
    p.add_argument("--workdir", help="where the images and runs go (default: a temporary folder)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--idx-dir", default=str(FASHION), help="Fashion-MNIST's IDX files (train-*-ubyte.gz)")
    p.add_argument("--timm-side", action="store_true", help=argparse.SUPPRESS)  # internal: one timm run
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.timm_side:
        print(json.dumps(timm_loop(args)))
        return None
    if args.quick:
        args.pairs, args.epochs, args.per_class, args.val_per_class, args.batch = 1, 1, 8, 4, 16
    if not (Path(args.idx_dir) / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"vs_timm: no Fashion-MNIST IDX files in {args.idx_dir} (--idx-dir)")
    jobs = list(JOBS) if args.job == "both" else [args.job]
    with tempfile.TemporaryDirectory(prefix="vs_timm-") as tmp:
        workdir = Path(args.workdir or tmp)
        results = []
        for job in jobs:
            args.job = job
            results.append(compare(args, workdir))
    for r in results:
        print(f"{r['job']}: whole process ours/timm {r['wall_ratio']:.3f} (ours {r['ours_wall']:.1f}s, timm "
              f"{r['timm_wall']:.1f}s); per epoch " + (f"{r['per_epoch_ratio']:.3f}" if r["per_epoch_ratio"] else "–")
              + "; training per step " + (f"{r['per_step_ratio']:.3f}" if r["per_step_ratio"] else "–"))
    result = {"benchmark": "vs_timm", "cpu": cpu_model(), "cores": os.cpu_count(),
              "threads": "default" if args.defaults else 1, "precision": "default" if args.defaults else "fp32",
              "timm": "train.py " + args.timm_train if args.timm_train else "loop from timm's pieces",
              "load_end": os.getloadavg(), "quick": args.quick, "jobs": results}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
