"""Pools that are not files: the dataset's own unlabeled images, and synthetic images for tests
and benchmarks."""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np

from ..datasets import ImageSet
from .base import DEFAULT_SHARD_SIZE, UnlabeledSource, check_shard_size


class ImageSetSource(UnlabeledSource):
    """An in-memory or lazy :class:`~noisystudent.data.datasets.ImageSet`, cut into shards of indices."""

    kind = "image-set"

    def __init__(self, images: ImageSet, shard_size: int = DEFAULT_SHARD_SIZE):
        self.images = images
        self.shard_size = check_shard_size(shard_size)

    @property
    def num_shards(self) -> int:
        return -(-len(self.images) // self.shard_size)

    def shard_length(self, index: int) -> int:
        return min(self.shard_size, len(self.images) - index * self.shard_size)

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        start = index * self.shard_size
        for i in range(start, start + self.shard_length(index)):
            yield self.images.key(i), functools.partial(self.images.load, i)

    random_access = True

    def open_item(self, shard: int, index: int, key: str) -> object:
        return self.images.load(shard * self.shard_size + index)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "num_shards": self.num_shards, "num_items": len(self.images),
                "shard_size": self.shard_size}


class SyntheticSource(UnlabeledSource):
    """``num_images`` images synthesised from their index (for tests and benchmarks): a fixed bank
    of random uint8 patterns, picked by a hash of the index. Every ``bad_every``-th item (if set)
    is corrupt bytes, to exercise the bad-image path."""

    kind = "synthetic"

    def __init__(self, num_images: int, shard_size: int = DEFAULT_SHARD_SIZE, size: int = 8,
                 channels: int = 3, seed: int = 0, bank_size: int = 256, bad_every: int = 0):
        self.num_images = int(num_images)
        self.shard_size = check_shard_size(shard_size)
        self.size, self.channels, self.seed = size, channels, seed
        self.bank_size, self.bad_every = bank_size, bad_every
        self._bank: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_bank": None}  # workers rebuild the bank instead of receiving it

    def _patterns(self) -> np.ndarray:
        if self._bank is None:
            shape = (self.bank_size, self.size, self.size) + ((self.channels,) if self.channels > 1 else ())
            self._bank = np.random.default_rng(self.seed).integers(0, 256, shape, dtype=np.uint8)
        return self._bank

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_length(self, index: int) -> int:
        return min(self.shard_size, self.num_images - index * self.shard_size)

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        start = index * self.shard_size
        for i in range(start, start + self.shard_length(index)):
            yield f"syn/{i:010d}", self._item(i)

    def _item(self, i: int) -> object:
        if self.bad_every and i % self.bad_every == self.bad_every - 1:
            return b"this is not an image"
        return self._patterns()[(i * 2654435761 + self.seed) % self.bank_size]

    random_access = True

    def open_item(self, shard: int, index: int, key: str) -> object:
        return self._item(shard * self.shard_size + index)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "num_shards": self.num_shards, "num_items": self.num_images,
                "shard_size": self.shard_size, "size": self.size, "channels": self.channels,
                "seed": self.seed, "bank_size": self.bank_size, "bad_every": self.bad_every}
