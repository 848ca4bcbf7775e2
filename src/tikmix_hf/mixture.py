"""The data plane: a training stream over named domains whose weights can change mid-run.

:class:`DomainMixture` is a ``torch.utils.data.IterableDataset``. Sample ``k`` of the stream is a
pure function of ``(seed, k, weight schedule)``:

1. a uniform number ``u_k`` comes from a counter-based generator keyed by ``(seed, k // 8192)``;
2. the domain is the one whose cumulative weight interval holds ``u_k``, under the weights of the
   last schedule entry whose start is ``<= k``;
3. the example is the ``c``-th draw of that domain, where ``c`` counts the earlier samples that
   chose it; map-style sources read ``permutation_{pass}[c % n]`` directly (one permutation per
   pass through the domain), iterable sources are read sequentially with a seeded shuffle buffer.

Because nothing depends on which process draws a sample, every rank and every DataLoader worker
sees the same stream, a weight change applies from one declared sample index on every copy, and
a saved position (index plus per-domain cursors) resumes the stream without replaying it.

The schedule lives in shared-memory tensors, so DataLoader workers (persistent ones too) see a
:meth:`DomainMixture.set_weights` made in the main process after they started.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

STATE_FORMAT = "tikmix_hf.DomainMixture/1"
EXHAUSTED_POLICIES = ("cycle", "stop")
_U_BLOCK = 8192  # uniforms are generated in blocks of this many sample indices
_HW_SLOTS = 257  # slot 0: the main process; slot 1 + i: DataLoader worker i
# Tags that keep the independent random streams of one seed apart.
_TAG_CHOICE, _TAG_PERM, _TAG_BUFFER, _TAG_PROBE = 0x7D1, 0x7D2, 0x7D3, 0x7D4


class _MapSource:
    """A sized, indexable domain (``datasets.Dataset``, list, torch map-style dataset)."""

    random_access = True

    def __init__(self, name: str, data: Any, seed: int, domain_id: int, shuffle: bool):
        self.name, self.data, self.seed, self.domain_id, self.shuffle = name, data, seed, domain_id, shuffle
        self.n = len(data)
        if self.n == 0:
            raise ValueError(f"domain {name!r} is empty (0 examples); remove it or give it data")
        self.lengths = _example_lengths(data)
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def num_examples(self) -> int:
        return self.n

    @property
    def num_tokens(self) -> int | None:
        return None if self.lengths is None else int(self.lengths.sum())

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, _TAG_PERM, self.domain_id, epoch])
                perm = rng.permutation(self.n)
            else:
                perm = np.arange(self.n)
            if len(self._perm_cache) > 2:
                self._perm_cache.clear()
            self._perm_cache[epoch] = perm
        return perm

    def index_of(self, cursor: int) -> int:
        epoch, pos = divmod(int(cursor), self.n)
        return int(self._perm(epoch)[pos])

    def get_many(self, cursors: np.ndarray) -> list:
        indices = [self.index_of(c) for c in cursors]
        getitems = getattr(self.data, "__getitems__", None)
        if getitems is not None:
            return list(getitems(indices))
        return [self.data[i] for i in indices]

    def tokens_drawn(self, count: int) -> int | None:
        if self.lengths is None:
            return None
        full, rest = divmod(int(count), self.n)
        total = full * int(self.lengths.sum())
        if rest:
            total += int(self.lengths[self._perm(full)[:rest]].sum())
        return total

    def probe(self, n: int, round_: int) -> list:
        rng = np.random.default_rng([self.seed, _TAG_PROBE, self.domain_id, round_])
        order = np.concatenate([rng.permutation(self.n) for _ in range(math.ceil(n / self.n))])[:n]
        return [self.data[int(i)] for i in order]


class _Row:
    """Row ``i`` of a column batch, turned into a dict only if somebody keeps it.

    Every DataLoader worker reads the whole of an iterable domain but keeps only its own samples,
    so the rows the other workers keep are skipped without being built.
    """

    __slots__ = ("batch", "i")

    def __init__(self, batch: dict, i: int):
        self.batch, self.i = batch, i

    def get(self) -> dict:
        return {key: column[self.i] for key, column in self.batch.items()}


def _materialise(example: Any) -> Any:
    return example.get() if isinstance(example, _Row) else example


class _IterSource:
    """A domain that can only be read in order (``datasets.IterableDataset`` or a re-iterable)."""

    random_access = False
    num_tokens = None

    def __init__(self, name: str, data: Any, seed: int, domain_id: int, buffer: int, size: int | None):
        if iter(data) is data:
            raise TypeError(
                f"domain {name!r} is a one-shot iterator ({type(data).__name__}); the mixture reads each "
                "domain several times, so pass a re-iterable (a list, a datasets.Dataset or IterableDataset, "
                "or an object whose __iter__ returns a fresh iterator)"
            )
        self.name, self.data, self.seed, self.domain_id, self.buffer = name, data, seed, domain_id, buffer
        self.num_examples = size

    def _raw(self) -> Iterator:
        # datasets.IterableDataset splits its shards between DataLoader workers when iterated inside
        # one; every worker here must see the whole domain, so read it through .iter(), which does not.
        if hasattr(self.data, "iter") and hasattr(self.data, "_ex_iterable"):
            for batch in self.data.iter(batch_size=256):
                for i in range(len(next(iter(batch.values())))):
                    yield _Row(batch, i)
        else:
            yield from self.data

    def _one_pass(self, pass_: int) -> Iterator:
        if self.buffer <= 1:
            yield from self._raw()
            return
        rng = np.random.default_rng([self.seed, _TAG_BUFFER, self.domain_id, pass_])
        buf: list = []
        for example in self._raw():
            if len(buf) < self.buffer:
                buf.append(example)
                continue
            j = int(rng.integers(self.buffer))
            yield buf[j]
            buf[j] = example
        rng.shuffle(buf)
        yield from buf

    def reader(self, start_cursor: int, cycle: bool) -> Iterator:
        """Yield the domain's draws from ``start_cursor`` on; ``None`` marks exhaustion (policy stop)."""
        cursor, pass_ = 0, 0
        while True:
            empty = True
            for example in self._one_pass(pass_):
                empty = False
                if cursor >= start_cursor:
                    yield example
                cursor += 1
            if empty:
                raise ValueError(f"domain {self.name!r} yielded no examples; remove it or give it data")
            if not cycle:
                while True:
                    yield None
            pass_ += 1

    def probe(self, n: int, round_: int) -> list:
        out: list = []
        pass_ = 1_000_003 + round_  # shuffle passes that training (passes 0, 1, ...) does not use early
        while len(out) < n:
            before = len(out)
            for example in self._one_pass(pass_):
                out.append(_materialise(example))
                if len(out) == n:
                    break
            if len(out) == before:
                raise ValueError(f"domain {self.name!r} yielded no examples; remove it or give it data")
            pass_ += 1
        return out


