"""What every unlabeled source is: a fixed, ordered list of shards of ``(key, payload)`` items,
and the payloads they yield (:func:`decode_image` turns any of them into a PIL image)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ...runtime.distributed import DistContext
from ...runtime.errors import ConfigError, DataError

DEFAULT_SHARD_SIZE = 8192


@dataclass(frozen=True)
class Unreadable:
    """A payload standing for an item the source could not read (recorded as a bad image)."""

    reason: str


def decode_image(payload) -> Image.Image:
    """Turn a source payload into a loaded PIL image.

    Payloads: a PIL image, a uint8 array (H, W) or (H, W, C), encoded bytes, a file path, a
    zero-argument callable returning one of these, or :class:`Unreadable`.
    """
    if isinstance(payload, Unreadable):
        raise DataError(payload.reason)
    if callable(payload) and not isinstance(payload, Image.Image):
        payload = payload()
    if isinstance(payload, Image.Image):
        return payload
    if isinstance(payload, np.ndarray):
        arr = payload[..., 0] if payload.ndim == 3 and payload.shape[-1] == 1 else payload
        return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    if isinstance(payload, (bytes, bytearray, memoryview)):
        if len(payload) == 0:
            raise DataError("empty file")
        img = Image.open(io.BytesIO(payload))
    elif isinstance(payload, (str, os.PathLike)):
        if os.path.getsize(payload) == 0:
            raise DataError("empty file")
        img = Image.open(payload)
    else:
        raise DataError(f"unsupported payload type {type(payload).__name__}")
    img.load()  # decode now, in the worker, so errors surface here rather than in the transform
    return img


class UnlabeledSource:
    """An unlabeled pool as a fixed, ordered list of shards of ``(key, payload)`` items.

    Subclasses implement :meth:`iter_shard`, :attr:`num_shards` and :meth:`fingerprint`; those
    that need an on-disk index build it in :meth:`prepare`. Sources are pickled into DataLoader
    workers, so they hold only small state (paths, offsets), never the pool.
    """

    kind = "source"

    def prepare(self, work_dir: Path, ctx: DistContext | None = None) -> None:
        """Build whatever index the source needs under ``work_dir`` (once, on rank 0)."""

    @property
    def num_shards(self) -> int:
        raise NotImplementedError

    def shard_name(self, index: int) -> str:
        return f"{index:06d}"

    def shard_length(self, index: int) -> int | None:
        """Items in a shard when known without reading it (for progress and ETA)."""
        return None

    def iter_shard(self, index: int) -> Iterator[tuple[str, object]]:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies the pool and its sharding (stored in the store header)."""
        return {"kind": self.kind, "num_shards": self.num_shards}

    #: Whether :meth:`open_item` works: then a student reads its selected images by position
    #: (folders, file lists, image sets); otherwise it streams the shards (WebDataset tars).
    random_access = False

    def open_item(self, shard: int, index: int, key: str) -> object:
        """The payload of item ``index`` of shard ``shard`` (whose key is ``key``), read alone."""
        raise DataError(f"a {self.kind} pool is read as a stream of shards, not image by image")


def check_shard_size(shard_size: int) -> int:
    """``shard_size`` as an int, refused when below 1."""
    if int(shard_size) < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    return int(shard_size)
