"""Reproduce the paper's claims at small scale, with seeds and ablations.

    python benchmarks/accuracy.py --jobs 2              # Fashion-MNIST, 3 seeds, on 2 cores
    python benchmarks/accuracy.py --quick               # smoke run (< 5 min)
    python benchmarks/accuracy.py --dataset digits      # a second data point

Variants (each over the seeds; the test split is only ever reported, never used for selection):
  teacher              supervised on the labeled images only, with noise
  noisy-student-iterK  the chain's K-th student (each one but the last is reported too)
  noisy-student        the config's whole chain (equal, then larger student, ...)
  no-noise             the same chain, students without augmentation, dropout or stochastic depth
  hard-labels          the first student of the chain with hard pseudo labels
  no-balancing         the first student of the chain without class balancing
  no-iteration         one student of the final architecture, taught by the teacher directly
  oracle               the final architecture trained on every training label (supervised), for
                       the same number of epochs as that student
Each seed's teacher is trained once; every other variant of that seed starts from it
(``teacher.pretrained`` + ``teacher.epochs=0``), so variants differ only in what they ablate.
The label ablations train one iteration and compare with noisy-student-iter1, as the paper
studies them (one B0 student from a B0 teacher); a whole chain per ablation would not fit the
90-minute budget. ``COMPARE_WITH`` names each ablation's reference.

Work is scheduled per (seed, variant) over ``--jobs`` worker processes with one torch thread
each, longest tasks first, so all cores stay busy to the end. The last line printed is a JSON
object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from noisystudent.config.schema import ABLATIONS, load_config
from noisystudent.pipeline import run_pipeline

CONFIGS = {"fashion-mnist": "configs/fashion-mnist.yaml", "digits": "configs/digits.yaml"}
QUICK = {
    "fashion-mnist": ["teacher.epochs=15", "train.epochs=1", "data.max_unlabeled=3000",
                      "data.val_per_class=30"],
    "digits": ["teacher.epochs=100", "train.epochs=15"],
}
# The oracle sees every training label; --quick caps it so the smoke run stays short.
QUICK_ORACLE = {"fashion-mnist": ["data.labels_per_class=400"], "digits": []}
CHAINS = ("noisy-student", "no-noise")  # whole chains from the seed's teacher
FIRST_STUDENT = ("hard-labels", "no-balancing")  # the chain's first student, with the ablation
COMPARE_WITH = {"no-noise": "noisy-student", "no-iteration": "noisy-student",
                "hard-labels": "noisy-student-iter1", "no-balancing": "noisy-student-iter1"}


@dataclass(order=True)
class Task:
    """One pipeline run: a variant of one seed. Lower ``priority`` starts first."""

    priority: tuple
    variant: str = field(compare=False)
    seed: int = field(compare=False)
    overrides: list[str] = field(compare=False)
    ablation: str | None = field(compare=False, default=None)


def run_task(config: str, task: Task, out: Path) -> dict:
    """Run one variant in this (worker) process; returns its summary."""
    torch.set_num_threads(1)
    cfg = load_config(config, task.overrides, task.ablation)
    return run_pipeline(cfg, out / f"seed{task.seed}" / task.variant, progress=False)


def teacher_task(config: str, seed: int, extra: list[str]) -> Task:
    return Task((0, seed), "teacher", seed, [f"seed={seed}", *extra, "students=[]"])


def oracle_task(config: str, seed: int, extra: list[str], oracle_extra: list[str]) -> Task:
    """The final student architecture on every training label, for as many epochs as that student."""
    cfg = load_config(config, [f"seed={seed}", *extra])
    final = cfg.students[-1]
    return Task((2, seed), "oracle", seed,
                [f"seed={seed}", *extra, "data.labels_per_class=null", f"teacher.model={final.model}",
                 f"teacher.epochs={cfg.stage_epochs(final)}", "students=[]", *oracle_extra])


def _only_student(stage) -> str:
    """A ``students=[...]`` override for one student exactly as the chain trains it (its lr, epochs...)."""
    settings = ", ".join(f"{k}: {v}" for k, v in dataclasses.asdict(stage).items() if v is not None)
    return f"students=[{{{settings}}}]"


def student_tasks(config: str, seed: int, extra: list[str], teacher_ckpt: Path) -> list[Task]:
    """Every variant that learns from the seed's teacher, longest first: the whole chains, the final
    architecture taught directly, then the one-iteration label ablations."""
    base = [f"seed={seed}", *extra, f"teacher.pretrained={teacher_ckpt}", "teacher.epochs=0"]
    students = load_config(config, [f"seed={seed}", *extra]).students
    # an ablation variant is named after the config ablation it applies
    tasks = [Task((1, seed, i), v, seed, base, v if v in ABLATIONS else None) for i, v in enumerate(CHAINS)]
    tasks.append(Task((2, seed, 0), "no-iteration", seed, base + [_only_student(students[-1])]))
    tasks += [Task((2, seed, 1 + i), v, seed, base + [_only_student(students[0])], v)
              for i, v in enumerate(FIRST_STUDENT)]
    return tasks


def variant_order(num_students: int) -> list[str]:
    """The table's rows: teacher, each iteration of the chain, the ablations, the oracle."""
    iterations = [f"noisy-student-iter{k}" for k in range(1, num_students)]
    return ["teacher", *iterations, "noisy-student", "no-noise", *FIRST_STUDENT, "no-iteration", "oracle"]


