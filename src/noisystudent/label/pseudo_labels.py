"""Stage 2: the teacher, without noise, labels the unlabeled images.

Pseudo labels are stored as the teacher's top-k classes and probabilities per image (the full
vector when k >= number of classes). Soft targets are rebuilt from the top-k with one rule:
the stored probabilities go to their classes and the remaining mass ``1 - sum(top-k)`` is spread
uniformly over the classes not stored. Hard labels keep the same store (so the confidence
threshold still sees the teacher's confidence) and rebuild as one-hot argmax.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..config.schema import PseudoLabelConfig
from ..runtime.errors import DataError
from ..runtime.progress import progress_bar


@dataclass
class PseudoLabels:
    """The teacher's predictions on the unlabeled pool (row i is image i of the pool)."""

    keys: list[str]
    topk_index: np.ndarray  # (N, k) int32, most probable first
    topk_prob: np.ndarray  # (N, k) float32
    num_classes: int
    teacher: str
    temperature: float
    hard: bool
    indices: np.ndarray | None = None  # position of each row's image in the pool (None: row i is image i)

    def image_index(self, rows: np.ndarray) -> np.ndarray:
        """Pool positions of the images behind ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        return rows if self.indices is None else self.indices[rows]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def confidence(self) -> np.ndarray:
        """Top-1 probability of each image."""
        return self.topk_prob[:, 0]

    @property
    def predicted(self) -> np.ndarray:
        """Top-1 class of each image."""
        return self.topk_index[:, 0]

    def soft_targets(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Target distributions (len(rows), num_classes), float32, by the top-k rebuild rule."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        idx, prob = self.topk_index[rows], self.topk_prob[rows].astype(np.float32)
        out = np.zeros((len(rows), self.num_classes), dtype=np.float32)
        if self.hard:
            out[np.arange(len(rows)), idx[:, 0]] = 1.0
            return out
        k = idx.shape[1]
        if k < self.num_classes:
            rest = np.clip(1.0 - prob.sum(1, keepdims=True), 0.0, None) / (self.num_classes - k)
            out += rest
        np.put_along_axis(out, idx.astype(np.int64), prob, axis=1)
        return out

    def save(self, path: Path) -> None:
        """Write a Parquet file atomically (temp file + rename)."""
        k = self.topk_index.shape[1]
        table = pa.table({
            "key": pa.array(self.keys, pa.string()),
            "topk_class": pa.FixedSizeListArray.from_arrays(pa.array(self.topk_index.reshape(-1), pa.int32()), k),
            "topk_prob": pa.FixedSizeListArray.from_arrays(pa.array(self.topk_prob.reshape(-1), pa.float32()), k),
            "confidence": pa.array(self.confidence, pa.float32()),
            "predicted": pa.array(self.predicted, pa.int32()),
            "index": pa.array(np.arange(len(self)) if self.indices is None else self.indices, pa.int64()),
        })
        meta = {"num_classes": self.num_classes, "teacher": self.teacher,
                "temperature": self.temperature, "hard": self.hard}
        table = table.replace_schema_metadata({b"noisystudent": json.dumps(meta).encode()})
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "PseudoLabels":
        try:
            table = pq.read_table(path)
            meta = json.loads(table.schema.metadata[b"noisystudent"])
        except (OSError, KeyError, pa.ArrowException, ValueError) as e:
            raise DataError(f"unreadable pseudo-label file {path}: {e}") from None
        k = table.schema.field("topk_class").type.list_size
        n = table.num_rows
        idx = table.column("topk_class").combine_chunks().flatten().to_numpy().reshape(n, k)
        prob = table.column("topk_prob").combine_chunks().flatten().to_numpy().reshape(n, k)
        indices = table.column("index").to_numpy() if "index" in table.column_names else None
        return cls(keys=table.column("key").to_pylist(), topk_index=idx.astype(np.int32),
                   topk_prob=prob.astype(np.float32), num_classes=int(meta["num_classes"]),
                   teacher=meta["teacher"], temperature=float(meta["temperature"]), hard=bool(meta["hard"]),
                   indices=indices)


class SkipUnreadable(Dataset):
    """Yields ``(image, position)``; an unreadable image yields a blank and ``-1 - position``,
    so one bad file in a huge unlabeled pool is skipped and listed instead of stopping the run."""

    def __init__(self, images: Dataset, blank: torch.Tensor):
        self.images, self.blank = images, blank

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return self.images[i][0], i
        except DataError:
            return self.blank, -1 - i


@torch.inference_mode()
def predict_topk(model: nn.Module, loader, device: torch.device, temperature: float, top_k: int,
                 desc: str = "label", progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``model`` in eval mode (no noise) over ``loader`` of ``(x, position)`` batches; returns
    the positions of readable images and their top-k of softmax(logits / T)."""
    model.eval()
    pos_parts, idx_parts, prob_parts = [], [], []
    for x, pos in progress_bar(loader, desc=desc, unit="batch", enabled=progress):
        ok = pos >= 0
        pos_parts.append(pos.numpy())
        if not ok.any():
            continue
        logits = model(x[ok].to(device, non_blocking=True)).float()
        probs = torch.softmax(logits / temperature, dim=1)
        p, i = probs.topk(min(top_k, probs.shape[1]), dim=1)
        idx_parts.append(i.to(torch.int32).cpu().numpy())
        prob_parts.append(p.cpu().numpy())
    pos = np.concatenate(pos_parts)
    k = min(top_k, getattr(model, "num_classes", top_k) or top_k)
    idx = np.concatenate(idx_parts) if idx_parts else np.zeros((0, k), np.int32)
    prob = np.concatenate(prob_parts) if prob_parts else np.zeros((0, k), np.float32)
    return pos, idx, prob


def _blank_like_first_readable(images: Dataset) -> torch.Tensor:
    for i in range(len(images)):
        try:
            return torch.zeros_like(images[i][0])
        except DataError:
            continue
    raise DataError("no readable image in the unlabeled pool")


def label_images(model: nn.Module, images: Dataset, keys: list[str], *, num_classes: int, teacher: str,
                 device: torch.device, temperature: float = 1.0, hard: bool = False,
                 top_k: int = PseudoLabelConfig.top_k,
                 batch_size: int = 256, num_workers: int = 0,
                 progress: bool = True) -> tuple[PseudoLabels, list[str]]:
    """Label ``images`` (a dataset of clean, normalised ``(tensor, _)`` items) with the teacher.

    Returns the pseudo labels of the readable images and the keys of the unreadable ones.
    """
    blank = _blank_like_first_readable(images)
    loader = DataLoader(SkipUnreadable(images, blank), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    pos, idx, prob = predict_topk(model, loader, device, temperature, top_k, progress=progress)
    good = pos[pos >= 0]
    bad = [keys[-1 - p] for p in pos[pos < 0]]
    labels = PseudoLabels(keys=[keys[i] for i in good], topk_index=idx, topk_prob=prob,
                          num_classes=num_classes, teacher=teacher, temperature=temperature, hard=hard,
                          indices=None if len(good) == len(keys) else good.astype(np.int64))
    return labels, bad
