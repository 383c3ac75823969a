"""Training throughput on a CPU shared with one other busy process, against the same CPU idle.

Our training loop (``train_classifier``: the digits images at ``--size`` px through the noisy
transform, ``--batch`` labeled + ``--batch`` pseudo-labeled images per step, ``train.precision``
auto) runs in worker processes, each a fresh ``python`` that gets noisystudent's CPU thread choice
exactly as ``noisystudent run`` does. Each round measures, back to back:

* ``idle``: a worker alone;
* ``shared``: a worker started while a second copy of the same loop (the competing CPU-bound
  process) trains: the start-up choice;
* ``joined``: a worker that is training alone when the competitor starts, measured from a few
  seconds after the competitor is up: how the run adapts while it runs.

The benchmark starts and stops the competitor. Rates are read off clock ticks the workers print
(set-up and warm-up excluded); ``shared_ratio`` and ``joined_ratio`` are medians of the per-round
ratios to ``idle`` (an even split of the cores would be 0.5). ``--baseline`` turns noisystudent's
thread choice off (``NOISYSTUDENT_CPU_TUNING=0``: PyTorch's defaults), ``--env K=V`` sets a
variable in every worker (e.g. ``--env OMP_WAIT_POLICY=PASSIVE``).

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

READY = "READY"  # a worker prints this when its measured run starts
TICK = "TICK"  # and this every --tick steps of it


def worker(args: argparse.Namespace) -> None:
    """One process: warm up (and calibrate the precision), then time ``--steps`` training steps."""
    import dataclasses

    import noisystudent

    noisystudent.configure_cpu()  # first: the start-up CPU settings must precede `import torch`
    import numpy as np
    import torch
    from torch.utils.data import Dataset, Subset

    from noisystudent.config.schema import load_config
    from noisystudent.data.datasets import TransformedSet
    from noisystudent.data.splits import build_splits
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

    class Ticks(Dataset):
        """The labeled images, printing a TICK line (clock, step, threads) every --tick steps: the
        parent reads the rate of any stretch of the run off these lines."""

        def __init__(self, dataset):
            self.dataset, self.items = dataset, 0

        def __len__(self) -> int:
            return len(self.dataset)

        def __getitem__(self, i: int):
            if self.items % (args.batch * args.tick) == 0:  # the first image of a step
                print(TICK, time.monotonic(), self.items // args.batch, torch.get_num_threads(), flush=True)
            self.items += 1
            return self.dataset[i]

    def run(steps: int, data):
        train_cfg = dataclasses.replace(cfg.train, eval_every=10**6)
        return train_classifier(model, data, val, train_cfg, num_classes=splits.num_classes,
                                epochs=(steps - 0.5) / per_epoch, lr=cfg.train.lr, ctx=DistContext(),
                                pseudo=pseudo, seed=0, progress=False)

    first = run(3, labeled)  # warm-up: kernel caches, and the precision calibration (cached for the process)
    print(READY, json.dumps({"threads": torch.get_num_threads(), "precision": first.precision,
                             "precision_info": first.precision_info, "cpu": cpu_settings()}), flush=True)
    run(args.steps + 1, Ticks(labeled))  # one more: the last TICK marks the end of the measured steps


def _spawn(args: argparse.Namespace, steps: int, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--worker", "--steps", str(steps), "--model", args.model,
           "--size", str(args.size), "--batch", str(args.batch), "--precision", args.precision,
           "--tick", str(args.tick)]
    if args.channels_last:
        cmd.append("--channels-last")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)


class Worker:
    """A worker process and the lines it prints: its READY report, then (clock, step, threads) ticks."""

    def __init__(self, args: argparse.Namespace, steps: int, env: dict):
        self.args, self.proc, self.ticks, self.ready = args, _spawn(args, steps, env), [], None

    def read(self) -> bool:
        """Read one line; False at the end of the output."""
        line = self.proc.stdout.readline()
        if not line:
            return False
        if line.startswith(READY):
            self.ready = json.loads(line[len(READY):])
        elif line.startswith(TICK):
            t, step, threads = line.split()[1:]
            self.ticks.append((float(t), int(step), int(threads)))
        return True

    def wait_ready(self) -> dict:
        while self.ready is None:
            if not self.read():
                raise SystemExit(f"worker failed ({self.proc.wait()})")
        return self.ready

    def rate(self, since: float = 0.0) -> tuple[float, int]:
        """img/s over the ticks from clock ``since`` on, and the threads at the last of them."""
        ticks = [t for t in self.ticks if t[0] >= since]
        (t0, s0, _), (t1, s1, threads) = ticks[0], ticks[-1]
        return (s1 - s0) * 2 * self.args.batch / (t1 - t0), threads

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _alone(args: argparse.Namespace, env: dict) -> dict:
    w = Worker(args, args.steps, env)
    while w.read():
        pass
    if w.proc.wait() != 0:
        raise SystemExit("worker failed")
    rate, threads = w.rate()
    return {"img_s": rate, "threads": threads, "ready": w.ready}


def _next_to(args: argparse.Namespace, env: dict) -> dict:
    """Started while the competitor trains: the start-up choice."""
    competitor = Worker(args, 10**7, env)
    try:
        competitor.wait_ready()
        return dict(_alone(args, env), competitor_threads=competitor.ready["threads"])
    finally:
        competitor.stop()


def _joined(args: argparse.Namespace, env: dict, settle: float) -> dict:
    """Training alone when the competitor starts: measured from ``settle`` s after the competitor
    is past its warm-up (how fast the run adapts is part of what is measured)."""
    w = Worker(args, 10**7, env)
    competitor = None
    try:
        w.wait_ready()
        while len(w.ticks) < 2:
            w.read()
        competitor = Worker(args, 10**7, env)
        competitor.wait_ready()
        since = time.monotonic() + settle
        while not w.ticks or w.ticks[-1][0] < since or w.ticks[-1][1] - next(
                s for t, s, _ in w.ticks if t >= since) < args.steps:
            if not w.read():
                raise SystemExit("worker failed")
        rate, threads = w.rate(since)
        return {"img_s": rate, "threads": threads, "competitor_threads": competitor.ready["threads"]}
    finally:
        w.stop()
        if competitor is not None:
            competitor.stop()


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ns_cnn_s_wide")
    parser.add_argument("--size", type=int, default=28, help="image size (px)")
    parser.add_argument("--batch", type=int, default=32, help="labeled images per step (as many pseudo-labeled)")
    parser.add_argument("--steps", type=int, default=40, help="measured training steps per run")
    parser.add_argument("--tick", type=int, default=5, help="steps between the workers' clock readings")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of one run of each kind")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--baseline", action="store_true", help="PyTorch's defaults (noisystudent's thread choice off)")
    parser.add_argument("--no-joined", action="store_true", help="skip the run the competitor joins")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="set in every worker")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    env = dict(os.environ)  # copied before noisystudent's start-up (configure_cpu) may set OMP_NUM_THREADS
    if args.baseline:
        env["NOISYSTUDENT_CPU_TUNING"] = "0"
    for kv in args.env:
        key, _, value = kv.partition("=")
        env[key] = value
    from noisystudent.runtime.cpu import RECHECK_SECONDS, cpu_description  # no torch in the parent
    load_before = _load()
    runs: dict[str, list[dict]] = {"idle": [], "shared": [], "joined": []}
    for r in range(args.repeats):
        # idle, then a fresh run next to the competitor, then a run the competitor joins; each
        # round measures all three back to back, so drift in the machine's load hits them alike
        runs["idle"].append(_alone(args, env))
        runs["shared"].append(_next_to(args, env))
        if not args.no_joined:
            runs["joined"].append(_joined(args, env, settle=RECHECK_SECONDS + 1.0))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['img_s']:.1f} img/s ({v[-1]['threads']} threads"
                                             + (f", competitor {v[-1]['competitor_threads']}" if k != "idle" else "")
                                             + ")" for k, v in runs.items() if v)
              + f" (load {_load()})", file=sys.stderr, flush=True)

    def median_ratio(kind: str) -> float | None:
        pairs = [s["img_s"] / i["img_s"] for i, s in zip(runs["idle"], runs[kind])]
        return round(statistics.median(pairs), 3) if pairs else None

    ready = runs["idle"][-1]["ready"]
    configured = ready["cpu"]["configured"]
    result = {"idle_img_s": round(statistics.median(r["img_s"] for r in runs["idle"]), 1),
              "shared_img_s": round(statistics.median(r["img_s"] for r in runs["shared"]), 1),
              "shared_ratio": median_ratio("shared"),
              "joined_img_s": (round(statistics.median(r["img_s"] for r in runs["joined"]), 1)
                               if runs["joined"] else None),
              "joined_ratio": median_ratio("joined"),
              "runs": {k: [round(r["img_s"], 1) for r in v] for k, v in runs.items()},
              "threads": {k: [r["threads"] for r in v] for k, v in runs.items()},
              "competitor_threads": [r["competitor_threads"] for r in runs["shared"] + runs["joined"]],
              "cpu_settings": "baseline (PyTorch defaults)" if args.baseline else "noisystudent",
              "cpu_env": ready["cpu"]["env"], "others_busy_cores_at_start": configured.get("threads", {}).get(
                  "others_busy_cores"),
              "precision": ready["precision"],
              "precision_info": {k: v for k, v in ready["precision_info"].items() if k != "cpu"},
              "model": args.model, "size": args.size, "images_per_step": 2 * args.batch, "steps": args.steps,
              "repeats": args.repeats, "cpu_model": cpu_description()["model"], "cores": os.cpu_count(),
              "load_before": load_before, "load_after": _load()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
