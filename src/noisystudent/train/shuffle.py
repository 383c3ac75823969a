"""A random permutation of ``range(size)`` evaluated one position at a time, in O(1) memory.

The training streams visit a dataset in a fresh random order every pass. Drawing that order with
``rng.permutation(size)`` costs 8 bytes per item: 1 GB for the paper's 130M selected images, in
every process. Instead, position ``p`` of pass ``e`` maps to ``feistel(p)``: a 4-round Feistel
network keyed by ``(seed, pass)`` over the smallest even-bit domain holding ``size``, with cycle
walking to stay below ``size``. A Feistel network is a bijection for any round function, so this
is an exact permutation, and it is the same on every platform and in every process (numpy has no
such bounded-memory permutation; written here for that reason).
"""

from __future__ import annotations

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
ROUNDS = 4


def _splitmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (wraps modulo 2^64)."""
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """``perm[positions]`` of a random permutation of ``range(size)`` keyed by ``key``."""

    def __init__(self, size: int, key: int):
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = int(size)
        bits = max(2, int(self.size - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        keys = _splitmix(np.arange(ROUNDS, dtype=np.uint64) + np.uint64(key & 0xFFFFFFFFFFFFFFFF))
        self.round_keys = keys

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (_splitmix(right ^ k) & self.mask)
        return (left << h) | right

    def __getitem__(self, positions) -> np.ndarray:
        x = np.asarray(positions, dtype=np.uint64)
        if x.size and int(x.max()) >= self.size:
            raise IndexError("position out of range")
        y = self._encrypt(x)
        out_of_range = y >= np.uint64(self.size)
        while out_of_range.any():  # cycle walking: re-encrypt until inside range(size)
            y[out_of_range] = self._encrypt(y[out_of_range])
            out_of_range = y >= np.uint64(self.size)
        return y.astype(np.int64)
