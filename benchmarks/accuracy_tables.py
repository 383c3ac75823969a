"""The accuracy benchmark's variant names and its tables: means over seeds, the Noisy Student
gain (the headline), the gap closed against the oracles, the plateau check and the plot.
``benchmarks/accuracy.py`` plans and runs the variants; this module only reads their results."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from noisystudent.outcome import still_improving

CHAINS = ("noisy-student", "no-noise")  # whole chains from the seed's teacher
# the chain's first student with one ablation: the other kind of pseudo labels than the config's
# (hard-labels, or soft-labels for a config with hard labels), then no class balancing
LABEL_ABLATIONS = ("hard-labels", "soft-labels", "no-balancing")
# out-of-domain variants: (hard labels, confidence threshold), all the chain's first student
OOD_VARIANTS = {"ood-soft-t0.3": (False, 0.3), "ood-hard-t0.3": (True, 0.3),
                "ood-soft-t0": (False, 0.0), "ood-hard-t0": (True, 0.0)}
ORACLES = ("oracle", "oracle-converged")
# the final student's architecture trained like the teacher, on the labeled images alone: what the
# larger model buys without the unlabeled pool (Noisy Student has to beat it, not just the teacher)
SUPERVISED_FINAL = "supervised-final"
REFERENCES = ("teacher", SUPERVISED_FINAL, *ORACLES)  # supervised runs: one stage each
COMPARE_WITH = {"no-noise": "noisy-student", "no-iteration": "noisy-student", SUPERVISED_FINAL: "noisy-student",
                **{name: "noisy-student-iter1" for name in LABEL_ABLATIONS},
                "ood-hard-t0.3": "ood-soft-t0.3", "ood-hard-t0": "ood-soft-t0", "ood-soft-t0": "ood-soft-t0.3"}


def precision_counts(per_seed: list[dict[str, dict]]) -> dict[str, int]:
    """How many of the reported stages trained in each precision (``precision: auto`` decides per
    stage by timing; cached converged oracles count as they were trained)."""
    counts: dict[str, int] = {}
    for results in per_seed:
        for r in results.values():
            key = r.get("precision") or "unknown"
            counts[key] = counts.get(key, 0) + 1
    return counts


def aggregate(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    table = {}
    # a variant missing from a seed (an oracle cached for some seeds only, with --no-oracles) is left out
    for name in (n for n in per_seed[0] if all(n in r for r in per_seed)):
        accs = [r[name]["test_top1"] for r in per_seed]
        secs = [r[name]["seconds"] for r in per_seed]
        walls = [r[name].get("wall_seconds") for r in per_seed]
        table[name] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                       "seconds": statistics.mean(secs), "runs": accs,
                       "val_mean": statistics.mean(r[name]["val_top1"] for r in per_seed),
                       "wall_seconds": None if None in walls else statistics.mean(walls)}
    return table


def _gap(student: float, teacher: float, oracle: float) -> float:
    # undefined (nan) unless the oracle beats the teacher: e.g. --quick's capped oracle
    return (student - teacher) / (oracle - teacher) if oracle > teacher else float("nan")


def gap_closed(table: dict, name: str, oracle: str = "oracle") -> float:
    """(student - teacher) / (oracle - teacher), on the means over seeds; ``oracle`` is "oracle"
    (compute-matched) or "oracle-converged"; nan when the run has no such oracle (``--no-oracles``)."""
    if oracle not in table:
        return float("nan")
    return _gap(table[name]["mean"], table["teacher"]["mean"], table[oracle]["mean"])


def gap_closed_per_seed(per_seed: list[dict[str, dict]], name: str, oracle: str = "oracle") -> list[float]:
    """Each seed's own gap closed (its teacher and oracle), for the spread; nan for a seed without
    that oracle."""
    return [_gap(r[name]["test_top1"], r["teacher"]["test_top1"], r[oracle]["test_top1"]) if oracle in r
            else float("nan") for r in per_seed]


def baseline_variant(per_seed: list[dict[str, dict]]) -> str:
    """The yardstick of the Noisy Student gain: the final architecture on the labels alone
    (supervised-final), or the teacher when it has the final architecture."""
    return SUPERVISED_FINAL if SUPERVISED_FINAL in per_seed[0] else "teacher"


def ns_gain(per_seed: list[dict[str, dict]], name: str = "noisy-student") -> dict:
    """``name`` minus the baseline, test top-1 points, per seed then mean and std (the headline);
    ``pays``: the mean is positive and more than twice the std."""
    base = baseline_variant(per_seed)
    test = [r[name]["test_top1"] - r[base]["test_top1"] for r in per_seed]
    val = [r[name]["val_top1"] - r[base]["val_top1"] for r in per_seed]
    mean, std = statistics.mean(test), statistics.stdev(test) if len(test) > 1 else 0.0
    return {"mean": round(mean, 2), "std": round(std, 2), "per_seed": [round(g, 2) for g in test],
            "val_mean": round(statistics.mean(val), 2), "vs": base, "pays": mean > 0 and mean > 2 * std}


def plateau_check(per_seed: list[dict[str, dict]], name: str) -> list[dict]:
    """Per seed, whether ``name`` reached its plateau (the pipeline's own rule,
    :func:`noisystudent.outcome.still_improving`: its best epoch not among its last few), so a gain
    is not bought with an undertrained baseline."""
    out = []
    for r in per_seed:
        best, epochs = r[name].get("best_epoch"), r[name].get("epochs")
        out.append({"best_epoch": best, "epochs": epochs,
                    "plateau": None if best is None or not epochs else not still_improving(r[name])})
    return out


def _rounded(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)  # JSON has no NaN


def shown_gap(gap: float | None) -> str:
    """A gap closed as printed: n/a without an oracle, or with one below its teacher (nan, or None
    once rounded for JSON)."""
    return "n/a" if gap is None or math.isnan(gap) else f"{gap:.2f}"


def _color(name: str) -> str:
    if name in REFERENCES:
        return "#888"
    return "#3a7" if name.startswith("noisy") else "#58b" if name in OOD_VARIANTS else "#c84"


def plot(table: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(max(10.5, 0.95 * len(names)), 4.6))
    means = [table[n]["mean"] for n in names]
    ax.bar(names, means, yerr=[table[n]["std"] for n in names], capsize=4, color=[_color(n) for n in names])
    for i, n in enumerate(names):  # each seed as a dot: the spread the error bar summarises
        ax.plot([i] * len(table[n]["runs"]), table[n]["runs"], "k.", ms=4, alpha=0.6)
    lo = min(min(table[n]["runs"]) for n in names) - 2
    ax.set_ylim(max(0, lo), min(100, max(max(table[n]["runs"]) for n in names) + 2))
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=10)
    for i, m in enumerate(means):
        ax.text(i + 0.28, m, f"{m:.1f}", ha="left", va="center", fontsize=8)
    # each variant against the run it is compared with (a dashed line at that run's mean)
    refs = [(i, COMPARE_WITH[n]) for i, n in enumerate(names) if COMPARE_WITH.get(n) in table]
    for k, (i, ref) in enumerate(refs):
        ax.hlines(table[ref]["mean"], i - 0.4, i + 0.4, colors="#3a7", linestyles="dashed",
                  label="the run it is compared with" if k == 0 else None)
    if refs:
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_xticks(range(len(names)), [f"{n}\n(vs {COMPARE_WITH[n].replace('noisy-student', 'NS')})"
                                      if n in COMPARE_WITH else n for n in names])
    plt.xticks(rotation=30, ha="right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def noise_pays(table: dict) -> dict | None:
    """Noisy Student minus the no-noise chain (mean test top-1 points) and whether it is beyond the
    seed spread (larger than the std of either); None without a no-noise run."""
    if "no-noise" not in table:
        return None
    ns, plain = table["noisy-student"], table["no-noise"]
    points = ns["mean"] - plain["mean"]
    return {"points": round(points, 2), "beyond_spread": points > max(ns["std"], plain["std"])}


def secondary_figures(table: dict, per_seed: list[dict[str, dict]]) -> dict:
    """The figures beside the headline: test top-1 per variant, the gap closed against either oracle
    (overall, per variant, per seed) and each ablation against its reference."""
    students = [n for n in table if n != "teacher" and n not in ORACLES]
    per_seed_gaps = {o: {n: [_rounded(g) for g in gap_closed_per_seed(per_seed, n, o)] for n in CHAINS if n in table}
                     for o in ORACLES}
    return {"test_top1": {n: round(v["mean"], 2) for n, v in table.items()},
            "test_top1_std": {n: round(v["std"], 2) for n, v in table.items()},
            "gap_closed": _rounded(gap_closed(table, "noisy-student")),
            "gap_closed_converged": _rounded(gap_closed(table, "noisy-student", "oracle-converged")),
            "gap_closed_by_variant": {n: _rounded(gap_closed(table, n)) for n in students},
            "gap_closed_converged_by_variant": {n: _rounded(gap_closed(table, n, "oracle-converged"))
                                                for n in students},
            # each variant minus its reference (mean test top-1 points; negative: the variant is worse)
            "ablation_delta": {n: {"vs": ref, "points": round(table[n]["mean"] - table[ref]["mean"], 2)}
                               for n, ref in COMPARE_WITH.items() if n in table and ref in table},
            "gap_closed_per_seed": per_seed_gaps["oracle"],
            "gap_closed_converged_per_seed": per_seed_gaps["oracle-converged"]}


def print_table(table: dict, result: dict) -> None:
    students = [n for n in table if n != "teacher" and n not in ORACLES]
    print(f"{'variant':<20} {'test top-1':>16} {'val top-1':>9} {'gap closed':>11} {'(converged)':>11} {'time':>8}  vs")
    for n, v in table.items():
        g, gc = ("", "") if n not in students else (shown_gap(gap_closed(table, n)),
                                                     shown_gap(gap_closed(table, n, "oracle-converged")))
        d = result["ablation_delta"].get(n)
        vs = f"  {d['points']:+.2f} vs {d['vs']}" if d else ""
        print(f"{n:<20} {v['mean']:>8.2f} +- {v['std']:<5.2f} {v['val_mean']:>9.2f} {g:>11} {gc:>11} "
              f"{v['seconds']:>7.0f}s{vs}")
