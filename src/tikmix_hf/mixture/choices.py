"""The domain choice of every sample index of a mixture's stream, and the draws it adds up to.

Sample ``k`` draws a uniform number ``u_k`` from a counter-based generator keyed by
``(seed, k // 8192)`` and takes the domain whose cumulative weight interval holds ``u_k``, under
the weight swap in effect at ``k``: a pure function of ``(seed, k, weight swaps)``, so every
copy of the stream computes the same choices without talking to the others. From the choices follow
each domain's draw count by an index and, for streamed domains read by shard, each reader's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .sources import TAG_CHOICE
from .swaps import WeightSwaps

_U_BLOCK = 8192  # uniforms are generated in blocks of this many sample indices


def rank_of(index: np.ndarray, ranks: int, chunk: int) -> np.ndarray:
    """The rank that keeps each sample: rank ``p`` keeps the ``p``-th of ``ranks`` equal slices of
    every chunk of ``chunk`` samples (accelerate's IterableDatasetShard)."""
    return (index % chunk) // (chunk // ranks)


class ReaderLayout(NamedTuple):
    """How the stream is read: ``workers`` DataLoader workers on each of ``ranks`` processes, each worker taking
    whole batches of ``batch`` samples (0 where one reader reads everything). Streamed domains read by shard are
    a different stream in each layout, so a saved state keeps it (as the list ``[workers, ranks, batch]``)."""

    workers: int
    ranks: int
    batch: int

    @property
    def readers(self) -> int:
        """The (rank, worker) readers: reader ``q = worker * ranks + rank``."""
        return self.workers * self.ranks

    def describe(self) -> str:
        """The layout in words, for an error message."""
        per_batch = f", {self.batch} samples per worker batch" if self.batch else ""
        return (f"{tuple(self)} (workers, ranks, batch: {self.workers} DataLoader worker(s) x {self.ranks} "
                f"rank(s){per_batch})")


def reader_of(index: np.ndarray, layout: tuple[int, int, int]) -> np.ndarray:
    """Logical reader of each sample: chunk ``k // chunk`` goes to worker ``(k // chunk) % W``, and
    within it to the rank of :func:`rank_of`."""
    workers, ranks, chunk = layout
    if workers * ranks == 1:
        return np.zeros(len(index), dtype=np.int64)
    return ((index // chunk) % workers) * ranks + rank_of(index, ranks, chunk)


def draw_numbers(ids: np.ndarray, cursors: np.ndarray) -> np.ndarray:
    """The per-domain draw number of each sample, continuing from ``cursors``."""
    draw = np.empty(len(ids), dtype=np.int64)
    for d in np.unique(ids):
        where = np.flatnonzero(ids == d)
        draw[where] = cursors[d] + np.arange(len(where))
    return draw


class DomainChoices:
    """The domain of every sample index under ``swaps``, with the counts it implies (cached).

    Args:
        seed: the mixture's seed.
        swaps: the mixture's weight swaps, read at every call that is not given others.
    """

    def __init__(self, seed: int, swaps: WeightSwaps):
        self.seed, self.swaps = seed, swaps
        m = len(swaps.domains)
        self._count_cache: tuple[int, np.ndarray] = (0, np.zeros(m, dtype=np.int64))
        self._reader_cache: tuple[tuple, int, np.ndarray | None] = ((), 0, None)
        self._u_cache: tuple[int, np.ndarray] = (-1, np.empty(0))  # (block, its uniforms); block -1: none yet

    def _uniforms(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=np.float64)
        k = start
        while k < stop:
            block, offset = divmod(k, _U_BLOCK)
            take = min(_U_BLOCK - offset, stop - k)
            if self._u_cache[0] != block:
                self._u_cache = (block, np.random.default_rng([self.seed, TAG_CHOICE, block]).random(_U_BLOCK))
            u = self._u_cache[1]
            out[k - start : k - start + take] = u[offset : offset + take]
            k += take
        return out

    def domain_ids(self, start: int, stop: int, swaps: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Domain index of every sample in ``[start, stop)`` (a pure function of seed and swaps)."""
        starts, weights = swaps if swaps is not None else self.swaps.arrays()
        u = self._uniforms(start, stop)
        idx = np.arange(start, stop)
        entry = np.searchsorted(starts, idx, side="right") - 1
        out = np.empty(stop - start, dtype=np.int64)
        for e in np.unique(entry):
            mask = entry == e
            cum = np.cumsum(weights[e])
            out[mask] = np.minimum(np.searchsorted(cum, u[mask] * cum[-1], side="right"), len(cum) - 1)
        return out

    def counts(self, upto: int, swaps: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Draws of each domain by samples ``[0, upto)``, under ``swaps`` (default: the current ones)."""
        if upto < 0:
            raise ValueError(f"upto must be >= 0, got {upto}")
        cached_at, cached = self._count_cache if swaps is None else (0, None)
        if cached is None or upto < cached_at:
            cached_at, cached = 0, np.zeros(len(self.swaps.domains), dtype=np.int64)
        counts = cached.copy()
        step = 1 << 20
        for a in range(cached_at, upto, step):
            b = min(a + step, upto)
            counts += np.bincount(self.domain_ids(a, b, swaps), minlength=len(self.swaps.domains))
        if swaps is None:
            self._count_cache = (upto, counts.copy())
        return counts

    def reader_counts(self, upto: int, layout: tuple[int, int, int]) -> np.ndarray:
        """Draws of each (reader, domain) by samples ``[0, upto)``: a pure function of the layout."""
        readers, m = layout[0] * layout[1], len(self.swaps.domains)
        cached_layout, cached_at, cached = self._reader_cache
        if cached_layout != layout or cached is None or upto < cached_at:
            cached_at, cached = 0, np.zeros(readers * m, dtype=np.int64)
        counts = cached.copy()
        step = 1 << 20
        for a in range(cached_at, upto, step):
            b = min(a + step, upto)
            key = reader_of(np.arange(a, b), layout) * m + self.domain_ids(a, b)
            counts += np.bincount(key, minlength=readers * m)
        self._reader_cache = (layout, upto, counts.copy())
        return counts.reshape(readers, m)

    def forget_from(self, start: int) -> None:
        """The weights changed from sample ``start`` on: drop cached counts that reach past it."""
        if start < self._count_cache[0]:
            self._count_cache = (0, np.zeros(len(self.swaps.domains), dtype=np.int64))
        if start < self._reader_cache[1]:
            self._reader_cache = ((), 0, None)

    def remember(self, upto: int, counts: np.ndarray) -> None:
        """Cache ``counts``, known to be the draws of samples ``[0, upto)`` under the current swaps."""
        self._count_cache = (upto, counts)
