"""Reproduce the paper's claims at small scale, with seeds and ablations.

    python benchmarks/accuracy.py                       # Fashion-MNIST, 3 seeds (~80 min on 2 cores)
    python benchmarks/accuracy.py --quick               # smoke run (< 5 min)
    python benchmarks/accuracy.py --dataset digits      # a second data point

Variants (each over the seeds; the test split is only ever reported, never used for selection):
  teacher        supervised on the labeled images only, with noise
  noisy-student  the config's chain (equal, then larger student)
  no-noise       the same chain, students without augmentation, dropout or stochastic depth
  hard-labels    the same chain with hard pseudo labels
  no-balancing   the same chain without class balancing
  no-iteration   one student of the final architecture, taught by the teacher directly
  oracle         the final architecture trained on every training label (supervised)
Ablations reuse the seed's teacher (``teacher.pretrained`` + ``teacher.epochs=0``), so they differ
from noisy-student only in what they ablate. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from noisystudent.config import load_config
from noisystudent.pipeline import run_pipeline

CONFIGS = {"fashion-mnist": "configs/fashion-mnist.yaml", "digits": "configs/digits.yaml"}
QUICK = {
    "fashion-mnist": ["teacher.epochs=15", "train.epochs=1", "data.max_unlabeled=3000",
                      "data.val_per_class=30"],
    "digits": ["teacher.epochs=100", "train.epochs=15"],
}
# The oracle sees every training label; --quick caps it so the smoke run stays short.
QUICK_ORACLE = {"fashion-mnist": ["data.labels_per_class=400"], "digits": []}
ABLATIONS = ("no-noise", "hard-labels", "no-balancing")


def run_variant(config: str, overrides: list[str], out: Path, ablation: str | None = None) -> dict:
    cfg = load_config(config, overrides, ablation)
    return run_pipeline(cfg, out, progress=False)


def benchmark_seed(config: str, seed: int, extra: list[str], out: Path,
                   oracle_extra: list[str] = ()) -> dict[str, dict]:
    """All variants for one seed: {variant: {"test_top1", "val_top1", "seconds"}}."""
    base = [f"seed={seed}", *extra]
    results: dict[str, dict] = {}

    def record(name: str, summary: dict, stage: int = -1, seconds: float | None = None) -> None:
        s = summary["stages"][stage]
        results[name] = {"test_top1": s["test_top1"], "val_top1": s["val_top1"],
                         "seconds": seconds if seconds is not None else summary["seconds"]}
        print(f"  seed {seed} {name:<14} test top-1 {s['test_top1']:6.2f}  val {s['val_top1']:6.2f}  "
              f"({results[name]['seconds']:.0f}s)", file=sys.stderr, flush=True)

    ns = run_variant(config, base, out / "noisy-student")
    teacher_seconds = ns["stages"][0]["seconds"]
    record("teacher", ns, 0, teacher_seconds)
    record("noisy-student-iter1", ns, 1)
    record("noisy-student", ns)
    teacher = [f"teacher.pretrained={out / 'noisy-student' / 'teacher' / 'model.pt'}", "teacher.epochs=0"]
    for ablation in ABLATIONS:
        record(ablation, run_variant(config, base + teacher, out / ablation, ablation))
    final_model = load_config(config, base).students[-1]
    record("no-iteration", run_variant(config, base + teacher + [f"students=[{{model: {final_model.model}}}]"],
                                       out / "no-iteration"))
    # Oracle: every training label (minus the validation split), no unlabeled pool to speak of.
    oracle = base + ["data.labels_per_class=null", f"teacher.model={final_model.model}",
                     f"teacher.epochs={load_config(config, base).stage_epochs(final_model)}",
                     "students=[]", *oracle_extra]
    summary = run_variant(config, oracle, out / "oracle")
    record("oracle", summary, 0, summary["stages"][0]["seconds"])
    return results


def _seed_job(job: tuple) -> dict[str, dict]:
    return benchmark_seed(*job)


def aggregate(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    table = {}
    for name in per_seed[0]:
        accs = [r[name]["test_top1"] for r in per_seed]
        secs = [r[name]["seconds"] for r in per_seed]
        table[name] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                       "seconds": statistics.mean(secs), "runs": accs}
    return table


def gap_closed(table: dict, name: str) -> float:
    t, o = table["teacher"]["mean"], table["oracle"]["mean"]
    return (table[name]["mean"] - t) / (o - t) if o != t else float("nan")


def plot(table: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    means = [table[n]["mean"] for n in names]
    ax.bar(names, means, yerr=[table[n]["std"] for n in names], capsize=4,
           color=["#888" if n in ("teacher", "oracle") else "#3a7" if n.startswith("noisy") else "#c84"
                  for n in names])
    lo = min(means) - 3
    ax.set_ylim(max(0, lo), min(100, max(means) + 2))
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    for i, m in enumerate(means):
        ax.text(i, m + 0.2, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    plt.xticks(rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(CONFIGS), default="fashion-mnist")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer epochs and images, 1 seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"))
    parser.add_argument("--jobs", type=int, default=1,
                        help="seeds run in parallel processes, one torch thread each (use the core count)")
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    extra = QUICK[args.dataset] if args.quick else []
    out = args.out / f"{args.dataset}{'-quick' if args.quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.time()
    oracle_extra = QUICK_ORACLE[args.dataset] if args.quick else []
    jobs = [(CONFIGS[args.dataset], s, extra, out / f"seed{s}", oracle_extra) for s in seeds]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            per_seed = list(pool.map(_seed_job, jobs))
    else:
        per_seed = [benchmark_seed(*job) for job in jobs]
    table = aggregate(per_seed)
    result = {"dataset": args.dataset, "quick": args.quick, "seeds": seeds,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{args.jobs} parallel seed job(s)",
              "minutes": (time.time() - start) / 60,
              "test_top1": {n: round(v["mean"], 2) for n, v in table.items()},
              "test_top1_std": {n: round(v["std"], 2) for n, v in table.items()},
              "gap_closed": round(gap_closed(table, "noisy-student"), 3),
              "gap_closed_by_variant": {n: round(gap_closed(table, n), 3) for n in table if n not in ("teacher", "oracle")}}
    out.mkdir(parents=True, exist_ok=True)
    plot(table, out / "accuracy.png", f"{args.dataset}: test top-1 over {len(seeds)} seed(s)")
    (out / "accuracy.json").write_text(json.dumps({"table": table, **result}, indent=2))
    print(f"{'variant':<20} {'test top-1':>16} {'gap closed':>11} {'time':>8}")
    for n, v in table.items():
        g = "" if n in ("teacher", "oracle") else f"{gap_closed(table, n):.2f}"
        print(f"{n:<20} {v['mean']:>8.2f} +- {v['std']:<5.2f} {g:>11} {v['seconds']:>7.0f}s")
    print(f"plot: {out / 'accuracy.png'}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
