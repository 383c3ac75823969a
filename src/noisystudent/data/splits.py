"""The splits a run trains and measures on: labeled, unlabeled, validation and test images.

:func:`build_splits` loads the configured source (:func:`noisystudent.data.datasets.load_source`),
holds out the test and validation splits where the source has none of its own, keeps
``data.labels_per_class`` labels and moves the rest to the unlabeled pool, and checks that the
images read before any stage trains on them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config.schema import DataConfig
from ..runtime.errors import DataError, error_reason
from .datasets import (FileImageSet, ImageSet, LoadedSource, SubsetImageSet, concat_image_sets,
                       convert_image, load_source)

log = logging.getLogger("noisystudent")


@dataclass
class DataSplits:
    """Everything the pipeline needs: the four splits and how to read them."""

    labeled: ImageSet
    unlabeled: ImageSet  # the in-dataset part of the pool (see data.pool.build_pool for the whole pool)
    val: ImageSet
    test: ImageSet
    classes: list[str]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # labeled training images moved to the unlabeled pool by data.labels_per_class (None: not set)
    labels_moved_to_pool: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict:
        def counts(s: ImageSet) -> list[int] | None:
            if s.targets is None:
                return None
            return np.bincount(s.targets, minlength=self.num_classes).tolist()

        return {"classes": self.classes, "channels": self.channels,
                "num_labeled": len(self.labeled), "num_unlabeled": len(self.unlabeled),
                "num_val": len(self.val), "num_test": len(self.test),
                "num_labels_moved_to_pool": self.labels_moved_to_pool,
                "labeled_per_class": counts(self.labeled), "val_per_class": counts(self.val),
                "test_per_class": counts(self.test)}


def split_per_class(targets: np.ndarray, per_class: int, rng: np.random.Generator,
                    what: str, classes: Sequence[str] | None = None,
                    leave: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``per_class`` random indices of every class; returns (picked, rest), both sorted.
    ``leave``: images each class must keep in the rest (a held-out split must leave training
    images). Errors name the class by ``classes`` (its folder name), not its index."""
    picked = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        name = repr(classes[c]) if classes is not None else str(c)
        if len(idx) < per_class + leave:
            if len(idx) >= per_class:  # enough to pick, none left over for training
                raise DataError(f"{what}: class {name} has {len(idx)} training images and all would be held "
                                f"out ({per_class} requested); lower it so every class keeps training images")
            raise DataError(f"{what}: class {name} has {len(idx)} images, fewer than the {per_class} requested")
        picked.append(rng.choice(idx, size=per_class, replace=False))
    picked = np.sort(np.concatenate(picked))
    rest = np.setdiff1d(np.arange(len(targets)), picked)
    return picked, rest


def pool_path(cfg: DataConfig) -> str | None:
    """The user's unlabeled pool (``data.unlabeled``, or its alias ``data.unlabeled_dir``)."""
    return cfg.unlabeled or cfg.unlabeled_dir


def build_splits(cfg: DataConfig, seed: int, require_unlabeled: bool = True, *,
                 log_splits: bool = False) -> DataSplits:
    """Build labeled / unlabeled / val / test splits for the configured source.

    The validation split is held out of the labeled training images (never the test split);
    ``labels_per_class`` keeps N labels per class and moves the rest to the unlabeled pool;
    ``log_splits`` (the pipeline, which trains on the splits) says so: a warning for a user's data;
    it also warns of a ``test_per_class`` that a source with its own test split leaves unused.
    ``require_unlabeled``: a student will read the pool (False: nothing does, which the warning says).
    ``unlabeled`` holds that in-dataset remainder (and a torchvision dataset's own unlabeled split);
    a pool named by ``data.unlabeled`` is never listed here: :func:`noisystudent.data.pool.build_pool`
    streams it.
    """
    rng = np.random.default_rng(seed)
    source = load_source(cfg)
    train, classes = source.train, source.classes
    test, val, pool = _held_out_splits(source, cfg, rng, log_splits)
    labeled, unlabeled_parts, moved = _labeled_and_moved(train, pool, cfg, rng, classes,
                                                         require_unlabeled, log_splits)
    if source.extra_unlabeled is not None:
        unlabeled_parts.append(source.extra_unlabeled)
    unlabeled = concat_image_sets(unlabeled_parts, train.mode)
    if cfg.max_unlabeled is not None and len(unlabeled) > cfg.max_unlabeled:
        keep = np.sort(rng.choice(len(unlabeled), size=cfg.max_unlabeled, replace=False))
        unlabeled = SubsetImageSet(unlabeled, keep, drop_targets=True)
    if len(unlabeled) == 0 and require_unlabeled and not pool_path(cfg):
        raise DataError("the unlabeled pool is empty: set data.unlabeled (a folder, file list or WebDataset "
                        "shards) or data.labels_per_class")

    channels = cfg.channels or (1 if train.mode == "L" else 3)
    # One decode per file: the labeled check keeps the pixels the mean/std is computed from, and a
    # file in two splits (a test folder that is the val folder) is checked once.
    checked: set = set()
    pixels = check_readable(labeled, full=len(labeled) <= FULL_CHECK_LIMIT, checked=checked,
                            keep=STATS_LIMIT, channels=channels)
    for split in (val, test):
        check_readable(split, full=len(split) <= FULL_CHECK_LIMIT, checked=checked)
    mean, std = image_stats(labeled, channels, limit=STATS_LIMIT, pixels=pixels)
    return DataSplits(labeled=labeled, unlabeled=unlabeled, val=val, test=test, classes=classes,
                      channels=channels, mean=mean, std=std, labels_moved_to_pool=moved)


