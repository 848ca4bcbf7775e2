"""The data plane: a training stream over named domains whose weights can change mid-run.

:class:`DomainMixture` is a ``torch.utils.data.IterableDataset``. Sample ``k`` of the stream is a
pure function of ``(seed, k, weight swaps)`` and, for streamed domains read by shard, of the
reader layout:

1. a uniform number ``u_k`` comes from a counter-based generator keyed by ``(seed, k // 8192)``;
2. the domain is the one whose cumulative weight interval holds ``u_k``, under the weights of the
   last weight swap whose start is ``<= k``;
3. the example is the ``c``-th draw of that domain, where ``c`` counts the earlier samples that
   chose it. Map-style domains read row ``perm_e(c mod n)``, a keyed bijection of pass ``e`` that is
   computed, not stored. Streamed domains with enough shards are read by shard: sample ``k`` belongs
   to one (rank, DataLoader worker) reader, which reads only its own shards, so ``c`` counts that
   reader's earlier samples of the domain (see :mod:`.sharded`). Other iterables are read in order
   by every copy, which keeps its own samples.

Every copy walks every index, so all copies agree on domains, cursors and the swaps; a weight
change applies from one declared sample index on every copy, and a saved position resumes the stream
without replaying it.

The weight swaps (:mod:`.swaps`) live in shared-memory tensors, so DataLoader workers (persistent
ones too) see a :meth:`DomainMixture.set_weights` made in the main process after they started.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .checkpoints import ReaderCheckpoints
from .choices import DomainChoices, ReaderLayout, draw_numbers, rank_of
from .control import SharedControl
from .sharded import ShardedSource
from .sources import (
    ForOtherRank,
    MapSource,
    SequentialSource,
    is_map_style,
    materialise,
    shard_count,
)
from .swaps import WeightSwaps

STATE_FORMAT = "tikmix_hf.DomainMixture/2"
EXHAUSTED_POLICIES = ("cycle", "stop")
_HW_SLOTS = 257  # slot 0: the main process; slot 1 + i: DataLoader worker i
# A lock taken and released at once is a full memory fence: it orders a worker's "reserve" store before
# its "swap pending?" load, and the main process's "swap pending" store before its "reserved?" load.
_FENCE = threading.Lock()


def _fence() -> None:
    with _FENCE:
        pass


class DomainMixture(IterableDataset):
    """A training stream over named domains with sampling weights that can change while training runs.

    Args:
        sources: domain name -> data. Each value is a ``datasets.Dataset`` (or any sized, indexable
            sequence of examples), a ``datasets.IterableDataset`` (streaming ``load_dataset`` too), or a
            re-iterable of example dicts. Examples come out unchanged.
        weights: ``"natural"`` (proportional to each domain's size: tokens when every domain's examples
            carry ``input_ids``, else examples), ``"uniform"``, or a mapping domain -> non-negative weight
            covering every domain (normalised to sum to one).
        seed: the stream is a pure function of ``(seed, sample index, weight swaps)`` (and of the
            reader layout for streamed domains read by shard).
        exhausted: what happens when a domain runs out: ``"cycle"`` (start a new pass with a new shuffle)
            or ``"stop"`` (the stream ends at the first sample that would need a new pass; for a domain
            read by shard, the reader whose share runs out ends its part of the stream).
        shuffle: shuffle map-style domains (a new keyed permutation per pass); streamed domains are
            shuffled in blocks of ``shuffle_buffer`` rows (0 or 1 keeps source order).
        num_samples: optional length of one epoch, which lets the Trainer train by epochs; without it the
            stream is endless and the Trainer needs ``max_steps``.
        sizes: optional domain -> size, for ``weights="natural"`` with iterable domains of unknown size.
        max_stages: how many weight swaps there is room for (one per ``set_weights``).
        probe_holdout: share of each domain's rows kept for :meth:`probe` and never trained on.
            ``"auto"`` holds out 0.1% of a domain known to have at least 10^6 rows and nothing of
            smaller ones (their probes are drawn from the training rows); a float applies to every
            domain (streamed ones choose their rows by a hash of the row's shard and offset).
        shard: read ``datasets.IterableDataset`` domains by shard, each (rank, worker) reader its own
            share (``True``, the default); ``False`` reads them in full on every copy.

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
        probe_holdout: str | float = "auto",
        shard: bool = True,
    ) -> None:
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
        if probe_holdout != "auto" and not (isinstance(probe_holdout, (int, float)) and 0 <= probe_holdout < 0.5):
            raise ValueError(
                f"probe_holdout={probe_holdout!r}: use 'auto' or a fraction in [0, 0.5) of each domain's rows"
            )

        self.domains: list[str] = list(sources)
        self.seed, self.exhausted, self.shuffle, self.shuffle_buffer = seed, exhausted, shuffle, shuffle_buffer
        self.num_samples = num_samples
        self.probe_holdout = probe_holdout
        self._sizes = sizes
        self._sources: list = []
        for i, (name, data) in enumerate(sources.items()):
            size = None if sizes is None else sizes.get(name)
            if is_map_style(data):
                self._sources.append(MapSource(name, data, seed, i, shuffle, probe_holdout))
            elif shard and shard_count(data) is not None:
                block = shuffle_buffer if shuffle and shuffle_buffer > 1 else 256
                self._sources.append(ShardedSource(
                    name, data, seed, i, block=block, shuffle=shuffle and shuffle_buffer > 1,
                    size=None if size is None else int(size), holdout=probe_holdout,
                ))
            else:
                self._sources.append(SequentialSource(name, data, seed, i, shuffle_buffer if shuffle else 0, size))
        self._sharded = [d for d, s in enumerate(self._sources) if s.sharded]

        m = len(self.domains)
        self._swaps = WeightSwaps(self.domains, max_stages)
        self._choices = DomainChoices(seed, self._swaps)
        self._ctrl = SharedControl()
        self._seek_cursors = torch.zeros(m, dtype=torch.int64).share_memory_()
        # Per slot: the end of the samples that copy has drawn (main process) or reserved (workers).
        self._high_water = torch.zeros(_HW_SLOTS, dtype=torch.int64).share_memory_()
        self._checkpoints = ReaderCheckpoints(len(self._sharded), 1)
        self._position = 0  # samples yielded by the last in-process iterator (exact with num_workers=0)

        self._publish(0, self._swaps.resolve(weights, self._sources, sizes))

    # ------------------------------------------------------------------ weights
    def resolve_weights(self, spec: str | Mapping[str, float]) -> dict[str, float]:
        """``"natural"``, ``"uniform"`` or a mapping, as normalised weights per domain (nothing is changed)."""
        return dict(zip(self.domains, map(float, self._swaps.resolve(spec, self._sources, self._sizes))))

    def _publish(self, start: int, vec: np.ndarray) -> None:
        self._swaps.publish(start, vec)
        self._choices.forget_from(start)

    def restart(self) -> None:
        """Forget every weight swap after sample 0 and seek there: the stream starts over as it was first set."""
        starts, rows = self._swaps.arrays()
        self._swaps.replace(starts[:1], rows[:1])
        self._choices.forget_from(0)
        self.seek(0)

    @property
    def weights(self) -> dict[str, float]:
        """The most recently set weights (in effect from :attr:`weights_from` on)."""
        return self._swaps.latest()

    @property
    def weights_from(self) -> int:
        """The sample index from which :attr:`weights` apply."""
        return self._swaps.latest_start()

    @property
    def swaps(self) -> list[tuple[int, dict[str, float]]]:
        """Every weight swap as ``(first sample index, weights)``, oldest first (the first at index 0)."""
        return self._swaps.entries()

    def weights_at(self, index: int) -> dict[str, float]:
        """The weights that sample ``index`` is drawn with."""
        return self._swaps.at(index)

    def lag_samples(self) -> int:
        """How many samples past the consumer the data pipeline can have drawn already.

        Bound: the workers' prefetch queue (``num_workers * prefetch_factor`` worker batches) plus
        accelerate's one-batch look-ahead plus one batch of margin; ``samples per batch`` is the value
        given to :meth:`bind_loader` (1 when unbound).
        """
        per_batch = max(self._ctrl.batch, self._ctrl.global_batch, 1)
        workers, prefetch = self._ctrl.workers, self._ctrl.prefetch
        return per_batch * (workers * prefetch + 2)

    def set_weights(self, weights: Mapping[str, float], *, at: int | None = None) -> int:
        """Swap in new weights; return the sample index from which they apply.

        Args:
            weights: domain -> non-negative weight for every domain (normalised to sum to one).
            at: the first sample index to use them. ``None`` takes the earliest safe index: the next
                sample that no copy of the stream has drawn or reserved yet (a DataLoader worker
                reserves its whole batch before it reads the weights). Pass an explicit index,
                identical on every rank, for runs that must be reproducible (the callback does:
                consumed samples plus :meth:`lag_samples`).

        Raises:
            ValueError: ``at`` lies before samples that were already drawn with the old weights, or
                before an earlier swap.
        """
        vec = self._swaps.validate(weights, "weights")
        if at is not None and (not isinstance(at, (int, np.integer)) or at < 0):
            raise ValueError(f"at must be a non-negative int sample index, got {at!r}")
        # Announce the swap before reading the reservations: a worker that reserves after this point
        # waits for the new weights, one that reserved before is counted in `drawn`.
        self._ctrl.swap_pending = 1
        try:
            _fence()
            drawn = int(self._high_water.max())
            if at is None:
                at = max(drawn, self._position, self.weights_from)
            elif at < drawn:
                raise ValueError(
                    f"at={at} lies before sample {drawn}, which the data pipeline has already drawn with the old "
                    f"weights; use at >= {drawn} (the lag bound {self.lag_samples()} may be too small: check "
                    "bind_loader's num_workers and prefetch_factor)"
                )
            self._publish(int(at), vec)
        finally:
            self._ctrl.swap_pending = 0
        return int(at)

    # ------------------------------------------------------------------ the pure stream
    def domain_ids(self, start: int, stop: int, swaps: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Domain index of every sample in ``[start, stop)`` (a pure function of seed and swaps)."""
        return self._choices.domain_ids(start, stop, swaps)

    def counts(self, upto: int) -> dict[str, int]:
        """Examples drawn from each domain by samples ``[0, upto)``."""
        return dict(zip(self.domains, map(int, self._choices.counts(upto))))

    def exhausted_domains(self, upto: int) -> list[str]:
        """Domains that samples ``[0, upto)`` would draw past their end (policy ``"stop"``).

        An iterable domain's length is only known once it was read to the end: it is listed once a copy of
        the stream (the DataLoader reads ahead) has found it ran out before sample ``upto``.
        """
        counts = self._choices.counts(upto)
        out = [s.name for s, c in zip(self._sources, counts) if s.random_access and c > s.n]
        ended = self._ctrl.ended
        name = self.domains[self._ctrl.ended_domain]
        return out + [name] if 0 < ended <= upto and name not in out else out

    def _end(self, index: int, domain: int) -> None:
        """Record that the stream ends at sample ``index`` because ``domain`` ran out (policy ``"stop"``)."""
        ended = self._ctrl.ended
        if ended == 0 or index + 1 < ended:
            self._ctrl.ended_domain = domain
            self._ctrl.ended = index + 1

    def drawn(self, upto: int) -> dict[str, dict[str, int | None]]:
        """Examples and tokens drawn from each domain by samples ``[0, upto)``.

        Tokens are exact for map-style domains whose examples carry ``input_ids`` and ``None`` where
        the length of an example is unknown without reading it.
        """
        counts = self._choices.counts(upto)
        return {
            s.name: {"examples": int(c), "tokens": s.tokens_drawn(int(c)) if s.random_access else None}
            for s, c in zip(self._sources, counts)
        }

    def example_ids(self, start: int, stop: int) -> list[tuple[str, int]]:
        """``(domain, draw number)`` of each sample in ``[start, stop)``; for map-style domains the
        draw number is mapped to the source index. A cheap identity for tests and audits."""
        ids = self.domain_ids(start, stop)
        draw = draw_numbers(ids, self._choices.counts(start).copy())
        out: list[Any] = [None] * len(ids)
        for d in np.unique(ids):
            where = np.flatnonzero(ids == d)
            src = self._sources[d]
            values = src.indices(draw[where]) if src.random_access else draw[where]
            for i, v in zip(where.tolist(), values.tolist()):
                out[i] = (src.name, int(v))
        return out

    # ------------------------------------------------------------------ position, epochs, loaders
    def bind_loader(
        self,
        samples_per_batch: int,
        num_workers: int = 0,
        prefetch_factor: int | None = 2,
        global_batch: int | None = None,
        *,
        ranks: int | None = None,
        rank: int | None = None,
    ) -> None:
        """Tell the mixture how the DataLoader reads it.

        Args:
            samples_per_batch: stream samples one DataLoader batch consumes (the per-device batch size;
                times the number of processes when accelerate shards an iterable with
                ``dispatch_batches=False``).
            num_workers, prefetch_factor: the DataLoader's, for the lag bound of :meth:`lag_samples`.
            global_batch: stream samples consumed per micro-step over all ranks (default
                ``samples_per_batch``); accelerate's look-ahead fetches one such batch early.
            ranks, rank: how many processes each keep an equal slice of every DataLoader batch, and
                which slice is this one's: accelerate with ``dispatch_batches=False`` wraps the mixture
                in an ``IterableDatasetShard``; pass its ``num_processes`` and ``process_index``. Then each
                process reads only the rows of its own slice. The default (1, 0) is right for one process
                and for ``dispatch_batches=True``; with ``dispatch_batches=False`` it stays exact but every
                process reads the rows of the whole batch.
        """
        if not isinstance(samples_per_batch, int) or samples_per_batch < 1:
            raise ValueError(f"samples_per_batch must be a positive int, got {samples_per_batch!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        if global_batch is not None and (not isinstance(global_batch, int) or global_batch < 1):
            raise ValueError(f"global_batch must be a positive int or None, got {global_batch!r}")
        ranks, rank = (1, 0) if ranks is None else (ranks, 0 if rank is None else rank)
        if not isinstance(ranks, int) or ranks < 1 or samples_per_batch % ranks:
            raise ValueError(
                f"ranks={ranks!r} must be a positive int that divides samples_per_batch={samples_per_batch}"
            )
        if not isinstance(rank, int) or not 0 <= rank < ranks:
            raise ValueError(f"rank={rank!r} must be an int in [0, ranks={ranks})")
        self._ctrl.batch = samples_per_batch
        self._ctrl.workers = num_workers
        self._ctrl.prefetch = 2 if prefetch_factor is None else int(prefetch_factor)
        self._ctrl.global_batch = samples_per_batch if global_batch is None else global_batch
        self._ctrl.ranks, self._ctrl.rank = ranks, rank
        if self._sharded:
            self._checkpoints.grow(num_workers)
        readers = max(num_workers, 1) * ranks
        for d in self._sharded:  # warned here, in the main process, where users see it
            if self._sources[d].n_shards < readers:
                warnings.warn(
                    f"domain {self.domains[d]!r} has {self._sources[d].n_shards} shards for {readers} readers "
                    f"({max(num_workers, 1)} DataLoader workers x {ranks} processes): each reader reads all of it "
                    f"and keeps its own samples, {readers}x the rows training uses. Give it at least {readers} "
                    "shards (more files, or Dataset.to_iterable_dataset(num_shards=...)) to read it by shard",
                    stacklevel=2,
                )

    def seek(self, index: int) -> None:
        """Make the next iterator start at sample ``index`` (cursors computed, nothing replayed)."""
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"index must be a non-negative int, got {index!r}")
        self._set_seek(int(index), self._choices.counts(int(index)))

    def _set_seek(self, index: int, cursors: np.ndarray) -> None:
        self._seek_cursors.copy_(torch.as_tensor(cursors, dtype=torch.int64))
        self._ctrl.seek = index
        self._ctrl.ended = 0
        self._position = index
        self._high_water.zero_()

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer through accelerate; with ``num_samples`` epoch ``e`` covers
        samples ``[e * num_samples, (e + 1) * num_samples)``."""
        self._ctrl.epoch = int(epoch)

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(
                "this DomainMixture is an endless stream: set TrainingArguments.max_steps, or create it with "
                "num_samples=... to train by epochs"
            )
        return self.num_samples

    def _bounds(self) -> tuple[int, int | None]:
        seek = self._ctrl.seek
        if self.num_samples is None:
            if self.exhausted == "stop" and self._ctrl.epoch > 0:
                return seek, seek  # the finite stream ended in epoch 0: a new epoch has nothing left
            return seek, None
        epoch = self._ctrl.epoch
        lo, hi = epoch * self.num_samples, (epoch + 1) * self.num_samples
        return (seek if lo <= seek < hi else lo), hi

    def _layout(self) -> ReaderLayout:
        """The reader layout of the last iterator, else as bound."""
        workers = self._ctrl.seen_workers or max(self._ctrl.workers, 1)
        ranks = self._ctrl.ranks
        chunk = self._ctrl.seen_chunk or (self._ctrl.batch if workers * ranks > 1 else 0)
        return ReaderLayout(workers, ranks, chunk if workers * ranks > 1 else 0)

    def __iter__(self) -> Iterator[Any]:
        start, stop = self._bounds()
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        ranks, rank = self._ctrl.ranks, self._ctrl.rank
        chunk = self._ctrl.batch
        if workers * ranks > 1 and chunk < 1:
            raise RuntimeError(
                f"DomainMixture is read by {workers} DataLoader workers on {ranks} processes but does not know the "
                "batch size: add TiKMiXCallback to the Trainer, or call mixture.bind_loader(samples_per_batch=...) "
                "first"
            )
        layout = ReaderLayout(workers, ranks, chunk if workers * ranks > 1 else 0)
        chunk = chunk if workers * ranks > 1 else 256
        if self._sharded:
            self._check_layout(start, layout)
        if worker == 0:
            self._ctrl.seen_workers, self._ctrl.seen_chunk = workers, layout.batch
        slot = 0 if info is None else 1 + worker
        if self._ctrl.seek == start:
            cursors = self._seek_cursors.numpy().copy()
        else:
            cursors = self._choices.counts(start)
        # This copy is logical worker w of every chunk grid it serves, and reader q = w * ranks + rank.
        logical = (start // chunk + worker) % workers
        yield from self._generate(start, stop, cursors, chunk, workers, worker, slot, layout, logical, rank)

    def check_resume_layout(self) -> None:
        """Refuse, before any batch is read, a loaded state whose domains read by shard were read in another
        reader layout than the one :meth:`bind_loader` describes (the error names both, and the fix)."""
        if self._sharded:
            workers, ranks = max(self._ctrl.workers, 1), self._ctrl.ranks
            batch = self._ctrl.batch if workers * ranks > 1 else 0
            self._check_layout(self._ctrl.seek, ReaderLayout(workers, ranks, batch))

    def _check_layout(self, start: int, layout: ReaderLayout) -> None:
        chunk = layout.batch
        names = [self.domains[d] for d in self._sharded]
        if chunk and start % chunk:
            raise ValueError(
                f"the stream starts at sample {start}, inside a batch of {chunk}: domains {names} are read by "
                f"shard per (rank, worker) batch, so seek to a multiple of {chunk}"
            )
        saved = self._checkpoints.loaded_layout
        if start > 0 and saved is not None and saved != layout:
            raise RuntimeError(
                f"this state was saved with a reader layout of {saved.describe()} and the stream now runs with "
                f"{layout.describe()}: domains {names} are read by shard, so each layout is a different "
                "stream. Resume with the saved DataLoader workers (dataloader_num_workers), number of processes "
                "reading the stream and per-device batch size; or start the stream afresh with mixture.seek(0)"
            )

    def _generate(self, start: int, stop: int | None, cursors: np.ndarray, chunk: int, workers: int, worker: int,
                  slot: int, layout: ReaderLayout, logical: int, rank: int) -> Iterator[Any]:
        """Yield this copy's samples from index ``start``: chunk ``j`` (of ``chunk`` samples, counted
        from ``start``) belongs to worker ``j % workers``, and within it slice ``rank`` of ``ranks``.
        Every copy walks every index, so all copies agree on cursors, exhaustion and the swaps."""
        cycle = self.exhausted == "cycle"
        ranks, readers = layout.ranks, layout.readers
        by_shard = {d for d in self._sharded if self._sources[d].n_shards >= readers}
        sequential = {d: (src.sequential() if src.sharded else src).reader(int(cursors[d]), cycle)
                      for d, src in enumerate(self._sources) if not src.random_access and d not in by_shard}
        sharded = self._sharded_readers(start, layout, logical * ranks + rank, logical, cycle, by_shard)
        never = np.iinfo(np.int64).max
        sizes = np.array([src.n if src.random_access else never for src in self._sources])
        high_water = self._high_water.numpy()  # shared memory; a numpy view is cheap to write
        control = self._ctrl
        version = self._swaps.version.numpy()
        span = chunk * max(1, 2048 // chunk)
        k = start
        while stop is None or k < stop:
            span_end = k + span - (k - start) % chunk
            if stop is not None:
                span_end = min(span_end, stop)
            seen = int(version[0])
            ids = self.domain_ids(k, span_end)
            draw = draw_numbers(ids, cursors)
            pos, redraw = k, False
            while pos < span_end and not redraw:
                j = (pos - start) // chunk
                chunk_end = start + (j + 1) * chunk if stop is None else min(start + (j + 1) * chunk, stop)
                a, b = pos - k, min(chunk_end, span_end) - k
                mine = j % workers == worker
                if mine and slot:
                    # A worker reserves its batch before it reads the weights, so set_weights(at=None)
                    # either counts the reservation or is announced to the worker, which then waits.
                    high_water[slot] = max(int(high_water[slot]), chunk_end)
                    _fence()
                    while control.swap_pending:
                        time.sleep(0)
                if int(version[0]) != seen:
                    break  # new weights were published: redraw from here under them
                if not mine and not sequential:  # nothing to read: advance the cursors in one go
                    seg_ids, seg_draw = ids[a:b], draw[a:b]
                    if not cycle and np.any(seg_draw >= sizes[seg_ids]):
                        first = int(np.argmax(seg_draw >= sizes[seg_ids]))
                        self._end(k + a + first, int(seg_ids[first]))
                        return
                    np.maximum.at(cursors, seg_ids, seg_draw + 1)
                    pos = k + b
                    continue
                keep = np.zeros(b - a, dtype=bool)
                if mine:
                    keep[:] = True if ranks == 1 else rank_of(np.arange(k + a, k + b), ranks, chunk) == rank
                # This copy's map-style rows are fetched together: one Arrow read, not one per row.
                fetched = self._fetch(ids[a:b], draw[a:b], keep)
                for i in range(a, b):
                    if slot == 0 and int(version[0]) != seen:
                        redraw = True  # new weights were published mid-chunk: redraw the rest under them
                        break
                    d, c = int(ids[i]), int(draw[i])
                    cursors[d] = c + 1
                    src, kept = self._sources[d], keep[i - a]
                    example = None
                    if src.random_access:
                        if not cycle and c >= src.n:
                            self._end(k + i, d)
                            return
                        example = fetched.get(i - a)
                    elif d in by_shard:
                        if kept:  # only this reader's own samples: the others are other readers' rows
                            example = next(sharded[d])
                            if example is None:
                                self._end(k + i, d)
                                return
                    else:
                        example = next(sequential[d])
                        if example is None:
                            self._end(k + i, d)
                            return
                    pos = k + i + 1
                    if mine:
                        if slot == 0:
                            high_water[0] = pos
                            self._position = pos
                        yield materialise(example) if kept else ForOtherRank(pos - 1)
            k = pos

    def _sharded_readers(self, start: int, layout: ReaderLayout, reader: int, row: int, cycle: bool,
                         by_shard: set[int]) -> dict[int, Iterator]:
        if not by_shard:
            return {}
        readers = layout.readers
        draws = self._choices.reader_counts(start, layout)[reader]
        out = {}
        for e, d in enumerate(self._sharded):
            if d not in by_shard:
                continue
            src = self._sources[d]
            want = int(draws[d])
            ckpt = self._checkpoints.checkpoint(row, e, readers, want)
            stored = self._checkpoints.stored(self.domains[d], reader, layout, want)
            if stored is not None and (ckpt is None or stored["draws"] > ckpt["draws"]):
                ckpt = stored
            if want and (ckpt is None or want - ckpt["draws"] > 4 * src.block):
                warnings.warn(
                    f"domain {src.name!r}: reader {reader} of {readers} has no saved position near draw {want} and "
                    f"re-reads {want - (ckpt['draws'] if ckpt else 0)} rows of its share to get there",
                    stacklevel=3,
                )
            record = self._checkpoints.recorder(row, e, readers)
            out[d] = src.reader(reader, readers, want, ckpt, cycle, record)
        return out

    def _fetch(self, ids: np.ndarray, draw: np.ndarray, keep: np.ndarray) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for d in np.unique(ids[keep]):
            src = self._sources[d]
            if not src.random_access:
                continue
            where = np.flatnonzero((ids == d) & keep)
            if self.exhausted == "stop":
                where = where[draw[where] < src.n]
            if len(where):
                out.update(zip(where.tolist(), src.get_many(draw[where])))
        return out

    # ------------------------------------------------------------------ probes
    def probe(self, domain: str, n: int, *, round: int = 0) -> list:
        """Draw ``n`` examples of ``domain`` for influence measurement.

        They come from a stream keyed by ``(seed, domain, round)`` that is separate from training:
        calling this never changes what training sees. Use a new ``round`` per stage for fresh probes.
        Map-style domains draw them from a keyed permutation of all rows (of the probe holdout when
        there is one); streamed domains read by shard take them from across the shards (see
        :meth:`.sharded.ShardedSource.probe`).
        """
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; the domains are {self.domains}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        return self._sources[self.domains.index(domain)].probe(n, int(round))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, position: int | None = None) -> dict:
        """JSON-serialisable state: seed, weight swaps and the stream position with per-domain cursors.

        For domains read by shard it also holds the reader layout, every reader's draw count and,
        for the readers of this process, the block each one was reading at ``position`` (the shard's
        ``datasets`` state at that block's start), so a resume reads nothing before it.

        Args:
            position: the number of samples consumed so far. ``None`` uses the samples this process's
                last iterator yielded, which is exact without DataLoader workers; the callback passes
                the Trainer's count.
        """
        position = self._position if position is None else int(position)
        starts, w = self._swaps.arrays()
        state = {
            "format": STATE_FORMAT,
            "domains": list(self.domains),
            "seed": self.seed,
            "exhausted": self.exhausted,
            "shuffle": self.shuffle,
            # The weight swaps, under the key every state saved so far has.
            "schedule": [[int(s), [float(x) for x in row]] for s, row in zip(starts, w)],
            "position": position,
            "cursors": [int(c) for c in self._choices.counts(position)],
            "epoch": self._ctrl.epoch,
        }
        if self._sharded:
            layout = self._layout()
            readers, ranks, rank = layout.readers, layout.ranks, self._ctrl.rank
            draws = self._choices.reader_counts(position, layout)
            checkpoints = {}
            for e, d in enumerate(self._sharded):
                for worker in range(layout.workers):
                    q = worker * ranks + rank
                    ckpt = self._checkpoints.checkpoint(worker, e, readers, int(draws[q, d]))
                    if ckpt is None:
                        ckpt = self._checkpoints.stored(self.domains[d], q, layout, int(draws[q, d]))
                    if ckpt is not None:
                        checkpoints[f"{self.domains[d]}/{q}"] = ckpt
            state["readers"] = {
                "layout": list(layout),
                "draws": {self.domains[d]: [int(x) for x in draws[:, d]] for d in self._sharded},
                "checkpoints": checkpoints,
            }
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`; the next iterator continues exactly where that state was taken."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            hint = (" (a state of an older version: its streamed domains cannot be resumed by shard; "
                    "start the stream afresh)") if str(got).startswith("tikmix_hf.DomainMixture/") else ""
            raise ValueError(f"not a DomainMixture state (expected format {STATE_FORMAT!r}, got {got!r}){hint}")
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
            swaps = [(int(s), np.asarray(row, dtype=np.float64)) for s, row in state["schedule"]]
            position, cursors = int(state["position"]), np.asarray(state["cursors"], dtype=np.int64)
            epoch = int(state.get("epoch", 0))
            resume = ReaderCheckpoints.parse(state.get("readers")) if self._sharded else None
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"corrupt DomainMixture state: {err}") from None
        m = len(self.domains)
        if not swaps or cursors.shape != (m,) or position < 0 or any(r.shape != (m,) for _, r in swaps):
            raise ValueError("corrupt DomainMixture state: weight swaps, position or cursors have the wrong shape")
        starts, rows = self._swaps.check_saved(swaps)
        expected = self._choices.counts(position, (starts, rows))
        if not np.array_equal(expected, cursors):
            raise ValueError(
                f"corrupt DomainMixture state: the cursors {cursors.tolist()} do not match the weight swaps at "
                f"position {position} ({expected.tolist()})"
            )
        if resume is not None:
            sums = {d: sum(v) for d, v in resume.draws.items()}
            want = {self.domains[d]: int(cursors[d]) for d in self._sharded}
            if sums != want:
                raise ValueError(
                    f"corrupt DomainMixture state: the readers' draws {sums} do not add up to the cursors {want}"
                )
        # Everything is validated: only now change the mixture, so a bad state leaves it untouched.
        self._swaps.replace(starts, rows)
        self._choices.remember(position, expected)
        self._ctrl.epoch = epoch
        self._checkpoints.load(resume)
        self._set_seek(position, cursors)

    def domain_sizes(self) -> dict[str, int | None]:
        """Examples per domain where known (``None`` for an iterable domain of unknown length)."""
        return {s.name: s.num_examples for s in self._sources}

    def __repr__(self) -> str:
        w = ", ".join(f"{d}={x:.3f}" for d, x in self.weights.items())
        return f"DomainMixture({len(self.domains)} domains: {w}; seed={self.seed})"