def _example_lengths(data: Any) -> np.ndarray | None:
    """Token count per example when the examples carry ``input_ids``; ``None`` otherwise."""
    try:
        import datasets

        if isinstance(data, datasets.Dataset):
            if "input_ids" not in data.column_names:
                return None
            if data._indices is None:
                import pyarrow.compute as pc

                col = data.data.table.column("input_ids")
                return np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False), dtype=np.int64)
            return np.fromiter((len(x) for x in data["input_ids"]), dtype=np.int64, count=len(data))
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    if isinstance(data, Sequence) and len(data) and isinstance(data[0], Mapping) and "input_ids" in data[0]:
        return np.fromiter((len(x["input_ids"]) for x in data), dtype=np.int64, count=len(data))
    return None


def _is_map_style(data: Any) -> bool:
    try:
        import datasets

        if isinstance(data, datasets.IterableDataset):
            return False
        if isinstance(data, datasets.Dataset):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(data, torch.utils.data.IterableDataset):
        return False
    return hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (str, bytes, Mapping))


class DomainMixture(IterableDataset):
    """A training stream over named domains with sampling weights that can change while training runs.

    Args:
        sources: domain name -> data. Each value is a ``datasets.Dataset`` (or any sized, indexable
            sequence of examples), a ``datasets.IterableDataset`` (streaming ``load_dataset`` too), or a
            re-iterable of example dicts. Examples come out unchanged.
        weights: ``"natural"`` (proportional to each domain's size: tokens when every domain's examples
            carry ``input_ids``, else examples), ``"uniform"``, or a mapping domain -> non-negative weight
            covering every domain (normalised to sum to one).
        seed: the stream is a pure function of ``(seed, sample index, weight schedule)``.
        exhausted: what happens when a domain runs out: ``"cycle"`` (start a new pass with a new shuffle)
            or ``"stop"`` (the stream ends at the first sample that would need a new pass).
        shuffle: shuffle map-style domains (a new permutation per pass); iterable domains are shuffled
            through a seeded buffer of ``shuffle_buffer`` examples (0 or 1 keeps source order).
        num_samples: optional length of one epoch, which lets the Trainer train by epochs; without it the
            stream is endless and the Trainer needs ``max_steps``.
        sizes: optional domain -> size, for ``weights="natural"`` with iterable domains of unknown size.
        max_stages: capacity of the weight schedule (one entry per ``set_weights``).

    Example:
        >>> mixture = DomainMixture({"code": ds_code, "law": ds_law}, weights="natural", seed=0)
        >>> mixture.weights                       # doctest: +SKIP
        {'code': 0.7, 'law': 0.3}
        >>> start = mixture.set_weights({"code": 0.5, "law": 0.5})  # doctest: +SKIP

    With DataLoader workers, each worker produces whole batches, so the mixture must know how many
    stream samples one worker batch consumes: :class:`~tikmix_hf.TiKMiXCallback` sets it; without the
    callback call :meth:`bind_loader`.
    """

    def __init__(
        self,
        sources: Mapping[str, Any],
        weights: str | Mapping[str, float] = "natural",
        *,
        seed: int = 0,
        exhausted: str = "cycle",
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        num_samples: int | None = None,
        sizes: Mapping[str, float] | None = None,
        max_stages: int = 1024,
    ):
        super().__init__()
        if not isinstance(sources, Mapping) or not sources:
            raise ValueError(f"sources must be a non-empty mapping of domain name -> data, got {sources!r:.80}")
        if len(sources) < 2:
            warnings.warn("DomainMixture with a single domain: there is nothing to mix", stacklevel=2)
        for name in sources:
            if not isinstance(name, str) or not name:
                raise ValueError(f"domain names must be non-empty strings, got {name!r}")
        if exhausted not in EXHAUSTED_POLICIES:
            raise ValueError(f"exhausted={exhausted!r} is not one of {EXHAUSTED_POLICIES}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples <= 0):
            raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}")
        if not isinstance(max_stages, int) or max_stages < 1:
            raise ValueError(f"max_stages must be a positive int, got {max_stages!r}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer!r}")

        self.domains: list[str] = list(sources)
        self.seed, self.exhausted, self.shuffle, self.shuffle_buffer = seed, exhausted, shuffle, shuffle_buffer
        self.num_samples = num_samples
        self._sizes = sizes
        self._sources = []
        for i, (name, data) in enumerate(sources.items()):
            if _is_map_style(data):
                self._sources.append(_MapSource(name, data, seed, i, shuffle))
            else:
                size = None if sizes is None else sizes.get(name)
                self._sources.append(_IterSource(name, data, seed, i, shuffle_buffer if shuffle else 0, size))

        m = len(self.domains)
        # Shared memory: visible to DataLoader workers (also persistent ones) after they started.
        self._sched_start = torch.zeros(max_stages, dtype=torch.int64).share_memory_()
        self._sched_weights = torch.zeros(max_stages, m, dtype=torch.float64).share_memory_()
        self._sched_len = torch.zeros(1, dtype=torch.int64).share_memory_()
        # [seek index, epoch, samples per worker batch, num_workers, prefetch_factor, schedule version,
        #  samples per micro-step over all ranks]
        self._ctrl = torch.tensor([0, 0, 0, 0, 2, 0, 0], dtype=torch.int64).share_memory_()
        self._seek_cursors = torch.zeros(m, dtype=torch.int64).share_memory_()
        self._high_water = torch.zeros(_HW_SLOTS, dtype=torch.int64).share_memory_()
        self._position = 0  # samples yielded by the last in-process iterator (exact with num_workers=0)
        self._count_cache: tuple[int, np.ndarray] = (0, np.zeros(m, dtype=np.int64))
        self._u_cache: tuple[int, np.ndarray | None] = (-1, None)

        self._publish(0, self._resolve_initial(weights, sizes))

    # ------------------------------------------------------------------ weights
    def _resolve_initial(self, weights: Any, sizes: Mapping[str, float] | None) -> np.ndarray:
        if isinstance(weights, str):
            if weights == "uniform":
                return np.full(len(self.domains), 1.0 / len(self.domains))
            if weights == "natural":
                return self._natural(sizes)
            raise ValueError(f"weights={weights!r}: use 'natural', 'uniform' or a mapping domain -> weight")
        return self._validate(weights, "weights")

    def resolve_weights(self, spec: str | Mapping[str, float]) -> dict[str, float]:
        """``"natural"``, ``"uniform"`` or a mapping, as normalised weights per domain (nothing is changed)."""
        return dict(zip(self.domains, map(float, self._resolve_initial(spec, self._sizes))))

    def _natural(self, sizes: Mapping[str, float] | None) -> np.ndarray:
        if sizes is not None:
            vec = self._validate(sizes, "sizes", normalise=False)
        elif all(s.num_tokens is not None for s in self._sources):
            vec = np.array([s.num_tokens for s in self._sources], dtype=np.float64)
        elif all(s.num_examples is not None for s in self._sources):
            vec = np.array([s.num_examples for s in self._sources], dtype=np.float64)
        else:
            unknown = [s.name for s in self._sources if s.num_examples is None]
            raise ValueError(
                f"weights='natural' needs the size of every domain, but {unknown} have no known length; "
                "pass sizes={domain: tokens_or_examples}, or weights='uniform' or an explicit mapping"
            )
        if vec.sum() <= 0:
            raise ValueError(f"weights='natural': every domain has size 0 ({dict(zip(self.domains, vec))})")
        return vec / vec.sum()

    def _validate(self, weights: Any, arg: str, normalise: bool = True) -> np.ndarray:
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

    def _publish(self, start: int, vec: np.ndarray) -> None:
        n = int(self._sched_len[0])
        if n and start < int(self._sched_start[n - 1]):
            raise ValueError(
                f"a weight change must start at or after the previous one (index {int(self._sched_start[n - 1])}), "
                f"got {start}"
            )
        if n and start == int(self._sched_start[n - 1]):
            n -= 1  # replace an entry that has not taken effect yet
        if n >= self._sched_start.numel():
            raise RuntimeError(
                f"the weight schedule is full ({self._sched_start.numel()} entries); "
                "create the DomainMixture with a larger max_stages"
            )
        self._sched_start[n] = start
        self._sched_weights[n] = torch.from_numpy(vec)
        self._sched_len[0] = n + 1  # published last: readers never see a half-written entry
        self._ctrl[5] += 1
        if start < self._count_cache[0]:
            self._count_cache = (0, np.zeros(len(self.domains), dtype=np.int64))

    def _schedule_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        n = int(self._sched_len[0])
        return self._sched_start[:n].numpy().copy(), self._sched_weights[:n].numpy().copy()

    @property
    def weights(self) -> dict[str, float]:
        """The most recently set weights (in effect from :attr:`weights_from` on)."""
        _, w = self._schedule_arrays()
        return dict(zip(self.domains, map(float, w[-1])))

    @property
    def weights_from(self) -> int:
        """The sample index from which :attr:`weights` apply."""
        starts, _ = self._schedule_arrays()
        return int(starts[-1])

    @property
    def schedule(self) -> list[tuple[int, dict[str, float]]]:
        """Every weight change as ``(first sample index, weights)``, oldest first."""
        starts, w = self._schedule_arrays()
        return [(int(s), dict(zip(self.domains, map(float, row)))) for s, row in zip(starts, w)]

    def weights_at(self, index: int) -> dict[str, float]:
        """The weights that sample ``index`` is drawn with."""
        starts, w = self._schedule_arrays()
        entry = int(np.searchsorted(starts, index, side="right")) - 1
        return dict(zip(self.domains, map(float, w[entry])))

    def lag_samples(self) -> int:
        """How many samples past the consumer the data pipeline can have drawn already.

        Bound: the workers' prefetch queue (``num_workers * prefetch_factor`` worker batches) plus
        accelerate's one-batch look-ahead plus one batch of margin; ``samples per batch`` is the value
        given to :meth:`bind_loader` (1 when unbound).
        """
        per_batch = max(int(self._ctrl[2]), int(self._ctrl[6]), 1)
        workers, prefetch = int(self._ctrl[3]), int(self._ctrl[4])
        return per_batch * (workers * prefetch + 2)

    def set_weights(self, weights: Mapping[str, float], *, at: int | None = None) -> int:
        """Schedule new weights; return the sample index from which they apply.

        Args:
            weights: domain -> non-negative weight for every domain (normalised to sum to one).
            at: the first sample index to use them. ``None`` takes the earliest safe index: the next
                sample no copy of the stream has drawn yet. Pass an explicit index, identical on every
                rank, for runs that must be reproducible (the callback does: consumed samples plus
                :meth:`lag_samples`).

        Raises:
            ValueError: ``at`` lies before samples that were already drawn with the old weights, or
                before an earlier scheduled change.
        """
        vec = self._validate(weights, "weights")
        drawn = int(self._high_water.max())
        if at is None:
            at = max(drawn, self._position, self.weights_from)
        elif not isinstance(at, (int, np.integer)) or at < 0:
            raise ValueError(f"at must be a non-negative int sample index, got {at!r}")
        elif at < drawn:
            raise ValueError(
                f"at={at} lies before sample {drawn}, which the data pipeline has already drawn with the old "
                f"weights; use at >= {drawn} (the lag bound {self.lag_samples()} may be too small: check "
                "bind_loader's num_workers and prefetch_factor)"
            )
        self._publish(int(at), vec)
        return int(at)

    # ------------------------------------------------------------------ the pure stream
    def _uniforms(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=np.float64)
        k = start
        while k < stop:
            block, offset = divmod(k, _U_BLOCK)
            take = min(_U_BLOCK - offset, stop - k)
            if self._u_cache[0] != block:
                self._u_cache = (block, np.random.default_rng([self.seed, _TAG_CHOICE, block]).random(_U_BLOCK))
            u = self._u_cache[1]
            out[k - start : k - start + take] = u[offset : offset + take]
            k += take
        return out

    def domain_ids(self, start: int, stop: int, schedule: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Domain index of every sample in ``[start, stop)`` (a pure function of seed and schedule)."""
        starts, weights = schedule if schedule is not None else self._schedule_arrays()
        u = self._uniforms(start, stop)
        idx = np.arange(start, stop)
        entry = np.searchsorted(starts, idx, side="right") - 1
        out = np.empty(stop - start, dtype=np.int64)
        for e in np.unique(entry):
            mask = entry == e
            cum = np.cumsum(weights[e])
            out[mask] = np.minimum(np.searchsorted(cum, u[mask] * cum[-1], side="right"), len(cum) - 1)
        return out

    def counts(self, upto: int) -> dict[str, int]:
        """Examples drawn from each domain by samples ``[0, upto)``."""
        return dict(zip(self.domains, map(int, self._counts(upto))))

    def _counts(self, upto: int, schedule: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        if upto < 0:
            raise ValueError(f"upto must be >= 0, got {upto}")
        cached_at, cached = self._count_cache if schedule is None else (0, None)
        if cached is None or upto < cached_at:
            cached_at, cached = 0, np.zeros(len(self.domains), dtype=np.int64)
        counts = cached.copy()
        step = 1 << 20
        for a in range(cached_at, upto, step):
            b = min(a + step, upto)
            counts += np.bincount(self.domain_ids(a, b, schedule), minlength=len(self.domains))
        if schedule is None:
            self._count_cache = (upto, counts.copy())
        return counts

    def exhausted_domains(self, upto: int) -> list[str]:
        """Map-style domains that samples ``[0, upto)`` would draw past their end (policy ``"stop"``).

        Iterable domains are not listed: their length is only known once they were read to the end.
        """
        counts = self._counts(upto)
        return [s.name for s, c in zip(self._sources, counts) if isinstance(s, _MapSource) and c > s.n]

    def drawn(self, upto: int) -> dict[str, dict[str, int | None]]:
        """Examples and tokens drawn from each domain by samples ``[0, upto)``.

        Tokens are exact for map-style domains whose examples carry ``input_ids`` and ``None`` where
        the length of an example is unknown without reading it.
        """
        counts = self._counts(upto)
        return {
            s.name: {
                "examples": int(c),
                "tokens": s.tokens_drawn(int(c)) if isinstance(s, _MapSource) else None,
            }
            for s, c in zip(self._sources, counts)
        }

    def example_ids(self, start: int, stop: int) -> list[tuple[str, int]]:
        """``(domain, draw number)`` of each sample in ``[start, stop)``; for map-style domains the
        draw number is mapped to the source index. A cheap identity for tests and audits."""
        ids = self.domain_ids(start, stop)
        cursors = self._counts(start).copy()
        out = []
        for d in ids:
            src = self._sources[d]
            c = int(cursors[d])
            out.append((src.name, src.index_of(c) if isinstance(src, _MapSource) else c))
            cursors[d] += 1
        return out

    # ------------------------------------------------------------------ position, epochs, loaders
    def bind_loader(
        self,
        samples_per_batch: int,
        num_workers: int = 0,
        prefetch_factor: int | None = 2,
        global_batch: int | None = None,
    ) -> None:
        """Tell the mixture how the DataLoader reads it.

        Args:
            samples_per_batch: stream samples one DataLoader batch consumes (the per-device batch size;
                times the number of processes when accelerate shards an iterable with
                ``dispatch_batches=False``).
            num_workers, prefetch_factor: the DataLoader's, for the lag bound of :meth:`lag_samples`.
            global_batch: stream samples consumed per micro-step over all ranks (default
                ``samples_per_batch``); accelerate's look-ahead fetches one such batch early.
        """
        if not isinstance(samples_per_batch, int) or samples_per_batch < 1:
            raise ValueError(f"samples_per_batch must be a positive int, got {samples_per_batch!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        if global_batch is not None and (not isinstance(global_batch, int) or global_batch < 1):
            raise ValueError(f"global_batch must be a positive int or None, got {global_batch!r}")
        self._ctrl[2] = samples_per_batch
        self._ctrl[3] = num_workers
        self._ctrl[4] = 2 if prefetch_factor is None else int(prefetch_factor)
        self._ctrl[6] = samples_per_batch if global_batch is None else global_batch

    def seek(self, index: int) -> None:
        """Make the next iterator start at sample ``index`` (cursors computed, nothing replayed)."""
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"index must be a non-negative int, got {index!r}")
        self._set_seek(int(index), self._counts(int(index)))

    def _set_seek(self, index: int, cursors: np.ndarray) -> None:
        self._seek_cursors.copy_(torch.as_tensor(cursors, dtype=torch.int64))
        self._ctrl[0] = index
        self._position = index
        self._high_water.zero_()

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer through accelerate; with ``num_samples`` epoch ``e`` covers
        samples ``[e * num_samples, (e + 1) * num_samples)``."""
        self._ctrl[1] = int(epoch)

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(
                "this DomainMixture is an endless stream: set TrainingArguments.max_steps, or create it with "
                "num_samples=... to train by epochs"
            )
        return self.num_samples

    def _bounds(self) -> tuple[int, int | None]:
        seek = int(self._ctrl[0])
        if self.num_samples is None:
            if self.exhausted == "stop" and int(self._ctrl[1]) > 0:
                return seek, seek  # the finite stream ended in epoch 0: a new epoch has nothing left
            return seek, None
        epoch = int(self._ctrl[1])
        lo, hi = epoch * self.num_samples, (epoch + 1) * self.num_samples
        return (seek if lo <= seek < hi else lo), hi

    def __iter__(self) -> Iterator[Any]:
        start, stop = self._bounds()
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        chunk = int(self._ctrl[2])
        if workers > 1 and chunk < 1:
            raise RuntimeError(
                f"DomainMixture is read by {workers} DataLoader workers but does not know the batch size: "
                "add TiKMiXCallback to the Trainer, or call mixture.bind_loader(samples_per_batch=...) first"
            )
        chunk = chunk if workers > 1 else 256
        slot = 0 if info is None else 1 + worker
        if int(self._ctrl[0]) == start:
            cursors = self._seek_cursors.numpy().copy()
        else:
            cursors = self._counts(start)
        yield from self._generate(start, stop, cursors, chunk, workers, worker, slot)

    def _generate(self, start, stop, cursors, chunk, workers, worker, slot) -> Iterator[Any]:
        """Yield this copy's samples from index ``start``: chunk ``j`` (of ``chunk`` samples, counted
        from ``start``) belongs to worker ``j % workers``. Every copy walks every index, so all copies
        agree on the per-domain cursors, on exhaustion and on the schedule."""
        cycle = self.exhausted == "cycle"
        readers: dict[int, Iterator] = {}
        for d, src in enumerate(self._sources):
            if not src.random_access:
                readers[d] = src.reader(int(cursors[d]), cycle)
        sizes = np.array([src.n if src.random_access else -1 for src in self._sources])
        high_water = self._high_water.numpy()  # shared memory; a numpy view is cheap to write
        version = self._ctrl.numpy()[5:6]
        span = chunk * max(1, 2048 // chunk)
        k = start
        while stop is None or k < stop:
            span_end = k + span - (k - start) % chunk
            if stop is not None:
                span_end = min(span_end, stop)
            seen = int(version[0])
            ids = self.domain_ids(k, span_end)
            draw = self._draw_numbers(ids, cursors)
            pos, redraw = k, False
            while pos < span_end and not redraw:
                j = (pos - start) // chunk
                a, b = pos - k, min(start + (j + 1) * chunk, span_end) - k
                mine = j % workers == worker
                if int(version[0]) != seen:
                    break  # new weights were published: redraw from here under them
                if not mine and not readers:  # nothing to read: advance the cursors in one go
                    seg_ids, seg_draw = ids[a:b], draw[a:b]
                    if not cycle and np.any(seg_draw >= sizes[seg_ids]):
                        return
                    np.maximum.at(cursors, seg_ids, seg_draw + 1)
                    pos = k + b
                    continue
                # This worker's map-style rows are fetched together: one Arrow read, not one per row.
                fetched = self._fetch(ids[a:b], draw[a:b]) if mine else {}
                for i in range(a, b):
                    if int(version[0]) != seen:
                        redraw = True  # new weights were published mid-chunk: redraw the rest under them
                        break
                    d, c = int(ids[i]), int(draw[i])
                    cursors[d] = c + 1
                    if readers.get(d) is None:
                        if not cycle and c >= sizes[d]:
                            return
                        example = fetched.get(i - a)
                    else:
                        example = next(readers[d])
                        if example is None:
                            return
                        if mine:
                            example = _materialise(example)
                    pos = k + i + 1
                    if mine:
                        high_water[slot] = pos
                        if slot == 0:
                            self._position = pos
                        yield example
            k = pos

    @staticmethod
    def _draw_numbers(ids: np.ndarray, cursors: np.ndarray) -> np.ndarray:
        """The per-domain draw number of each sample, continuing from ``cursors``."""
        draw = np.empty(len(ids), dtype=np.int64)
        for d in np.unique(ids):
            where = np.flatnonzero(ids == d)
            draw[where] = cursors[d] + np.arange(len(where))
        return draw

    def _fetch(self, ids: np.ndarray, draw: np.ndarray) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for d in np.unique(ids):
            src = self._sources[d]
            if not src.random_access:
                continue
            where = np.flatnonzero(ids == d)
            if self.exhausted == "stop":
                where = where[draw[where] < src.n]
            if len(where):
                out.update(zip(where.tolist(), src.get_many(draw[where])))
        return out

    # ------------------------------------------------------------------ probes
    def probe(self, domain: str, n: int, *, round: int = 0) -> list:  # noqa: A002 - paper's "round"
        """Draw ``n`` examples of ``domain`` for influence measurement.

        They come from a stream keyed by ``(seed, domain, round)`` that is separate from training:
        calling this never changes what training sees. Use a new ``round`` per stage for fresh probes.
        """
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; the domains are {self.domains}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return self._sources[self.domains.index(domain)].probe(n, int(round))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, position: int | None = None) -> dict:
        """JSON-serialisable state: seed, schedule and the stream position with per-domain cursors.

        Args:
            position: the number of samples consumed so far. ``None`` uses the samples this process's
                last iterator yielded, which is exact without DataLoader workers; the callback passes
                the Trainer's count.
        """
        position = self._position if position is None else int(position)
        starts, w = self._schedule_arrays()
        return {
            "format": STATE_FORMAT,
            "domains": list(self.domains),
            "seed": self.seed,
            "exhausted": self.exhausted,
            "shuffle": self.shuffle,
            "schedule": [[int(s), [float(x) for x in row]] for s, row in zip(starts, w)],
            "position": position,
            "cursors": [int(c) for c in self._counts(position)],
            "epoch": int(self._ctrl[1]),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; the next iterator continues exactly where that state was taken."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"not a DomainMixture state (expected format {STATE_FORMAT!r}, got "
                f"{state.get('format') if isinstance(state, Mapping) else type(state).__name__!r})"
            )
        if list(state.get("domains", [])) != self.domains:
            saved, now = list(state.get("domains", [])), self.domains
            raise ValueError(
                f"the state was saved for domains {saved} but this mixture has {now} "
                f"(missing now: {sorted(set(saved) - set(now))}, new: {sorted(set(now) - set(saved))}); "
                "resume with the same domains in the same order"
            )
        for key in ("seed", "exhausted", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"the state was saved with {key}={state.get(key)!r} but this mixture has "
                    f"{key}={getattr(self, key)!r}; the stream would differ, so create it with the saved value"
                )
        try:
            schedule = [(int(s), np.asarray(row, dtype=np.float64)) for s, row in state["schedule"]]
            position, cursors = int(state["position"]), np.asarray(state["cursors"], dtype=np.int64)
            epoch = int(state.get("epoch", 0))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"corrupt DomainMixture state: {err}") from None
        m = len(self.domains)
        if not schedule or cursors.shape != (m,) or position < 0 or any(r.shape != (m,) for _, r in schedule):
            raise ValueError("corrupt DomainMixture state: schedule, position or cursors have the wrong shape")
        if any(not np.all(np.isfinite(r)) or np.any(r < 0) or abs(r.sum() - 1) > 1e-6 for _, r in schedule):
            raise ValueError("corrupt DomainMixture state: a scheduled weight vector is not on the simplex")
        starts_list = [s for s, _ in schedule]
        if starts_list[0] != 0 or any(b <= a for a, b in zip(starts_list, starts_list[1:])):
            raise ValueError("corrupt DomainMixture state: schedule starts must begin at 0 and strictly increase")
        if len(schedule) > self._sched_start.numel():
            raise ValueError(
                f"the state has {len(schedule)} schedule entries; create the mixture with max_stages >= that"
            )
        starts = np.array([s for s, _ in schedule], dtype=np.int64)
        rows = np.stack([r for _, r in schedule])  # bit-exact: no renormalisation
        expected = self._counts(position, (starts, rows))
        if not np.array_equal(expected, cursors):
            raise ValueError(
                f"corrupt DomainMixture state: the cursors {cursors.tolist()} do not match the schedule at "
                f"position {position} ({expected.tolist()})"
            )
        # Everything is validated: only now change the mixture, so a bad state leaves it untouched.
        self._sched_len[0] = 0
        for s, row in zip(starts, rows):
            self._publish(int(s), row)
        self._count_cache = (position, expected)
        self._ctrl[1] = epoch
        self._set_seek(position, cursors)

    def domain_sizes(self) -> dict[str, int | None]:
        """Examples per domain where known (``None`` for an iterable domain of unknown length)."""
        return {s.name: s.num_examples for s in self._sources}

    def __repr__(self) -> str:
        w = ", ".join(f"{d}={x:.3f}" for d, x in self.weights.items())
        return f"DomainMixture({len(self.domains)} domains: {w}; seed={self.seed})"

