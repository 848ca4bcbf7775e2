"""The domains a mixture reads: map-style (random access) and sequential (read in order by every copy).

Streamed domains that can be split by shard have their own module, :mod:`.sharded`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .bijection import KeyedBijection, derive_key

# Tags that keep the independent random streams of one seed apart.
TAG_CHOICE, TAG_PERM, TAG_BUFFER, TAG_PROBE, TAG_HOLDOUT, TAG_SHARD_ORDER, TAG_BLOCK = range(0x7D1, 0x7D8)
# "auto" holds out rows for probes only in domains this large: small corpora keep every row for training.
AUTO_HOLDOUT_MIN_ROWS = 1_000_000
AUTO_HOLDOUT_FRACTION = 1e-3


def holdout_fraction(spec: str | float, rows: int | None) -> float:
    """The share of a domain's rows kept for probes (never trained on) under ``probe_holdout=spec``."""
    if spec == "auto":
        return AUTO_HOLDOUT_FRACTION if rows is not None and rows >= AUTO_HOLDOUT_MIN_ROWS else 0.0
    return float(spec)


class Row:
    """Row ``i`` of a column batch, turned into a dict only if somebody keeps it.

    A sequential domain is read by every copy of the stream, which keeps only its own samples: the
    rows the other copies keep are skipped without being built.
    """

    __slots__ = ("batch", "i")

    def __init__(self, batch: dict, i: int):
        self.batch, self.i = batch, i

    def get(self) -> dict:
        return {key: column[self.i] for key, column in self.batch.items()}


def materialise(example: Any) -> Any:
    return example.get() if isinstance(example, Row) else example


class ForOtherRank(Mapping):
    """Stands in for a sample that another process keeps (accelerate's ``dispatch_batches=False``).

    accelerate's ``IterableDatasetShard`` drops every position of a batch but its own, so these are
    never collated; reading the row for them would only multiply I/O by the number of processes. If
    one does reach a collator, the layout given to ``bind_loader`` is wrong, and it says so.
    """

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def _fail(self, *_):
        raise RuntimeError(
            f"sample {self.index} belongs to another process, but reached this one: the mixture was told "
            "(bind_loader ranks=...) that each process keeps a slice of every batch, as accelerate does with "
            "dispatch_batches=False. With dispatch_batches=True call mixture.bind_loader(..., ranks=1)"
        )

    __getitem__ = __iter__ = __len__ = _fail


class MapSource:
    """A sized, indexable domain (``datasets.Dataset``, list, torch map-style dataset).

    Draw ``c`` reads training row ``perm_e(c mod n)`` of pass ``e = c // n``, where ``perm_e`` is a
    :class:`KeyedBijection` keyed by (seed, domain, pass). With a probe holdout the first ``h``
    positions of one more bijection (the holdout key) are probe rows and training reads the rest.
    """

    random_access, sharded = True, False

    def __init__(self, name: str, data: Any, seed: int, domain_id: int, shuffle: bool, holdout: str | float):
        self.name, self.data, self.seed, self.domain_id, self.shuffle = name, data, seed, domain_id, shuffle
        self.rows = len(data)
        if self.rows == 0:
            raise ValueError(f"domain {name!r} is empty (0 examples); remove it or give it data")
        self.held = int(self.rows * holdout_fraction(holdout, self.rows))
        self.n = self.rows - self.held  # rows training cycles through
        self._holdout = KeyedBijection(self.rows, derive_key(seed, TAG_HOLDOUT, domain_id)) if self.held else None
        self._perms: dict[int, KeyedBijection] = {}
        self._lengths: np.ndarray | None = None  # per-row token counts: main process only, never pickled
        self._total_tokens = _total_tokens(data)
        self._tokens_cache = (0, 0)  # (draws, tokens) of the last tokens_drawn

    def __getstate__(self):
        state = {k: getattr(self, k) for k in self.__dict__}
        state["_lengths"], state["_perms"] = None, {}
        return state

    @property
    def num_examples(self) -> int:
        return self.rows

    @property
    def num_tokens(self) -> int | None:
        return self._total_tokens

    def _perm(self, epoch: int) -> KeyedBijection:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) > 4:
                self._perms.clear()
            perm = self._perms[epoch] = KeyedBijection(self.n, derive_key(self.seed, TAG_PERM, self.domain_id, epoch))
        return perm

    def _rows_of(self, positions: np.ndarray) -> np.ndarray:
        return positions if self._holdout is None else self._holdout(positions)

    def indices(self, cursors) -> np.ndarray:
        """The source row of each draw number in ``cursors``."""
        cursors = np.asarray(cursors, dtype=np.int64)
        epochs, pos = np.divmod(cursors, self.n)
        out = np.empty_like(cursors)
        for e in np.unique(epochs):
            where = epochs == e
            out[where] = self._perm(int(e))(pos[where]) if self.shuffle else pos[where]
        return self._rows_of(out + self.held)

    def index_of(self, cursor: int) -> int:
        return int(self.indices([cursor])[0])

    def get_many(self, cursors: np.ndarray) -> list:
        indices = self.indices(cursors).tolist()
        getitems = getattr(self.data, "__getitems__", None)
        if getitems is not None:
            return list(getitems(indices))
        return [self.data[i] for i in indices]

    def tokens_drawn(self, count: int) -> int | None:
        """Tokens in the first ``count`` draws: exact, incremental over calls with growing ``count``."""
        if self._lengths is None and self._total_tokens is not None:
            self._lengths = _example_lengths(self.data)
        lengths = self._lengths
        if self._total_tokens is None or lengths is None:  # the examples carry no input_ids
            return None
        full = int(count) // self.n
        held_tokens = int(lengths[self._rows_of(np.arange(self.held))].sum()) if self.held else 0
        per_pass = self._total_tokens - held_tokens
        done, tokens = self._tokens_cache
        lo = full * self.n
        if not (lo <= done <= count):
            done, tokens = lo, full * per_pass
        step = 1 << 20
        for a in range(done, int(count), step):
            b = min(a + step, int(count))
            tokens += int(lengths[self.indices(np.arange(a, b))].sum())
        self._tokens_cache = (int(count), tokens)
        return tokens

    def probe(self, n: int, round_: int) -> list:
        """``n`` rows spread over the domain: from the holdout when there is one, else from all rows."""
        pool = self.held or self.rows
        order = []
        for p in range(math.ceil(n / pool)):
            perm = KeyedBijection(pool, derive_key(self.seed, TAG_PROBE, self.domain_id, round_, p))
            order.append(perm(np.arange(min(pool, n - p * pool))))
        picks = np.concatenate(order)
        rows = self._rows_of(picks) if self.held else picks
        return [self.data[int(i)] for i in rows]


