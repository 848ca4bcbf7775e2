"""The weight swaps of a :class:`~tikmix_hf.mixture.DomainMixture`: which weights each sample index is drawn with.

The swaps are a list of ``(first sample index, weight vector)`` entries, oldest first; sample ``k`` is
drawn under the last entry whose start is ``<= k``. They live in shared-memory tensors, so DataLoader
workers (persistent ones too) see an entry published in the main process after they started, and
every publish bumps :attr:`WeightSwaps.version`, which tells a running stream to redraw under the
new entry. (A *schedule*, in this package, is the replayable weights-over-training of
:mod:`tikmix_hf.schedule`; the swaps are where a mixture's weights changed, by sample index.)

It also turns what users write (``"natural"``, ``"uniform"``, a mapping domain -> weight) into
validated, normalised weight vectors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..validation import off_simplex


class WeightSwaps:
    """The weight vectors of a mixture over ``domains`` and the sample index from which each applies.

    Args:
        domains: the domain names, in the order of the weight vectors.
        max_stages: how many entries there is room for (one per ``set_weights``).
    """

    def __init__(self, domains: Sequence[str], max_stages: int):
        self.domains = list(domains)
        m = len(self.domains)
        # Shared memory: visible to DataLoader workers (also persistent ones) after they started.
        self._start = torch.zeros(max_stages, dtype=torch.int64).share_memory_()
        self._weights = torch.zeros(max_stages, m, dtype=torch.float64).share_memory_()
        self._len = torch.zeros(1, dtype=torch.int64).share_memory_()
        # Bumped by every publish, after the entry is complete: a stream that drew under an older value redraws.
        self.version = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def capacity(self) -> int:
        """How many entries there is room for (``max_stages``)."""
        return self._start.numel()

    # ------------------------------------------------------------------ weights from what users write
    def resolve(self, spec: Any, sources: Sequence[Any], sizes: Mapping[str, float] | None) -> np.ndarray:
        """``"natural"``, ``"uniform"`` or a mapping as a normalised weight vector.

        ``sources`` are the mixture's domains, in order: ``"natural"`` weighs them by their tokens or
        examples unless ``sizes`` gives them.
        """
        if isinstance(spec, str):
            if spec == "uniform":
                return np.full(len(self.domains), 1.0 / len(self.domains))
            if spec == "natural":
                return self.natural(sources, sizes)
            raise ValueError(f"weights={spec!r}: use 'natural', 'uniform' or a mapping domain -> weight")
        return self.validate(spec, "weights")

    def natural(self, sources: Sequence[Any], sizes: Mapping[str, float] | None) -> np.ndarray:
        """Weights proportional to each domain's size: ``sizes``, else tokens when every domain knows
        them, else examples."""
        if sizes is not None:
            vec = self.validate(sizes, "sizes", normalise=False)
        elif all(s.num_tokens is not None for s in sources):
            vec = np.array([s.num_tokens for s in sources], dtype=np.float64)
        elif all(s.num_examples is not None for s in sources):
            vec = np.array([s.num_examples for s in sources], dtype=np.float64)
        else:
            unknown = [s.name for s in sources if s.num_examples is None]
            raise ValueError(
                f"weights='natural' needs the size of every domain, but {unknown} have no known length; "
                "pass sizes={domain: tokens_or_examples}, or weights='uniform' or an explicit mapping"
            )
        if vec.sum() <= 0:
            raise ValueError(f"weights='natural': every domain has size 0 ({dict(zip(self.domains, vec))})")
        return vec / vec.sum()

    def validate(self, weights: Any, arg: str, normalise: bool = True) -> np.ndarray:
        """A mapping domain -> non-negative number covering every domain, as a vector (normalised to sum
        to one unless ``normalise`` is false); ``arg`` names the argument in the errors."""
        if not isinstance(weights, Mapping):
            raise TypeError(f"{arg} must be a mapping domain -> weight, got {type(weights).__name__}")
        unknown = sorted(set(weights) - set(self.domains))
        if unknown:
            raise ValueError(f"{arg} names unknown domains {unknown}; the domains are {self.domains}")
        missing = [d for d in self.domains if d not in weights]
        if missing:
            raise ValueError(f"{arg} must give a weight for every domain; missing {missing} (use 0.0 to drop one)")
        vec = np.empty(len(self.domains), dtype=np.float64)
        for i, d in enumerate(self.domains):
            try:
                vec[i] = float(weights[d])
            except (TypeError, ValueError):
                raise ValueError(f"{arg}[{d!r}] = {weights[d]!r} is not a number") from None
            if not math.isfinite(vec[i]):
                raise ValueError(f"{arg}[{d!r}] = {vec[i]} is not finite; weights must be finite and >= 0")
            if vec[i] < 0:
                raise ValueError(f"{arg}[{d!r}] = {vec[i]} is negative; weights must be >= 0")
        total = vec.sum()
        if total <= 0:
            raise ValueError(f"{arg} are all zero ({dict(weights)}); at least one domain needs a positive weight")
        return vec / total if normalise else vec

    # ------------------------------------------------------------------ entries
    def publish(self, start: int, vec: np.ndarray) -> None:
        """Append the entry ``(start, vec)``; one with the same start as the last replaces it."""
        n = int(self._len[0])
        if n and start < int(self._start[n - 1]):
            raise ValueError(
                f"a weight change must start at or after the previous one (index {int(self._start[n - 1])}), "
                f"got {start}"
            )
        if n and start == int(self._start[n - 1]):
            n -= 1  # replace an entry that has not taken effect yet
        if n >= self.capacity:
            raise RuntimeError(
                f"no room for another weight swap ({self.capacity} entries); "
                "create the DomainMixture with a larger max_stages"
            )
        self._start[n] = start
        self._weights[n] = torch.from_numpy(vec)
        self._len[0] = n + 1  # published last: readers never see a half-written entry
        self.version += 1

    def replace(self, starts: np.ndarray, rows: np.ndarray) -> None:
        """Make the swaps exactly ``starts`` / ``rows`` (from :meth:`check_saved`)."""
        self._len[0] = 0
        for s, row in zip(starts, rows):
            self.publish(int(s), row)

    def check_saved(self, entries: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """The starts and weight rows of saved swaps whose rows have the right shape, refused with a
        ``ValueError`` unless every row is on the simplex, the starts begin at 0 and strictly increase,
        and they fit."""
        # Saved rows were on the simplex when they were swapped in, so no entry may be negative at all.
        if any(off_simplex(r)[0] or np.any(r < 0) for _, r in entries):
            raise ValueError("corrupt DomainMixture state: a swapped-in weight vector is not on the simplex")
        starts_list = [s for s, _ in entries]
        if starts_list[0] != 0 or any(b <= a for a, b in itertools.pairwise(starts_list)):
            raise ValueError("corrupt DomainMixture state: swap starts must begin at 0 and strictly increase")
        if len(entries) > self.capacity:
            raise ValueError(
                f"the state has {len(entries)} weight swaps; create the mixture with max_stages >= that"
            )
        starts = np.array([s for s, _ in entries], dtype=np.int64)
        rows = np.stack([r for _, r in entries])  # bit-exact: no renormalisation
        return starts, rows

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the entries' starts ``[n]`` and weights ``[n, domains]``."""
        n = int(self._len[0])
        return self._start[:n].numpy().copy(), self._weights[:n].numpy().copy()

    def latest(self) -> dict[str, float]:
        """The weights of the last entry."""
        _, w = self.arrays()
        return dict(zip(self.domains, map(float, w[-1])))

    def latest_start(self) -> int:
        """The sample index from which the last entry applies."""
        starts, _ = self.arrays()
        return int(starts[-1])

    def entries(self) -> list[tuple[int, dict[str, float]]]:
        """Every entry as ``(first sample index, weights)``, oldest first."""
        starts, w = self.arrays()
        return [(int(s), dict(zip(self.domains, map(float, row)))) for s, row in zip(starts, w)]

    def at(self, index: int) -> dict[str, float]:
        """The weights that sample ``index`` is drawn with."""
        starts, w = self.arrays()
        entry = int(np.searchsorted(starts, index, side="right")) - 1
        return dict(zip(self.domains, map(float, w[entry])))
