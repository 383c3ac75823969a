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
* ``phash``: a 64-bit DCT perceptual hash, imagehash's ``phash`` computed without its thumbnail:
  the 2-D DCT-II of the grayscale image, its 8x8 lowest frequencies against their median, first
  bit most significant. imagehash first resamples the image to 32x32 (LANCZOS) and takes the DCT of
  that; here the 8 lowest cosine basis functions are sampled at the image's own pixels, so the
  coefficients come straight from the image (an image over 128 px a side is box-reduced by an
  integer factor first, ``Image.reduce``, to keep the products small). The lowest frequencies are
  what a 32x32 thumbnail keeps, so the hash is within a few bits of imagehash's (2 or fewer for 93%
  of Fashion-MNIST's test images); resized and re-encoded copies land within a few bits; different
  images are ~32 bits apart.

Cost matters: the labeler hashes every pool image in its decoding workers, at the original
resolution, where decoding and the transform already set the pace. Per image there is one copy of
the pixels (``tobytes``), BLAKE2b over it, and the pixels kept as a uint8 view of that copy; the
DCT runs per worker batch (:func:`dct_coefficients_batch`): images of the same size are stacked
and transformed by two matrix products for the whole group, and the median and bit packing run
over the batch (:func:`phash_from_coefficients`). One pair of small matrix products per image
instead cost twice as much in the worker as measured alone (numpy and BLAS call overhead, per
image); a 32x32 LANCZOS thumbnail per image, as imagehash makes, cost as much as the labeler's
whole transform. The hashes are the same bit for bit whichever way they are batched
(tests/test_dedup.py).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..data.datasets import convert_image
from ..runtime.files import atomic_write

PHASH_BITS = 64
HASH_SIDE = 8  # 8x8 low-frequency DCT coefficients -> 64 bits
HASH_COLUMNS = ("content_hash", "phash")
MAX_DCT_SIDE = 64  # an image at least twice this on its short side is box-reduced before the DCT


def _dct_rows(n: int, k: int = HASH_SIDE) -> np.ndarray:
    """The first ``k`` rows of the (unnormalised) DCT-II matrix of size ``n``: ``cos(pi u (2x+1) / 2n)``.
    SciPy's DCT-II is this times 2; a positive factor does not change which coefficients exceed
    their median."""
    u = np.arange(k)[:, None]
    x = np.arange(n)[None, :]
    return np.cos(np.pi * u * (2 * x + 1) / (2 * n))




@functools.lru_cache(maxsize=1024)
def _dct_basis(n: int) -> np.ndarray:
    """The first 8 DCT-II basis rows for a side of ``n`` pixels (float32; memoised: sides repeat)."""
    return _dct_rows(n).astype(np.float32)


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in ``mode`` (``L`` or ``RGB``) as the datasets convert it."""
    return img if img.mode == mode else convert_image(img, mode)


@functools.lru_cache(maxsize=4096)
def _content_prefix(mode: str, width: int, height: int) -> bytes:
    """What the content hash reads before the pixels (memoised: sizes repeat)."""
    return f"{mode}:{width}x{height}:".encode()


def content_hash(img: Image.Image, raw: bytes | None = None) -> int:
    """First 8 bytes of BLAKE2b over mode, size and pixels, as an unsigned 64-bit integer
    (``raw``: ``img.tobytes()``, when the caller has it)."""
    h = hashlib.blake2b(_content_prefix(img.mode, *img.size), digest_size=8)
    h.update(img.tobytes() if raw is None else raw)
    return int.from_bytes(h.digest(), "big")


def dct_pixels(gray: Image.Image, raw: bytes | None = None) -> np.ndarray:
    """The (H, W) uint8 pixels the DCT reads of a grayscale (``L``) image: its own, or those of an
    integer box reduction (``Image.reduce``, in C) when its short side is at least twice
    ``MAX_DCT_SIDE``. ``raw``: ``gray.tobytes()``, when the caller has it (the array is a view of it)."""
    factor = min(gray.size) // MAX_DCT_SIDE
    if factor >= 2:
        gray, raw = gray.reduce(factor), None
    width, height = gray.size
    return np.frombuffer(gray.tobytes() if raw is None else raw, np.uint8).reshape(height, width)


def dct_coefficients(pixels: np.ndarray) -> np.ndarray:
    """The 8x8 lowest DCT-II coefficients (64 float32, row-major) of one (H, W) pixel array."""
    return dct_coefficients_batch([pixels])[0]


def dct_coefficients_batch(pixels: Sequence[np.ndarray]) -> np.ndarray:
    """The 8x8 lowest DCT-II coefficients ``(N, 64)`` float32 of (H, W) pixel arrays of any sizes:
    the images of each size stacked and multiplied by that size's basis rows together."""
    out = np.empty((len(pixels), HASH_SIDE * HASH_SIDE), np.float32)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(pixels):
        groups.setdefault(p.shape, []).append(i)
    for (height, width), rows in groups.items():
        stack = np.stack([pixels[i] for i in rows]).astype(np.float32)
        out[rows] = (_dct_basis(height) @ stack @ _dct_basis(width).T).reshape(len(rows), -1)
    return out


def hash_inputs(img: Image.Image, mode: str) -> tuple[int, np.ndarray]:
    """The per-image part of hashing, at the image's own resolution: ``(content_hash, pixels)``,
    ``pixels`` what :func:`dct_coefficients_batch` reads (:func:`dct_pixels`). One copy of the
    pixels (``tobytes``) serves both hashes of a grayscale image."""
    img = to_mode(img, mode)
    raw = img.tobytes()
    exact = content_hash(img, raw)
    return exact, (dct_pixels(img, raw) if mode == "L" else dct_pixels(img.convert("L")))


def phash_from_coefficients(coefficients: np.ndarray) -> np.ndarray:
    """64-bit perceptual hashes (uint64) from a batch of 8x8 low DCT coefficients (N, 64): the bits of
    the coefficients above their image's median, first coefficient in the most significant bit.
    The median of 64 values is the mean of the 32nd and 33rd, as ``np.median`` takes it (in float32)."""
    c = np.asarray(coefficients, dtype=np.float32).reshape(-1, HASH_SIDE * HASH_SIDE)
    if not len(c):
        return np.empty(0, np.uint64)
    middle = np.partition(c, (31, 32), axis=1)[:, 31:33]
    median = (middle[:, :1] + middle[:, 1:]) / np.float32(2)
    return np.packbits(c > median, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def hash_images(images: Iterable[Image.Image], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``(content_hash, phash)`` uint64 arrays of PIL images, in ``mode`` (``L`` or ``RGB``)."""
    exact, pixels = [], []
    for img in images:
        e, p = hash_inputs(img, mode)
        exact.append(e)
        pixels.append(p)
    return np.asarray(exact, dtype=np.uint64).reshape(-1), phash_from_coefficients(dct_coefficients_batch(pixels))


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
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


def pack_hashes(exact: Iterable[int], pixels: Sequence[np.ndarray]) -> bytes:
    """A worker batch's hashes as bytes (``(n, 2)`` uint64: content hash, phash) from its
    :func:`hash_inputs`: bytes pass through the DataLoader untouched, where a numpy array would
    become a tensor copied to the device."""
    phash = phash_from_coefficients(dct_coefficients_batch(pixels))
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
