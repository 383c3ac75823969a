"""Compact image hashes for pool hygiene: an exact content hash and a 64-bit perceptual hash.

Every image the labeler decodes gets two 8-byte hashes, stored as columns of the pseudo-label
store (:mod:`noisystudent.label.store`); the validation and test splits are hashed the same way
(:func:`hash_image_set`), and the selection drops pool images that are copies of them
(:mod:`noisystudent.label.select`).

* ``content_hash``: the first 8 bytes of BLAKE2b over the image's size and decoded pixels, in the
  mode the model sees (``L`` or ``RGB``, converted as the datasets convert). Decoded pixels, not
  file bytes: the held-out splits are often arrays (MNIST-style IDX files), and a pool copy of a
  test image is a re-saved file whose bytes differ from anything in the split while its pixels
  are identical. BLAKE2b is in the standard library and runs at memory speed in C.
* ``phash``: the DCT perceptual hash as ``imagehash.phash`` computes it (grayscale, LANCZOS
  resize to 32x32, 2-D DCT-II, the 8x8 lowest frequencies against their median, first bit most
  significant), so ``int(str(imagehash.phash(img)), 16) == phash``. Resized and re-encoded copies
  land within a few bits; different images are ~32 bits apart. (Images over 64 px are box-reduced
  before the LANCZOS step, see :func:`thumbnail`; their hash is then within a bit or two of
  imagehash's.)

Why not ``imagehash`` itself: it runs two full 32x32 SciPy DCTs and a median per PIL image in
Python. Here only the per-image step that must see the image (convert + resize, in PIL's C code)
runs per image, in the labeler's decoding workers at the original resolution; the DCT is one
matrix product over a whole batch (only the 8 needed rows of the DCT matrix), the median and the
bit packing are vectorised (:func:`phash_from_thumbnails`).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..runtime.files import atomic_write

PHASH_BITS = 64
HASH_SIDE = 8  # 8x8 low-frequency DCT coefficients -> 64 bits
THUMB_SIDE = 32  # grayscale thumbnail the DCT runs on (imagehash's highfreq_factor 4)
HASH_COLUMNS = ("content_hash", "phash")
REDUCING_GAP = 2.0


def _dct_rows(n: int = THUMB_SIDE, k: int = HASH_SIDE) -> np.ndarray:
    """The first ``k`` rows of the (unnormalised) DCT-II matrix of size ``n``: ``cos(pi u (2x+1) / 2n)``.
    SciPy's DCT-II is this times 2; a positive factor does not change which coefficients exceed
    their median."""
    u = np.arange(k)[:, None]
    x = np.arange(n)[None, :]
    return np.cos(np.pi * u * (2 * x + 1) / (2 * n))


_DCT8 = _dct_rows()  # a constant (no state): 8 x 32 float64
_BIT_WEIGHTS = (np.uint64(1) << np.arange(PHASH_BITS - 1, -1, -1, dtype=np.uint64))  # first bit = MSB


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in ``mode`` (``L`` or ``RGB``) as the datasets convert it."""
    from ..data.datasets import convert_image

    return img if img.mode == mode else convert_image(img, mode)


