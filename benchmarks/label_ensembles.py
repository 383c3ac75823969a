"""Would better labels come from the chain's own models? Each trained model of a run, alone, with
flip test-time augmentation, and averaged with the others, scored on the pool's true labels.

    python benchmarks/label_ensembles.py runs/fmnist [runs/fmnist-seed1 ...]

For each finished run whose pool is the dataset's own remainder (as ``label_quality.py`` needs),
every training stage with a model (teacher, student-1, ...) labels the pool, the validation and
the test split again on clean images, as the labeler does (:func:`noisystudent.label.tta.labeling_model`,
``tta: none`` and ``flip``). Then, per split, top-1 accuracy of:

  <stage>            the model alone (the labels it gave, or would give, its student)
  <stage>+flip       the mean of its probabilities on the image and its mirror (``pseudo.tta: flip``)
  <a>+<b>            the mean of two models' probabilities: an ensemble of the chain's last teachers
  all                the mean of every model's flip average: each model and each view weighs the same

and for the pool, the share kept at a confidence of 0.5 / 0.7 / 0.9 and its accuracy. The pool
is the thing to read (it is what a next student would learn from); validation is what a recipe
may be chosen on; test is reported only. The last line is JSON.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch

from noisystudent.data.datasets import ImageSet, TransformedSet
from noisystudent.label.tta import labeling_model
from noisystudent.models.checkpoint import clean_transform, load_model
from noisystudent.runtime.rundir import MODEL, TEACHER, iteration_of

# benchmarks/ is on sys.path (the script's folder)
from label_quality import THRESHOLDS, _true_target, at_thresholds, run_dirs, run_splits

SPLITS = ("pool", "val", "test")


def chain_stages(run: Path) -> list[str]:
    """The run's models in chain order: the teacher, then student-1, student-2, ..."""
    students = sorted((p.name for p in run.iterdir() if p.name.startswith("student-") and (p / MODEL).is_file()),
                      key=iteration_of)
    return [TEACHER, *students] if (run / TEACHER / MODEL).is_file() else students


@torch.inference_mode()
def probabilities(model: torch.nn.Module, images: ImageSet, transform, batch_size: int = 512) -> np.ndarray:
    """Class probabilities of ``model`` (a labeling model: logits or log-probabilities) on ``images``."""
    model.eval()
    data = TransformedSet(images, transform)
    out = []
    for start in range(0, len(data), batch_size):
        x = torch.stack([data[i][0] for i in range(start, min(start + batch_size, len(data)))])
        out.append(torch.softmax(model(x).float(), 1))
    return torch.cat(out).numpy()


def run_probabilities(run: Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """(true labels per split, {model or model+flip: probabilities per split}) for ``run``."""
    splits = run_splits(run)
    images = {"pool": splits.unlabeled, "val": splits.val, "test": splits.test}
    truth = {name: np.array([_true_target(s, i) for i in range(len(s))]) for name, s in images.items()}
    probs: dict[str, dict[str, np.ndarray]] = {}
    for stage in chain_stages(run):
        model, meta = load_model(run / stage / MODEL)
        transform = clean_transform(meta)
        for tta in ("none", "flip"):
            name = stage if tta == "none" else f"{stage}+flip"
            labeler = labeling_model(model, tta)
            probs[name] = {split: probabilities(labeler, s, transform) for split, s in images.items()}
    return truth, probs


def combinations(probs: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """Each model, each with flip, each pair of models (clean views) and all of them (with flips)."""
    models = [n for n in probs if not n.endswith("+flip")]
    out = dict(probs)
    for a, b in itertools.combinations(models, 2):
        out[f"{a}+{b}"] = {s: (probs[a][s] + probs[b][s]) / 2 for s in SPLITS}
    if len(models) > 1:  # every model's flip average (clean and mirrored view, as pseudo.tta: flip), averaged
        out["all"] = {s: np.mean([probs[f"{n}+flip"][s] for n in models], axis=0) for s in SPLITS}
    return out


def score(truth: dict[str, np.ndarray], probs: dict[str, np.ndarray]) -> dict:
    """Top-1 accuracy per split; for the pool, the share kept and its accuracy at each threshold."""
    out = {}
    for split in SPLITS:
        known = truth[split] >= 0
        pred, y = probs[split].argmax(1)[known], truth[split][known]
        out[f"{split}_acc"] = float((pred == y).mean())
    known = truth["pool"] >= 0
    pool = probs["pool"][known]
    return {**out, **at_thresholds(pool.max(1), pool.argmax(1) == truth["pool"][known])}


def main(argv: list[str] | None = None) -> dict:
    results = {}
    for run in run_dirs(argv, __doc__.split("\n")[0]):
        truth, probs = run_probabilities(run)
        results[str(run)] = {name: score(truth, p) for name, p in combinations(probs).items()}
        for name, q in results[str(run)].items():
            at = "  ".join(f"{t}: {100 * q[f'kept@{t}']:.1f}% at {100 * (q[f'acc@{t}'] or 0):.2f}" for t in THRESHOLDS)
            print(f"{run} {name:28s} pool {100 * q['pool_acc']:.2f}  val {100 * q['val_acc']:.2f}  "
                  f"test {100 * q['test_acc']:.2f}   kept {at}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
