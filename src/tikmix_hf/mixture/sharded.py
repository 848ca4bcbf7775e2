"""A streamed domain read by shard: each (rank, DataLoader worker) reader reads only its own shards.

Reader ``q`` of ``R`` owns shards ``q, q + R, q + 2R, ...`` of the domain. In pass ``p`` it reads
them in an order drawn from (seed, domain, q, p), each one in blocks of ``block`` consecutive rows,
and yields every block in an order drawn from (seed, domain, q, p, shard position, block). A block
is the unit of both the shuffle and of resume: a reader's position is saved as the
``datasets.IterableDataset.state_dict()`` of its shard at the start of the current block, plus the
number of the block's rows already drawn, so a resume re-reads at most one block and nothing before it.

With a probe holdout, rows whose (shard, offset) hash falls below the holdout fraction are skipped
by training and are the only rows probes use.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, TypedDict

import numpy as np

from .bijection import KeyedBijection, derive_key, row_hash
from .sources import (
    TAG_BLOCK,
    TAG_HOLDOUT,
    TAG_PROBE,
    TAG_SHARD_ORDER,
    Row,
    SequentialSource,
    holdout_fraction,
)

# record(draw number at block start, pass, position in the pass's shard order, block, shard state JSON)
Recorder = Callable[[int, int, int, int, str | None], None]
#: Where a reader's block starts, as recorded and as saved in a state (JSON): its draw count there, the pass,
#: the position in the pass's shard order, the block number and the shard's ``datasets`` state as JSON (``None``
#: at the start of a shard). ("pass" is a keyword: the functional form of TypedDict.)
BlockCheckpoint = TypedDict(
    "BlockCheckpoint", {"draws": int, "pass": int, "shard_pos": int, "block": int, "state": str | None}
)


class ShardedSource:
    """A ``datasets.IterableDataset`` domain with at least as many shards as readers."""

    random_access, sharded = False, True
    num_tokens = None

    def __init__(self, name: str, data: Any, seed: int, domain_id: int, *, block: int, shuffle: bool,
                 size: int | None, holdout: str | float):
        self.name, self.data, self.seed, self.domain_id = name, data, seed, domain_id
        self.block, self.shuffle = max(1, int(block)), shuffle
        self.num_examples = size
        self.n_shards = int(data.n_shards)
        self.holdout = holdout_fraction(holdout, size)
        self._hold_key = int(derive_key(seed, TAG_HOLDOUT, domain_id, size=1)[0])

    def sequential(self) -> SequentialSource:
        """The same domain read in full by every copy: for layouts with more readers than shards."""
        return SequentialSource(self.name, self.data, self.seed, self.domain_id, self.block if self.shuffle else 0,
                                self.num_examples)

    def _shard(self, s: int):
        return self.data.shard(num_shards=self.n_shards, index=s)

    def owned(self, reader: int, readers: int) -> list[int]:
        return list(range(reader, self.n_shards, readers))

    def _order(self, reader: int, pass_: int, count: int) -> np.ndarray:
        if not self.shuffle or count < 2:
            return np.arange(count)
        key = derive_key(self.seed, TAG_SHARD_ORDER, self.domain_id, reader, pass_)
        return KeyedBijection(count, key)(np.arange(count))

    def _kept(self, shard: int, first: int, rows: int) -> np.ndarray:
        """Offsets (within the block) of the rows training may use: all but the probe holdout."""
        if not self.holdout:
            return np.arange(rows)
        h = row_hash(self._hold_key, shard, np.arange(first, first + rows))
        return np.flatnonzero(h >= self.holdout)

    def reader(self, reader: int, readers: int, start: int, checkpoint: BlockCheckpoint | None, cycle: bool,
               record: Recorder | None = None) -> Iterator:
        """Yield reader ``reader``'s draws of this domain from draw number ``start`` on.

        ``checkpoint`` (a saved block start at or before ``start``) avoids reading anything before it;
        without one the reader replays its share from the beginning. ``None`` marks exhaustion (stop).
        """
        shards = self.owned(reader, readers)
        if checkpoint is not None:
            c, pass_, pos, block_no = (int(checkpoint[k]) for k in ("draws", "pass", "shard_pos", "block"))
            loaded = checkpoint.get("state")
            state = None if loaded is None else json.loads(loaded)
        else:
            c, pass_, pos, block_no, state, loaded = 0, 0, 0, 0, None, None
        if c > start:
            raise ValueError(f"checkpoint of domain {self.name!r} lies after the resume draw ({c} > {start})")
        while True:
            order, yielded_in_pass = self._order(reader, pass_, len(shards)), c
            for i in range(pos, len(shards)):
                s = shards[int(order[i])]
                ds = self._shard(s)
                if state is not None:
                    ds.load_state_dict(state)
                else:
                    block_no = 0
                state = None
                batches = ds.iter(batch_size=self.block)
                while True:
                    if record is not None:
                        # before its first batch a resumed shard reports no state of its own: reuse the loaded one
                        snapshot = loaded if loaded is not None else json.dumps(ds.state_dict()) if block_no else None
                        record(c, pass_, i, block_no, snapshot)
                    loaded = None
                    batch = next(batches, None)
                    if batch is None:
                        break
                    rows = len(next(iter(batch.values())))
                    kept = self._kept(s, block_no * self.block, rows)
                    if self.shuffle and len(kept) > 1:
                        key = derive_key(self.seed, TAG_BLOCK, self.domain_id, reader, pass_, i, block_no)
                        kept = kept[KeyedBijection(len(kept), key)(np.arange(len(kept)))]
                    block_no += 1
                    for j in kept.tolist():
                        if c >= start:
                            yield Row(batch, j)
                        c += 1
            if c == yielded_in_pass and pos == 0:
                raise ValueError(
                    f"domain {self.name!r} yielded no examples in the share of reader {reader} of {readers} "
                    f"(shards {shards[:8]}{'...' if len(shards) > 8 else ''}); remove it or give it data"
                )
            if not cycle:
                while True:
                    yield None
            pass_, pos = pass_ + 1, 0

    def probe(self, n: int, round_: int) -> list:
        """``n`` rows from across the shards: probe slot ``g`` of round ``r`` (``g = r n + j``) is the
        ``g // S``-th eligible row of shard ``perm(g mod S)``, so consecutive rounds take new rows
        and every round visits up to ``S`` shards. Eligible rows are the holdout when there is one."""
        perm = KeyedBijection(self.n_shards, derive_key(self.seed, TAG_PROBE, self.domain_id))
        slots = np.arange(round_ * n, (round_ + 1) * n)
        want: dict[int, list[tuple[int, int]]] = {}  # shard -> [(rank in shard, output position)]
        for out_pos, g in enumerate(slots.tolist()):
            want.setdefault(int(perm([g % self.n_shards])[0]), []).append((g // self.n_shards, out_pos))
        out: list = [None] * n
        missing = []
        for s, items in want.items():
            needed = {r: p for r, p in items}
            deepest, seen, offset = max(needed), 0, 0
            for batch in self._shard(s).iter(batch_size=self.block):
                rows = len(next(iter(batch.values())))
                for j in self._eligible(s, offset, rows).tolist():
                    if seen in needed:
                        out[needed[seen]] = Row(batch, j).get()
                    seen += 1
                offset += rows
                if seen > deepest:
                    break
            missing += [p for r, p in items if r >= seen]
        if missing:  # a shard holds fewer eligible rows than asked: reuse rows of the shards that had them
            found = [x for x in out if x is not None]
            if not found and round_ != 0:
                return self.probe(n, 0)  # a round past every shard's rows starts over at the first round's rows
            if not found:
                raise ValueError(
                    f"domain {self.name!r} has no rows to probe"
                    + (f" in its holdout (probe_holdout={self.holdout})" if self.holdout else "")
                    + "; give it data or lower probe_holdout"
                )
            for k, p in enumerate(missing):
                out[p] = found[(round_ + k) % len(found)]
        return out

    def _eligible(self, shard: int, first: int, rows: int) -> np.ndarray:
        if not self.holdout:
            return np.arange(rows)
        return np.flatnonzero(row_hash(self._hold_key, shard, np.arange(first, first + rows)) < self.holdout)