def _held_out_splits(source: LoadedSource, cfg: DataConfig, rng: np.random.Generator,
                     log_splits: bool) -> tuple[ImageSet, ImageSet, np.ndarray]:
    """The test and validation splits (the source's own, else held out of its training images,
    test first) and the indices of the training images left for labels and the pool."""
    train, classes = source.train, source.classes
    assert train.targets is not None
    pool = np.arange(len(train))
    test, val = source.test, source.val
    if test is not None and cfg.test_per_class is not None and log_splits:  # never silently ignored
        log.warning(f"data.test_per_class={cfg.test_per_class} is unused: data source {cfg.source} has a "
                    f"test split of its own ({cfg.own_test_split()}), which is the test split; remove the key")
    if test is None:
        if cfg.test_per_class is None:
            raise DataError(f"data source {cfg.source} has no test split: set data.test_per_class "
                            "or data.test_dir")
        test_idx, pool = split_per_class(train.targets, cfg.test_per_class, rng,
                                         f"data.test_per_class={cfg.test_per_class}", classes, leave=1)
        test = SubsetImageSet(train, test_idx)
    if val is None:
        val_local, pool_local = split_per_class(train.targets[pool], cfg.val_per_class, rng,
                                                f"data.val_per_class={cfg.val_per_class}", classes, leave=1)
        val = SubsetImageSet(train, pool[val_local])
        pool = pool[pool_local]
    return test, val, pool


def _labeled_and_moved(train: ImageSet, pool: np.ndarray, cfg: DataConfig, rng: np.random.Generator,
                       classes: list[str], require_unlabeled: bool,
                       log_splits: bool) -> tuple[ImageSet, list[ImageSet], int | None]:
    """The labeled split from the training images at ``pool``: all of them, or ``labels_per_class``
    per class with the rest moved (targets dropped) to the unlabeled parts. Returns (labeled,
    unlabeled parts, how many were moved or None)."""
    assert train.targets is not None
    if cfg.labels_per_class is None:
        return SubsetImageSet(train, pool), [], None
    lab_local, rest_local = split_per_class(train.targets[pool], cfg.labels_per_class, rng,
                                            f"data.labels_per_class={cfg.labels_per_class}", classes)
    labeled = SubsetImageSet(train, pool[lab_local])
    moved = len(rest_local)
    if not moved:
        return labeled, [], moved
    if log_splits:  # never silent: the user's labels are set aside, however intentionally
        unused = (" their labels are unused" if require_unlabeled else
                  " with no student (students=[]) nothing reads the pool: these images are not used at all")
        # a warning (--quiet shows it) for a user's own data, or data no stage uses; the built-in
        # digits demo is a semi-supervised benchmark by design (its pool is those images): info
        level = logging.INFO if cfg.source == "digits" and require_unlabeled else logging.WARNING
        log.log(level, f"data.labels_per_class={cfg.labels_per_class}: kept {len(labeled)} labeled training "
                       f"images and moved {moved} to the unlabeled pool;{unused}; "
                       "data.labels_per_class=null keeps every label")
    return labeled, [SubsetImageSet(train, pool[rest_local], drop_targets=True)], moved


FULL_CHECK_LIMIT = 20000  # labeled sets up to this size are fully decoded before training starts


STATS_LIMIT = 2000  # the mean/std is computed from the first this many labeled images


def check_readable(images: ImageSet, full: bool, checked: set | None = None, keep: int = 0,
                   channels: int = 3) -> list[np.ndarray]:
    """Fail early, naming the file, if a labeled image cannot be read: a fully decoded check for
    small sets, a header check (zero-byte and non-image files) for large ones.

    ``checked``: paths fully decoded already (skipped; the ones decoded here are added). ``keep``:
    with ``full``, the pixels of the first ``keep`` images (``channels`` 1: "L", else "RGB"), as
    :func:`image_stats` reads them, so the mean/std needs no second decode; else an empty list."""
    if isinstance(images, SubsetImageSet):
        base, positions = images.base, images.indices
    else:
        base, positions = images, np.arange(len(images))
    if not isinstance(base, FileImageSet):
        return []  # in-memory arrays are valid by construction
    checked = set() if checked is None else checked
    pixels: list[np.ndarray] = []
    for n, i in enumerate(positions):
        path = base.paths[int(i)]
        if full:
            if n < keep:
                pixels.append(_stats_pixels(base.load(int(i)), channels))
            elif path not in checked:
                base.load(int(i))
            checked.add(path)
            continue
        try:
            with Image.open(path) as im:
                im.size  # noqa: B018 - parses the header
        except Image.DecompressionBombError as e:
            raise DataError(f"image {path} is too large to decode ({e}); remove it or shrink it") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"unreadable image {path}: {error_reason(e)}") from None
    return pixels


def _stats_pixels(img: Image.Image, channels: int) -> np.ndarray:
    """An image's pixels as :func:`image_stats` counts them: uint8, one row per pixel."""
    return np.asarray(convert_image(img, "L" if channels == 1 else "RGB")).reshape(-1, channels)


def image_stats(images: ImageSet, channels: int, limit: int = STATS_LIMIT,
                pixels: list[np.ndarray] | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the first (up to ``limit``) images, used for input
    normalisation. ``pixels``: those images' pixels decoded already (:func:`check_readable`'s
    ``keep``); the rest are loaded. Kept as uint8 until the one float64 array the statistics are
    taken over (the same values, so the same mean/std, as converting each image first)."""
    n = min(len(images), limit)
    rows = list((pixels or [])[:n])
    rows += [_stats_pixels(images.load(i), channels) for i in range(len(rows), n)]
    flat = np.concatenate(rows).astype(np.float64) / 255.0
    std = np.maximum(flat.std(0), 1e-3)
    return tuple(float(v) for v in flat.mean(0)), tuple(float(v) for v in std)
