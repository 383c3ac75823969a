"""Stage 3: choose which pseudo-labeled images the student trains on.

The paper's rule: drop images whose top-1 confidence is below a threshold; then balance classes
by keeping the K most confident images of each (predicted) class, and duplicating the images of
classes with fewer than K until they reach K. The copy count K / n is rounded stochastically so
the class lands on exactly K: every image gets floor(K / n) copies and K mod n distinct images,
drawn at random, get one more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Selection:
    """Rows of a :class:`~noisystudent.label.pseudo_labels.PseudoLabels` chosen for training (with repeats)."""

    rows: np.ndarray  # int64 row indices into the pseudo labels; duplicated rows repeat
    per_class: int | None  # K, or None without balancing
    kept_per_class: np.ndarray  # images per class after the threshold (before balancing)
    selected_per_class: np.ndarray  # rows per class after balancing (duplicates counted)
    num_below_threshold: int

    @property
    def num_unique(self) -> int:
        return int(len(np.unique(self.rows)))

    def summary(self) -> dict:
        return {"num_selected": int(len(self.rows)), "num_unique": self.num_unique,
                "per_class": self.per_class, "num_below_threshold": self.num_below_threshold,
                "kept_per_class": self.kept_per_class.tolist(),
                "selected_per_class": self.selected_per_class.tolist()}


def default_per_class(num_kept: int, num_classes: int) -> int:
    """K derived from the data: the mean number of images per class that pass the threshold."""
    return max(1, math.ceil(num_kept / num_classes))


def balance_class(rows: np.ndarray, confidence: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Top-``k`` rows by confidence, or every row duplicated up to exactly ``k`` rows."""
    order = rows[np.lexsort((rows, -confidence[rows]))]  # most confident first; ties by row
    n = len(order)
    if n == 0:
        return order
    if n >= k:
        return order[:k]
    copies = np.full(n, k // n, dtype=np.int64)
    copies[rng.choice(n, size=k % n, replace=False)] += 1
    return np.repeat(order, copies)


def select_pseudo_labels(confidence: np.ndarray, predicted: np.ndarray, num_classes: int, *,
                         threshold: float = 0.3, balance: bool = True, per_class: int | None = None,
                         seed: int = 0) -> Selection:
    """Apply the confidence threshold and (optionally) per-class balancing to K images."""
    confidence = np.asarray(confidence, dtype=np.float32)
    predicted = np.asarray(predicted, dtype=np.int64)
    keep = confidence >= np.float32(threshold)
    kept_rows = np.flatnonzero(keep)
    kept_per_class = np.bincount(predicted[kept_rows], minlength=num_classes)
    if not balance:
        rows = kept_rows
        k = None
    else:
        rng = np.random.default_rng(seed)
        k = per_class or default_per_class(len(kept_rows), num_classes)
        parts = [balance_class(kept_rows[predicted[kept_rows] == c], confidence, k, rng)
                 for c in range(num_classes)]
        rows = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return Selection(rows=rows.astype(np.int64), per_class=k, kept_per_class=kept_per_class,
                     selected_per_class=np.bincount(predicted[rows], minlength=num_classes),
                     num_below_threshold=int((~keep).sum()))
