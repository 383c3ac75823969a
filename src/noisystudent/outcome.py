"""What a finished run hands over: the final model chosen on validation, the Noisy Student gain
over the baseline, and the summary table. Pure functions of the stages' metrics (no I/O), so the
pipeline, ``noisystudent report`` and the tests read one definition.

The paper's yardstick is *the same architecture trained on the labels alone* (B0 77.3 -> 78.1 ...):
the gain is the Noisy Student model's accuracy minus that baseline's, on validation and test. The
Noisy Student model is the student (or its fix-res fine-tune) with the best validation top-1; the
baseline is the ``baseline`` stage, or the teacher when it has the final architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .runtime.rundir import BASELINE, TEACHER


@dataclass(frozen=True)
class TrainedModel:
    """A finished training stage as later stages read it (its metrics.json, typed)."""

    name: str
    model: str
    params: int
    image_size: int
    val_top1: float
    test_top1: float
    metrics: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_metrics(cls, metrics: dict) -> "TrainedModel":
        return cls(name=metrics["name"], model=metrics["model"], params=int(metrics.get("params") or 0),
                   image_size=int(metrics["image_size"]), val_top1=float(metrics["val_top1"]),
                   test_top1=float(metrics["test_top1"]), metrics=metrics)

    @property
    def is_student(self) -> bool:
        """A model of the Noisy Student chain past the teacher: a student or its fix-res fine-tune."""
        return self.name not in (TEACHER, BASELINE)


BASELINE_NOTE = ("the baseline ({baseline}) was still improving at its last epochs: the gain may be bought with "
                 "an undertrained baseline; give it more epochs (baseline.epochs, or train.patience with a higher cap)")


def _best_on_val(candidates: list[TrainedModel]) -> TrainedModel | None:
    """The candidate with the highest validation top-1; ties go to the earliest in the list."""
    best = None
    for c in candidates:
        if not math.isnan(c.val_top1) and (best is None or c.val_top1 > best.val_top1):
            best = c
    return best


def noisy_student_model(chain: list[TrainedModel]) -> TrainedModel | None:
    """The chain's best student on validation (later stages win ties: the paper hands over the last)."""
    return _best_on_val([m for m in reversed(chain) if m.is_student])


def choose_final(chain: list[TrainedModel], baseline: TrainedModel | None, rule: str) -> tuple[TrainedModel, str]:
    """The model the run hands over and why. ``chain``: teacher, students, fix-res in order.

    ``best-val``: the highest validation top-1 among the chain's models and the baseline (later
    chain stages win ties; the baseline only when strictly better than every one), so a run never
    hands over a model worse on validation than the labels alone gave. ``last``: the chain's last.
    """
    last = chain[-1]
    if rule == "last":
        return last, "the chain's last stage (final_model: last)"
    candidates = list(reversed(chain)) + ([baseline] if baseline is not None and baseline.name != TEACHER else [])
    best = _best_on_val(candidates) or last
    if best.name == last.name:
        return best, f"the chain's last stage, best on validation ({best.val_top1:.2f})"
    if best.name == BASELINE:
        return best, (f"the baseline is best on validation ({best.val_top1:.2f}, the chain's best "
                      f"{max(m.val_top1 for m in chain):.2f}): the unlabeled images did not help this run")
    return best, (f"best on validation ({best.val_top1:.2f}), above the chain's last stage {last.name} "
                  f"({last.val_top1:.2f})")


def noisy_student_gain(chain: list[TrainedModel], baseline: TrainedModel | None) -> dict | None:
    """Noisy Student model minus baseline, val and test top-1 (points); None without a baseline or
    a student."""
    student = noisy_student_model(chain)
    if baseline is None or student is None:
        return None
    return {"val": student.val_top1 - baseline.val_top1, "test": student.test_top1 - baseline.test_top1,
            "student": student.name, "student_model": student.model,
            "baseline": baseline.name, "baseline_model": baseline.model,
            "baseline_still_improving": still_improving(baseline.metrics)}


def still_improving(metrics: dict) -> bool:
    """Whether a stage's best validation epoch is among its last few (10% of its epochs, at least
    2) without early stopping having ended it: it had not reached its plateau, so a gain measured
    against it may be bought with an undertrained baseline."""
    best, epochs = metrics.get("best_epoch"), metrics.get("epochs")
    if not best or not epochs or metrics.get("stopped_early"):
        return False
    return best > epochs - max(2, math.ceil(0.1 * epochs))


def format_gain(gain: dict) -> str:
    """One line: the gain over the same architecture on the labels alone."""
    return (f"Noisy Student gain over {gain['baseline_model']} on the labels alone ({gain['baseline']}): "
            f"{gain['test']:+.2f} test top-1, {gain['val']:+.2f} val ({gain['student']})")


def format_summary_table(summary: dict) -> str:
    """The teacher, the baseline and each student: model, val/test top-1, images used, time; then
    the Noisy Student gain and which model the run hands over."""
    head = f"{'stage':<11} {'model':<24} {'val top-1':>9} {'test top-1':>10} {'labeled':>8} {'pseudo':>8} {'time':>8}"
    lines = [head, "-" * len(head)]
    final = summary.get("result")
    for s in summary["stages"]:
        mark = " *" if s["name"] == final else ""
        lines.append(f"{s['name']:<11} {s['model']:<24} {s['val_top1']:>9.2f} {s['test_top1']:>10.2f} "
                     f"{s['num_labeled']:>8} {s['num_pseudo']:>8} {s['seconds']:>7.1f}s{mark}")
    for s in summary["stages"]:
        if "test_top1_before" in s:
            lines.append(f"fix-res at {s['test_size']}px (trained at {s['train_size']}px): test top-1 "
                         f"{s['test_top1_before']:.2f} before, {s['test_top1_after']:.2f} after "
                         f"({s['test_top1_after'] - s['test_top1_before']:+.2f}); "
                         f"{s['frozen_blocks']}/{s['total_blocks']} blocks frozen")
    if summary.get("ns_gain"):
        lines.append(format_gain(summary["ns_gain"]))
        if summary["ns_gain"].get("baseline_still_improving"):
            lines.append(f"note: {BASELINE_NOTE.format(**summary['ns_gain'])}")
    if summary.get("final"):
        lines.append(f"final model (*): {final}, {summary['final']['reason']}")
    for skipped in summary.get("skipped") or []:
        lines.append(f"skipped: {skipped}")
    return "\n".join(lines)
