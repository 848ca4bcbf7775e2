"""A keyed pseudo-random bijection over ``[0, n)``: a shuffle that is computed, never stored.

A balanced Feistel network permutes ``[0, 4**h)`` for the smallest ``h`` with ``4**h >= n``; cycle
walking (apply it again while the value is ``>= n``) restricts it to ``[0, n)``. Because
``4**h < 4 n``, a value needs fewer than four rounds of walking on average. Memory is O(1) and each
index costs O(1), whatever ``n`` is, so a domain of 10^8 rows is shuffled as cheaply as one of ten.

The round function is the splitmix64 finaliser, and the round keys come from a seeded numpy
generator, so one integer tuple (seed, tag, domain, epoch, ...) names one permutation.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 6  # Luby-Rackoff: four rounds already make a pseudo-random permutation; two more are cheap
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def derive_key(*parts: int, size: int = _ROUNDS) -> np.ndarray:
    """``size`` 64-bit keys named by the non-negative integers ``parts``."""
    return np.random.default_rng([int(p) for p in parts]).integers(0, 2**63, size=size, dtype=np.uint64)


class KeyedBijection:
    """A permutation of ``[0, n)`` chosen by ``key``; ``perm(x)`` maps an index array to its images.

    Example:
        >>> p = KeyedBijection(10, derive_key(0, 1))
        >>> sorted(p(np.arange(10)).tolist()) == list(range(10))
        True
    """

    __slots__ = ("_half", "_keys", "_mask", "n")

    def __init__(self, n: int, key: np.ndarray):
        if n < 1:
            raise ValueError(f"a bijection needs n >= 1, got n={n}")
        self.n = int(n)
        half = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self._half = np.uint64(half)
        self._mask = np.uint64((1 << half) - 1)
        self._keys = np.asarray(key, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._mask
        with np.errstate(over="ignore"):
            for k in self._keys:
                left, right = right, left ^ (_mix(right ^ k) & self._mask)
        return (left << self._half) | right

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.int64)
        if self.n == 1:
            return np.zeros_like(x)
        y = self._feistel(x.astype(np.uint64))
        out_of_range = y >= np.uint64(self.n)
        while out_of_range.any():  # cycle walking: ends because the Feistel map permutes [0, 4**h)
            y[out_of_range] = self._feistel(y[out_of_range])
            out_of_range = y >= np.uint64(self.n)
        return y.astype(np.int64)


def row_hash(key: int, shard: int, offsets: np.ndarray) -> np.ndarray:
    """A uniform number in ``[0, 1)`` per (shard, offset) row address, for hash-chosen row subsets."""
    with np.errstate(over="ignore"):
        z = np.asarray(offsets, dtype=np.uint64) * _GOLDEN
        z ^= np.uint64(key & (2**64 - 1)) ^ (np.uint64(shard) * _M1)
        z = _mix(_mix(z))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