def content_hash(img: Image.Image) -> int:
    """First 8 bytes of BLAKE2b over mode, size and pixels, as an unsigned 64-bit integer."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return int.from_bytes(h.digest(), "big")


def thumbnail(img: Image.Image) -> np.ndarray:
    """The 32x32 uint8 grayscale thumbnail the perceptual hash is computed from: imagehash's LANCZOS
    resize, except that an image over twice the side is first box-reduced by an integer factor
    (PIL's ``reducing_gap``): 3-4x faster from 256 px, the hash within a bit or two of imagehash's."""
    gray = img if img.mode == "L" else img.convert("L")
    return np.asarray(gray.resize((THUMB_SIDE, THUMB_SIDE), Image.LANCZOS, reducing_gap=REDUCING_GAP),
                      dtype=np.uint8)


def hash_inputs(img: Image.Image, mode: str) -> tuple[int, np.ndarray]:
    """The per-image part of hashing, at the image's own resolution: ``(content_hash, thumbnail)``."""
    img = to_mode(img, mode)
    return content_hash(img), thumbnail(img)


def phash_from_thumbnails(thumbs: np.ndarray) -> np.ndarray:
    """64-bit perceptual hashes (uint64) of a batch of 32x32 grayscale thumbnails (N, 32, 32)."""
    thumbs = np.asarray(thumbs, dtype=np.float64).reshape(-1, THUMB_SIDE, THUMB_SIDE)
    if not len(thumbs):
        return np.empty(0, np.uint64)
    # DCT along both axes, 8 lowest frequencies only: D (8x32) @ X (32x32) @ D^T (32x8)
    low = np.matmul(np.matmul(_DCT8, thumbs), _DCT8.T).reshape(len(thumbs), HASH_SIDE * HASH_SIDE)
    bits = low > np.median(low, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _BIT_WEIGHTS).sum(axis=1, dtype=np.uint64)


def hash_images(images: Iterable[Image.Image], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``(content_hash, phash)`` uint64 arrays of PIL images, in ``mode`` (``L`` or ``RGB``)."""
    exact, thumbs = [], []
    for img in images:
        e, t = hash_inputs(img, mode)
        exact.append(e)
        thumbs.append(t)
    thumbs_arr = np.stack(thumbs) if thumbs else np.empty((0, THUMB_SIDE, THUMB_SIDE), np.uint8)
    return np.asarray(exact, dtype=np.uint64), phash_from_thumbnails(thumbs_arr)


def hash_image_set(images, mode: str, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every image of an :class:`~noisystudent.data.datasets.ImageSet` (its ``load``)."""
    exact, phash = [], []
    for start in range(0, len(images), batch):
        e, p = hash_images((images.load(i) for i in range(start, min(len(images), start + batch))), mode)
        exact.append(e)
        phash.append(p)
    if not exact:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    return np.concatenate(exact), np.concatenate(phash)


def hamming(a, b) -> np.ndarray:
    """Bitwise Hamming distance of uint64 hashes (broadcast)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return np.unpackbits(np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)


def pack_hashes(exact: Iterable[int], thumbs: list[np.ndarray]) -> bytes:
    """A worker batch's hashes as bytes (``(n, 2)`` uint64: content hash, phash): bytes pass through
    the DataLoader untouched, where a numpy array would become a tensor copied to the device."""
    phash = phash_from_thumbnails(np.stack(thumbs)) if thumbs else np.empty(0, np.uint64)
    return np.stack([np.fromiter(exact, np.uint64, len(phash)), phash], axis=1).tobytes()


def unpack_hashes(data: bytes) -> np.ndarray:
    """The ``(n, 2)`` uint64 array of :func:`pack_hashes`."""
    return np.frombuffer(data, dtype=np.uint64).reshape(-1, 2)


HELDOUT_COLUMNS = ("split", "index", "content_hash", "phash")


def heldout_hash_table(sets: dict, mode: str) -> pa.Table:
    """One row per image of each held-out split (``{"val": ImageSet, "test": ImageSet}``): its
    split, its index in the split and its two hashes, computed as the labeler computes the pool's."""
    parts = []
    for split, images in sets.items():
        exact, phash = hash_image_set(images, mode)
        parts.append(pa.table({"split": pa.array([split] * len(exact), pa.string()),
                               "index": pa.array(np.arange(len(exact), dtype=np.int64)),
                               "content_hash": pa.array(exact, pa.uint64()), "phash": pa.array(phash, pa.uint64())}))
    if not parts:
        return pa.table({"split": pa.array([], pa.string()), "index": pa.array([], pa.int64()),
                         "content_hash": pa.array([], pa.uint64()), "phash": pa.array([], pa.uint64())})
    return pa.concat_tables(parts)


def write_heldout_hashes(path, sets: dict, mode: str) -> dict:
    """Hash the held-out splits into a small Parquet file at ``path``; returns images per split."""
    table = heldout_hash_table(sets, mode)
    atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))
    return {split: len(images) for split, images in sets.items()}
