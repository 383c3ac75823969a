"""The accuracy benchmark's out-of-domain pool: images that belong to no Fashion-MNIST class.

scikit-learn's 8x8 digits (1,797 images, bundled with the package: nothing downloads) upscaled to
28 px and written as a PNG folder, which ``benchmarks/accuracy.py`` passes as ``data.unlabeled``
next to ``data.labels_per_class`` (:func:`ood_overrides`, one run per name in ``OodPool.variants``);
:func:`ood_stats` reads back how the teacher labeled the mixed pool and how much of the student's
stream the digits became, :func:`ood_summary` averages that over the seeds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = 1  # of the folder's layout and rendering: a folder written by another version is rewritten
SIZE = 28
CLASSES = [str(d) for d in range(10)]


def render_digits(count: int, seed: int = 0) -> tuple[list, list[int]]:
    """``count`` grayscale images (``SIZE`` px) of scikit-learn's 8x8 digits (0-16 scaled to 0-255, light
    strokes on black like Fashion-MNIST; bilinear upscale) and their digit. Image ``n`` is source
    ``n % 1797``: the first 1797 are the plain upscales, each later one is its source under a
    random affine jitter (rotation +-15 degrees, scale 0.85-1.15, shift +-3 px), seeded."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    plain = [Image.fromarray(np.round(x * 255 / 16).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
             for x in digits.images]
    rng = np.random.default_rng(seed)
    images = []
    for n in range(count):
        img = plain[n % len(plain)]
        if n >= len(plain):
            angle, scale = np.deg2rad(rng.uniform(-15, 15)), rng.uniform(0.85, 1.15)
            tx, ty = rng.integers(-3, 4, size=2)
            a, b = math.cos(angle) / scale, math.sin(angle) / scale  # output -> input, about the centre
            c = (SIZE - 1) / 2
            img = img.transform((SIZE, SIZE), Image.AFFINE, (a, b, c - a * (c + tx) - b * (c + ty),
                                                         -b, a, c + b * (c + tx) - a * (c + ty)), Image.BILINEAR)
        images.append(img)
    return images, [int(digits.target[n % len(plain)]) for n in range(count)]


def write_ood_pool(cache_dir: Path, count: int, seed: int = 0) -> Path:
    """The out-of-domain folder ``<cache>/ood-digits-<count>-s<seed>/digit-<d>/<n>.png``, written
    once (to a temp folder, then renamed) and reused while its ``ood.json`` matches."""
    folder = Path(cache_dir) / f"ood-digits-{count}-s{seed}"
    meta = {"version": VERSION, "images": count, "seed": seed, "size": SIZE,
            "source": "sklearn.datasets.load_digits", "classes": CLASSES}
    try:
        if json.loads((folder / "ood.json").read_text()) == meta:
            return folder
    except (OSError, ValueError):
        pass
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    images, targets = render_digits(count, seed)
    for d in range(10):
        (tmp / f"digit-{d}").mkdir(parents=True)
    for n, (img, d) in enumerate(zip(images, targets)):
        img.save(tmp / f"digit-{d}" / f"{n:06d}.png", compress_level=1)
    (tmp / "ood.json").write_text(json.dumps(meta))  # not an image: the pool's listing skips it
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def ood_stats(run_dir: Path, threshold: float) -> dict:
    """How the teacher labeled the mixed pool (``label-1``) and what the student trained on
    (``select-1``): the folder's images are the keys ending in .png, the remainder's are indices.
    Confidence is the mean top-1 probability (%); kept is the share at or above the threshold."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from noisystudent.label.store import SHARD_DIR

    shards = sorted((run_dir / "label-1" / SHARD_DIR).glob("part-*.parquet"))
    store = pa.concat_tables(pq.read_table(f, columns=["key", "confidence"]) for f in shards)
    ood = pc.ends_with(store["key"], ".png").to_numpy(zero_copy_only=False)
    conf = store["confidence"].to_numpy()
    sel = pq.read_table(run_dir / "select-1" / "selection.parquet", columns=["key", "copies"])
    sel_ood = pc.ends_with(sel["key"], ".png").to_numpy(zero_copy_only=False)
    copies = sel["copies"].to_numpy()

    def part(mask: np.ndarray) -> dict:
        if not mask.any():
            return {"images": 0, "confidence": None, "kept": None}
        return {"images": int(mask.sum()), "confidence": round(float(conf[mask].mean()) * 100, 2),
                "kept": round(float((conf[mask] >= threshold).mean()), 4)}

    return {"ood": part(ood), "in_domain": part(~ood),
            "ood_share_of_stream": round(float(copies[sel_ood].sum() / max(1, copies.sum())), 4)}


@dataclass(frozen=True)
class OodPool:
    """The out-of-domain images written for the run: ``images`` PNGs in ``folder``, mixed with the
    dataset's ``remainder`` (labels_per_class's leftover images) in the OOD variants' pool; their
    student trains ``epochs`` passes over the pseudo-labeled stream, once per name in ``variants``
    (keys of ``accuracy_tables.OOD_VARIANTS``; ``--ood-variants`` chooses them)."""

    folder: Path
    images: int
    remainder: int
    epochs: float
    variants: tuple[str, ...]


def ood_overrides(ood: OodPool, hard: bool, threshold: float) -> list[str]:
    """The OOD pool: the whole remainder plus the whole folder. ``data.max_unlabeled`` is lifted
    because build_pool fills the cap with the remainder first, which would leave the folder out."""
    return ["data.max_unlabeled=null", f"data.unlabeled={ood.folder}", f"pseudo.hard={str(hard).lower()}",
            f"pseudo.threshold={threshold}"]


def _mean_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.mean(values), 4) if values else None


def ood_summary(ood: OodPool, notes: dict, seeds: list[int]) -> dict:
    """The mix and, per OOD variant, the pool statistics averaged over the seeds."""
    per_variant = {}
    for v in ood.variants:
        runs = [notes[s][v] for s in seeds if v in notes[s]]
        mean = lambda get: _mean_or_none([get(r) for r in runs])  # noqa: E731
        per_variant[v] = {"ood_confidence": mean(lambda r: r["ood"]["confidence"]),
                          "in_domain_confidence": mean(lambda r: r["in_domain"]["confidence"]),
                          "ood_kept": mean(lambda r: r["ood"]["kept"]),
                          "in_domain_kept": mean(lambda r: r["in_domain"]["kept"]),
                          "ood_share_of_stream": mean(lambda r: r["ood_share_of_stream"]),
                          "ood_images_labeled": mean(lambda r: r["ood"]["images"])}
    return {"images": ood.images, "remainder": ood.remainder, "mix": f"{ood.images}:{ood.remainder} (OOD:in-domain)",
            "epochs": ood.epochs, "folder": str(ood.folder), "per_variant": per_variant}
