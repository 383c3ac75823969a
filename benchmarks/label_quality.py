"""How good were a run's pseudo labels? Scored against the true labels of a pool with known labels.

    python benchmarks/label_quality.py runs/fmnist [runs/fmnist-hard ...]

For each finished run whose pool is the dataset's own remainder (``data.labels_per_class`` moved
the labels it did not keep there, as the shipped digits and Fashion-MNIST configs do), each
iteration's label store (``label-i``: every pool image, as the teacher labeled it) and selection
(``select-i``: the stream the student trained on, copies counted) are joined by key with the
labels the pool's images really have. Per iteration it prints:

  pool acc.      the teacher's top-1 pseudo label, right on this share of the pool
  p(true)        mean probability the student's targets give the true class (soft labels: the
                 teacher's probability; hard labels: 1 where the top-1 is right)
  pool ECE       expected calibration error of the teacher's stored probabilities on the pool
  stream acc.    top-1 accuracy of the images the student trained on, copies counted
  worst class    the lowest per-class stream accuracy (by true class), and which class
  at threshold   for 0.5 / 0.7 / 0.9: the share of the pool kept and its accuracy (what a higher
                 ``pseudo.threshold`` would have traded)

The labels are the stores the run wrote, read as the student read them; nothing is relabeled,
so a comparison of two runs (``pseudo.tta``, ``pseudo.calibrate``, another teacher) is a
comparison of what their students were taught. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from noisystudent.config.schema import load_config
from noisystudent.data.datasets import ImageSet, SubsetImageSet
from noisystudent.data.splits import DataSplits, build_splits
from noisystudent.label.calibration import expected_calibration_error
from noisystudent.label.select import Selection
from noisystudent.label.store import LabelStore, soft_targets
from noisystudent.runtime.rundir import CONFIG, SELECTION, iteration_of, label_stage, select_stage

THRESHOLDS = (0.5, 0.7, 0.9)


def _true_target(images: ImageSet, i: int) -> int:
    """The true class of image ``i`` of a view that dropped its targets (the pool does): the
    first set below it that still has them."""
    while images.targets is None:
        if not isinstance(images, SubsetImageSet):
            return -1  # a part with no labels at all (a torchvision dataset's unlabeled split)
        images, i = images.base, int(images.indices[i])
    return int(images.targets[i])


def run_splits(run: Path) -> DataSplits:
    """The splits ``run`` made (its own config and seed); exits for a pool named by
    ``data.unlabeled``, whose true labels cannot be known."""
    cfg = load_config(run / CONFIG)
    if cfg.data.unlabeled or cfg.data.unlabeled_dir:
        sys.exit(f"{run}: its pool is data.unlabeled ({cfg.data.unlabeled or cfg.data.unlabeled_dir}), "
                 "whose true labels this benchmark cannot know")
    return build_splits(cfg.data, cfg.seed)


def pool_truth(run: Path) -> dict[str, int]:
    """Key -> true class of every pool image of ``run`` that has one (the split the run made)."""
    pool = run_splits(run).unlabeled
    truth = {pool.key(i): _true_target(pool, i) for i in range(len(pool))}
    return {k: t for k, t in truth.items() if t >= 0}


def store_quality(store_dir: Path, truth: dict[str, int], hard: bool = False) -> dict:
    """The label store's pseudo labels against the truth (every pool image), read as the run's
    students read them (``hard``: one-hot top-1, the run's ``pseudo.hard``)."""
    labels = LabelStore.open(store_dir, require_complete=True).to_pseudo_labels(hard)
    known = np.array([k in truth for k in labels.keys], dtype=bool)
    y = np.array([truth[k] for k in np.asarray(labels.keys, dtype=object)[known]], np.int64)
    pred, conf = labels.predicted[known], labels.confidence[known]
    # the teacher's distribution by the store's own top-k rebuild rule (soft, whatever the run trained on)
    probs = soft_targets(labels.topk_index[known], labels.topk_prob[known], labels.num_classes, hard=False)
    targets = labels.soft_targets(np.flatnonzero(known))  # what the student is taught (one-hot if hard)
    out = {"images": int(known.sum()), "num_classes": labels.num_classes, "hard": labels.hard,
           "temperature": labels.temperature, "pool_acc": float((pred == y).mean()),
           "p_true": float(targets[np.arange(len(y)), y].mean()),
           "pool_ece": expected_calibration_error(np.log(np.clip(probs, 1e-12, None)), y)}
    return {**out, **at_thresholds(conf, pred == y)}


def at_thresholds(confidence: np.ndarray, right: np.ndarray) -> dict:
    """For each of ``THRESHOLDS``: the share of the images kept at that confidence (``kept@t``) and
    the share of those whose label is right (``acc@t``, None when none is kept)."""
    out = {}
    for t in THRESHOLDS:
        kept = confidence >= t
        out[f"kept@{t}"] = float(kept.mean())
        out[f"acc@{t}"] = float(right[kept].mean()) if kept.any() else None
    return out


def stream_quality(selection_path: Path, truth: dict[str, int]) -> dict:
    """The selected stream (what the student trained on, copies counted) against the truth."""
    num_classes = Selection.open(selection_path).num_classes  # refuses a damaged or unfinished selection
    table = pq.read_table(selection_path, columns=["key", "copies", "predicted"])  # one row per image
    keys = table.column("key").to_pylist()
    known = np.array([k in truth for k in keys], dtype=bool)
    y = np.array([truth[k] for k, ok in zip(keys, known) if ok], np.int64)
    copies = table.column("copies").to_numpy()[known].astype(np.int64)
    pred = table.column("predicted").to_numpy()[known]
    right = (pred == y).astype(np.float64)
    per_class = [float(np.average(right[y == c], weights=copies[y == c])) if (y == c).any() else None
                 for c in range(num_classes)]
    scored = [(a, c) for c, a in enumerate(per_class) if a is not None]
    worst_acc, worst = min(scored) if scored else (None, None)
    return {"stream": int(copies.sum()), "stream_unique": int(known.sum()),
            "stream_acc": float(np.average(right, weights=copies)) if len(y) else None,
            "worst_class": worst, "worst_class_acc": worst_acc, "stream_acc_per_class": per_class}


def run_quality(run: Path) -> dict:
    """Every finished iteration of ``run``: its store and its selection, scored."""
    truth = pool_truth(run)
    iterations = sorted(i for p in run.iterdir() if p.is_dir() and p.name.startswith("label-")
                        and (i := iteration_of(p.name)) is not None)
    if not iterations:
        sys.exit(f"{run}: no label stage (label-1, ...) to score; is it a finished run with a student?")
    result, hard = {}, load_config(run / CONFIG).pseudo.hard
    for i in iterations:
        store = store_quality(run / label_stage(i), truth, hard)
        selection = run / select_stage(i) / SELECTION
        stream = stream_quality(selection, truth) if selection.exists() else {}
        result[label_stage(i)] = {**store, **stream}
    return result


def _row(run: Path, stage: str, q: dict) -> str:
    at = "  ".join(f"{t}: {100 * q[f'kept@{t}']:.1f}% at {100 * (q[f'acc@{t}'] or 0):.2f}" for t in THRESHOLDS)
    stream = (f"  stream acc. {100 * q['stream_acc']:.2f} ({q['stream']} items, worst class {q['worst_class']} "
              f"{100 * q['worst_class_acc']:.2f})" if q.get("stream_acc") is not None else "")
    return (f"{run}/{stage}: pool acc. {100 * q['pool_acc']:.2f}  p(true) {q['p_true']:.3f}  "
            f"pool ECE {q['pool_ece']:.3f}{stream}\n    at threshold {at}")


def run_dirs(argv: list[str] | None, description: str) -> list[Path]:
    """The run directories named on the command line; exits for one without a config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    runs = parser.parse_args(argv).runs
    for run in runs:
        if not (run / CONFIG).exists():
            sys.exit(f"{run}: not a run directory (no {CONFIG})")
    return runs


def main(argv: list[str] | None = None) -> dict:
    results = {}
    for run in run_dirs(argv, __doc__.split("\n")[0]):
        results[str(run)] = run_quality(run)
        for stage, q in results[str(run)].items():
            print(_row(run, stage, q))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
