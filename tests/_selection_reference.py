"""The selection rule written the plainest way, in memory: the oracle the store-based selection
(noisystudent.label.select, one DuckDB query) is checked against."""

from __future__ import annotations

import hashlib
import math

import numpy as np


def reference_selection(keys: list[str], confidence: np.ndarray, predicted: np.ndarray, num_classes: int, *,
                        threshold: float, balance: bool, per_class: int | None, seed: int) -> dict:
    """``{"rows": [(row, copies), ...] in class order, most confident first, "kept_per_class": [...],
    "per_class": K}`` for rows numbered in store order."""
    confidence = np.asarray(confidence, np.float32)
    kept = np.flatnonzero(confidence >= np.float32(threshold))
    kept_per_class = np.bincount(predicted[kept], minlength=num_classes)
    k = (per_class or max(1, math.ceil(len(kept) / num_classes))) if balance else None
    out = []
    for c in range(num_classes):
        rows = [int(r) for r in kept if predicted[r] == c]
        rows.sort(key=lambda r: (-float(confidence[r]), r))  # most confident first; ties: store order
        if not balance or len(rows) >= k:
            out += [(r, 1) for r in (rows if not balance else rows[:k])]
            continue
        if not rows:
            continue
        n = len(rows)
        draw = sorted(rows, key=lambda r: (hashlib.md5(f"{seed}:{keys[r]}".encode()).hexdigest(), r))
        extra = set(draw[: k % n])
        out += [(r, k // n + (r in extra)) for r in rows]
    return {"rows": out, "kept_per_class": kept_per_class.tolist(), "per_class": k}