def run_benchmark(config: str, seeds: list[int], extra: list[str], oracle_extra: list[str], out: Path,
                  jobs: int) -> dict[int, dict[str, dict]]:
    """All variants of all seeds: {seed: {variant: {"test_top1", "val_top1", "seconds"}}}."""
    results: dict[int, dict[str, dict]] = {s: {} for s in seeds}
    ready = sorted([teacher_task(config, s, extra) for s in seeds]
                   + [oracle_task(config, s, extra, oracle_extra) for s in seeds])
    running: dict[Future, Task] = {}

    def record(seed: int, name: str, stage: dict, seconds: float) -> None:
        results[seed][name] = {"test_top1": stage["test_top1"], "val_top1": stage["val_top1"], "seconds": seconds}
        print(f"  seed {seed} {name:<20} test top-1 {stage['test_top1']:6.2f}  val {stage['val_top1']:6.2f}  "
              f"({seconds:.0f}s)", file=sys.stderr, flush=True)

    ctx = mp.get_context("spawn")  # a fresh interpreter per worker: no forked torch thread pools
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        while ready or running:
            while ready and len(running) < jobs:  # keep exactly `jobs` tasks in flight
                task = ready.pop(0)
                running[pool.submit(run_task, config, task, out)] = task
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                summary = future.result()
                stages = summary["stages"]
                if task.variant in ("teacher", "oracle"):  # one supervised stage
                    record(task.seed, task.variant, stages[0], stages[0]["seconds"])
                    if task.variant == "teacher":
                        ckpt = out / f"seed{task.seed}" / "teacher" / "teacher" / "model.pt"
                        ready = sorted(ready + student_tasks(config, task.seed, extra, ckpt))
                else:
                    # students only: the teacher's time is the teacher variant's
                    seconds = sum(s["seconds"] for s in stages[1:])
                    if task.variant == "noisy-student":  # each iteration before the last, cumulative time
                        for k in range(1, len(stages) - 1):
                            record(task.seed, f"noisy-student-iter{k}", stages[k],
                                   sum(s["seconds"] for s in stages[1:k + 1]))
                    record(task.seed, task.variant, stages[-1], seconds)
    order = variant_order(len(load_config(config, extra).students))
    return {s: {n: r[n] for n in order if n in r} for s, r in results.items()}


def aggregate(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    table = {}
    for name in per_seed[0]:
        accs = [r[name]["test_top1"] for r in per_seed]
        secs = [r[name]["seconds"] for r in per_seed]
        table[name] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                       "seconds": statistics.mean(secs), "runs": accs,
                       "val_mean": statistics.mean(r[name]["val_top1"] for r in per_seed)}
    return table


def _gap(student: float, teacher: float, oracle: float) -> float:
    # undefined (nan) unless the oracle beats the teacher: e.g. --quick's capped oracle
    return (student - teacher) / (oracle - teacher) if oracle > teacher else float("nan")


def gap_closed(table: dict, name: str) -> float:
    """(student - teacher) / (oracle - teacher), on the means over seeds."""
    return _gap(table[name]["mean"], table["teacher"]["mean"], table["oracle"]["mean"])


def gap_closed_per_seed(per_seed: list[dict[str, dict]], name: str) -> list[float]:
    """Each seed's own gap closed (its teacher and oracle), for the spread."""
    return [_gap(r[name]["test_top1"], r["teacher"]["test_top1"], r["oracle"]["test_top1"]) for r in per_seed]