class SequentialSource:
    """A domain read in order by every copy of the stream (a re-iterable, or a stream with too few shards).

    Every copy reads every draw, so all copies agree on the domain's one global sequence; iterable
    domains that can be split by shard use :class:`.sharded.ShardedSource` instead.
    """

    random_access, sharded = False, False
    num_tokens = None

    def __init__(self, name: str, data: Any, seed: int, domain_id: int, buffer: int, size: float | None):
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
        # one; every copy here must see the whole domain, so read it through .iter(), which does not.
        if hasattr(self.data, "iter") and hasattr(self.data, "_ex_iterable"):
            for batch in self.data.iter(batch_size=256):
                for i in range(len(next(iter(batch.values())))):
                    yield Row(batch, i)
        else:
            yield from self.data

    def _one_pass(self, pass_: int) -> Iterator:
        if self.buffer <= 1:
            yield from self._raw()
            return
        rng = np.random.default_rng([self.seed, TAG_BUFFER, self.domain_id, pass_])
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
                out.append(materialise(example))
                if len(out) == n:
                    break
            if len(out) == before:
                raise ValueError(f"domain {self.name!r} yielded no examples; remove it or give it data")
            pass_ += 1
        return out


def _total_tokens(data: Any) -> int | None:
    """Tokens in a domain whose examples carry ``input_ids`` (summed in Arrow when possible); else ``None``."""
    try:
        import datasets

        if isinstance(data, datasets.Dataset):
            if "input_ids" not in data.column_names:
                return None
            if data._indices is None:
                import pyarrow.compute as pc

                col = data.data.table.column("input_ids")
                return int(sum(pc.sum(pc.list_value_length(chunk)).as_py() or 0 for chunk in col.chunks))
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    lengths = _example_lengths(data)
    return None if lengths is None else int(lengths.sum())


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
                return np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False), dtype=np.int32)
            return np.fromiter((len(x) for x in data["input_ids"]), dtype=np.int32, count=len(data))
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    if isinstance(data, Sequence) and len(data) and isinstance(data[0], Mapping) and "input_ids" in data[0]:
        return np.fromiter((len(x["input_ids"]) for x in data), dtype=np.int32, count=len(data))
    return None


def is_map_style(data: Any) -> bool:
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


def shard_count(data: Any) -> int | None:
    """Shards of a ``datasets.IterableDataset`` (files of a streaming ``load_dataset``); ``None`` otherwise."""
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return None
    if isinstance(data, datasets.IterableDataset):
        return int(data.n_shards)
    return None
