"""Training throughput on a CPU shared with one other busy process, against the same CPU idle.

Our training loop (``train_classifier``: the digits images at ``--size`` px through the noisy
transform, ``--batch`` labeled + ``--batch`` pseudo-labeled images per step, ``train.precision``
auto) runs in a fresh worker process, first alone ("idle"), then while a second copy of the same
loop runs as the competing CPU-bound process ("shared"); the benchmark starts that copy, waits
until it is training, and stops it afterwards. Idle and shared runs alternate for ``--repeats``
rounds, so slow drift in the load of the rest of the machine affects both alike; rates are
medians, and ``shared_ratio`` is the median of the per-round ratios shared / idle (an even split
of the cores would be 0.5).

Each worker is a new process, so it gets the start-up CPU settings of ``noisystudent`` (see
``noisystudent/runtime/cpu.py``) exactly as ``noisystudent run`` does. ``--baseline`` turns them
off (``NOISYSTUDENT_CPU_TUNING=0``: PyTorch's defaults), ``--env K=V`` sets a variable in every
worker (e.g. ``--env OMP_NUM_THREADS=1``, ``--env OMP_WAIT_POLICY=PASSIVE``).

    python benchmarks/cpu_shared.py                 # the last line is JSON
    python benchmarks/cpu_shared.py --baseline      # PyTorch's own defaults, for comparison
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

READY = "READY"  # a worker prints this when its measured run starts


def worker(args: argparse.Namespace) -> None:
    """One process: warm up (and calibrate the precision), then time ``--steps`` training steps."""
    import dataclasses

    import noisystudent  # noqa: F401 - first: its start-up CPU settings must precede `import torch`
    import numpy as np
    import torch
    from torch.utils.data import Dataset, Subset

    from noisystudent.config.schema import load_config
    from noisystudent.data.datasets import TransformedSet, build_splits
    from noisystudent.data.transforms import eval_transform, train_transform
    from noisystudent.models.factory import create_model
    from noisystudent.runtime.cpu import cpu_settings
    from noisystudent.runtime.distributed import DistContext
    from noisystudent.train.loop import steps_per_epoch, train_classifier

    class SoftTargets(Dataset):
        def __init__(self, images, transform, num_classes: int):
            self.images, self.transform = images, transform
            p = np.random.default_rng(0).dirichlet(np.ones(num_classes), size=len(images)).astype(np.float32)
            self.targets = torch.from_numpy(p)

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, i: int):
            return self.transform(self.images.load(i)), self.targets[i]

    cfg = load_config(None, [f"data.image_size={args.size}", f"train.batch_size={args.batch}",
                             "train.unlabeled_ratio=1", f"train.precision={args.precision}",
                             f"train.channels_last={str(args.channels_last).lower()}"])
    splits = build_splits(cfg.data, cfg.seed)
    noisy = train_transform(args.size, splits.channels, splits.mean, splits.std, cfg.noise, cfg.data.flip)
    clean = eval_transform(args.size, splits.channels, splits.mean, splits.std)
    labeled = TransformedSet(splits.labeled, noisy)
    pseudo = SoftTargets(splits.unlabeled, noisy, splits.num_classes)
    val = Subset(TransformedSet(splits.val, clean), range(20))
    per_epoch = steps_per_epoch(len(labeled), len(pseudo), args.batch, 1.0)
    torch.manual_seed(0)
    model = create_model(args.model, splits.num_classes, splits.channels, cfg.noise.dropout, cfg.noise.drop_path)

    def run(steps: int):
        train_cfg = dataclasses.replace(cfg.train, eval_every=10**6)
        return train_classifier(model, labeled, val, train_cfg, num_classes=splits.num_classes,
                                epochs=(steps - 0.5) / per_epoch, lr=cfg.train.lr, ctx=DistContext(),
                                pseudo=pseudo, seed=0, progress=False)

    first = run(3)  # warm-up: kernel caches, and the precision calibration (cached for the process)
    print(READY, json.dumps({"threads": torch.get_num_threads(), "precision": first.precision}), flush=True)
    start = time.perf_counter()
    outcome = run(args.steps)
    seconds = time.perf_counter() - start
    print(json.dumps({"img_s": outcome.images_seen / seconds, "precision": outcome.precision,
                      "precision_info": first.precision_info, "cpu": cpu_settings()}), flush=True)


def _spawn(args: argparse.Namespace, steps: int, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", "--steps", str(steps), "--model", args.model,
           "--size", str(args.size), "--batch", str(args.batch), "--precision", args.precision]
    if args.channels_last:
        cmd.append("--channels-last")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


def _measure(args: argparse.Namespace, env: dict) -> dict:
    proc = _spawn(args, args.steps, env)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def _shared(args: argparse.Namespace, env: dict) -> dict:
    competitor = _spawn(args, 10**7, env)  # trains until stopped
    try:
        while not (line := competitor.stdout.readline()).startswith(READY):  # past its warm-up
            if competitor.poll() is not None:
                raise SystemExit("competing worker died")
        return dict(_measure(args, env), competitor=json.loads(line[len(READY):]))
    finally:
        competitor.terminate()
        competitor.wait()


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ns_cnn_s_wide")
    parser.add_argument("--size", type=int, default=28, help="image size (px)")
    parser.add_argument("--batch", type=int, default=32, help="labeled images per step (as many pseudo-labeled)")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of one idle and one shared run")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--baseline", action="store_true", help="PyTorch's defaults (start-up settings off)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="set in every worker")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    env = dict(os.environ)
    if args.baseline:
        env["NOISYSTUDENT_CPU_TUNING"] = "0"
    for kv in args.env:
        key, _, value = kv.partition("=")
        env[key] = value
    load_before = _load()
    idle, shared, ratios = [], [], []
    last, last_shared = {}, {}
    for r in range(args.repeats):
        i = _measure(args, env)
        s = _shared(args, env)
        idle.append(i["img_s"])
        shared.append(s["img_s"])
        ratios.append(s["img_s"] / i["img_s"])
        last, last_shared = i, s
        print(f"round {r + 1}: idle {i['img_s']:.1f} img/s ({i['cpu']['threads']} threads), shared "
              f"{s['img_s']:.1f} img/s ({s['cpu']['threads']} threads, competitor {s['competitor']['threads']}), "
              f"ratio {ratios[-1]:.3f} (load {_load()})", file=sys.stderr, flush=True)
    result = {"idle_img_s": round(statistics.median(idle), 1), "shared_img_s": round(statistics.median(shared), 1),
              "shared_ratio": round(statistics.median(ratios), 3),
              "idle_runs": [round(x, 1) for x in idle], "shared_runs": [round(x, 1) for x in shared],
              "threads": {"idle": last["cpu"]["threads"], "shared": last_shared["cpu"]["threads"],
                          "competitor": last_shared["competitor"]["threads"]},
              "cpu_env": {"idle": last["cpu"]["env"], "shared": last_shared["cpu"]["env"]},
              "others_busy_cores": {"idle": last["cpu"]["configured"].get("threads", {}).get("others_busy_cores"),
                                    "shared": last_shared["cpu"]["configured"].get("threads", {}).get("others_busy_cores")},
              "cpu_settings": "baseline (PyTorch defaults)" if args.baseline else "noisystudent start-up",
              "precision": last["precision"], "precision_info": last["precision_info"],
              "model": args.model, "size": args.size, "images_per_step": 2 * args.batch, "steps": args.steps,
              "repeats": args.repeats, "cpu_model": _cpu_model(), "cores": os.cpu_count(),
              "load_before": load_before, "load_after": _load()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