def _rounded(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)  # JSON has no NaN


def plot(table: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(10.5, 4.4))
    means = [table[n]["mean"] for n in names]
    ax.bar(names, means, yerr=[table[n]["std"] for n in names], capsize=4,
           color=["#888" if n in ("teacher", "oracle") else "#3a7" if n.startswith("noisy") else "#c84"
                  for n in names])
    for i, n in enumerate(names):  # each seed as a dot: the spread the error bar summarises
        ax.plot([i] * len(table[n]["runs"]), table[n]["runs"], "k.", ms=4, alpha=0.6)
    lo = min(min(table[n]["runs"]) for n in names) - 2
    ax.set_ylim(max(0, lo), min(100, max(max(table[n]["runs"]) for n in names) + 2))
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    for i, m in enumerate(means):
        ax.text(i + 0.28, m, f"{m:.1f}", ha="left", va="center", fontsize=8)
    # each ablation against the run it removes one thing from (a dashed line at that run's mean)
    refs = [(i, COMPARE_WITH[n]) for i, n in enumerate(names) if COMPARE_WITH.get(n) in table]
    for k, (i, ref) in enumerate(refs):
        ax.hlines(table[ref]["mean"], i - 0.4, i + 0.4, colors="#3a7", linestyles="dashed",
                  label="the Noisy Student run it ablates" if k == 0 else None)
    if refs:
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_xticks(range(len(names)), [f"{n}\n(vs {COMPARE_WITH[n].replace('noisy-student', 'NS')})"
                                      if n in COMPARE_WITH else n for n in names])
    plt.xticks(rotation=30, ha="right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(CONFIGS), default="fashion-mnist")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer epochs and images, 1 seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes, one torch thread each (default: up to 2; use the core count)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every variant (e.g. train.epochs=4); may repeat")
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    extra = (QUICK[args.dataset] if args.quick else []) + args.overrides
    oracle_extra = QUICK_ORACLE[args.dataset] if args.quick else []
    out = args.out / f"{args.dataset}{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.time()
    results = run_benchmark(CONFIGS[args.dataset], seeds, extra, oracle_extra, out, args.jobs)
    per_seed = [results[s] for s in seeds]
    table = aggregate(per_seed)
    ns_gaps = gap_closed_per_seed(per_seed, "noisy-student")
    nn_gaps = gap_closed_per_seed(per_seed, "no-noise")
    result = {"dataset": args.dataset, "quick": args.quick, "seeds": seeds, "overrides": extra,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.jobs} worker(s) x 1 thread",
              "minutes": round((time.time() - start) / 60, 1),
              "test_top1": {n: round(v["mean"], 2) for n, v in table.items()},
              "test_top1_std": {n: round(v["std"], 2) for n, v in table.items()},
              "gap_closed": _rounded(gap_closed(table, "noisy-student")),
              "gap_closed_by_variant": {n: _rounded(gap_closed(table, n)) for n in table
                                        if n not in ("teacher", "oracle")},
              # each ablation minus what it ablates (mean test top-1 points; negative: the ablation hurts)
              "ablation_delta": {n: {"vs": ref, "points": round(table[n]["mean"] - table[ref]["mean"], 2)}
                                 for n, ref in COMPARE_WITH.items() if n in table and ref in table},
              "gap_closed_per_seed": {"noisy-student": [_rounded(g) for g in ns_gaps],
                                      "no-noise": [_rounded(g) for g in nn_gaps]}}
    out.mkdir(parents=True, exist_ok=True)
    plot(table, out / "accuracy.png", f"{args.dataset}: test top-1 over {len(seeds)} seed(s)")
    (out / "accuracy.json").write_text(json.dumps({"table": table, **result}, indent=2, allow_nan=False))
    print(f"{'variant':<20} {'test top-1':>16} {'val top-1':>9} {'gap closed':>11} {'time':>8}  vs")
    for n, v in table.items():
        g = "" if n in ("teacher", "oracle") else f"{gap_closed(table, n):.2f}"
        d = result["ablation_delta"].get(n)
        vs = f"  {d['points']:+.2f} vs {d['vs']}" if d else ""
        print(f"{n:<20} {v['mean']:>8.2f} +- {v['std']:<5.2f} {v['val_mean']:>9.2f} {g:>11} {v['seconds']:>7.0f}s{vs}")
    print(f"plot: {out / 'accuracy.png'}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
