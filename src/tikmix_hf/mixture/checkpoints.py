"""Where the readers of sharded domains resume: the block checkpoints they record, and those of a loaded state.

A reader of a domain read by shard (see :mod:`.sharded`) records where each block it starts begins:
its draw count, pass, position in the pass's shard order, block number and the shard's
``datasets`` state as JSON. The records live in shared-memory rings, one per (logical DataLoader
worker, sharded domain), so the main process finds the checkpoint of a worker's reader at a given
draw, for a saved state or for the next iterator, and a resume reads nothing before that block.
A loaded state brings the checkpoints of its own readers, which serve until the rings hold newer ones.

Each ring entry carries a sequence number that is odd while the entry is being written: a reader of
the ring skips such entries, and entries that changed while they were read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .choices import ReaderLayout
from .sharded import BlockCheckpoint, Recorder

_RING = 32  # block checkpoints kept per (reader, sharded domain): the consumer lags a few blocks at most
_RING_BYTES = 4096  # room for one shard's datasets state_dict as JSON


@dataclass(frozen=True)
class LoadedReaders:
    """The ``"readers"`` part of a loaded state: the layout it was read in, the block checkpoint of each reader
    of this process (keyed ``"<domain>/<reader>"``), and each sharded domain's draws per reader."""

    layout: ReaderLayout
    checkpoints: dict[str, BlockCheckpoint]
    draws: dict[str, list[int]]


class ReaderCheckpoints:
    """Block checkpoints of the readers of ``domains`` sharded domains, for ``workers`` logical workers.

    A checkpoint is a :data:`~.sharded.BlockCheckpoint`: the reader's draw count at the start of a block,
    where that block lies, and the shard's state JSON there (``None`` at the start of a shard).
    """

    def __init__(self, domains: int, workers: int):
        self._alloc(domains, workers)
        self._loaded: LoadedReaders | None = None  # reader checkpoints of a loaded state

    def _alloc(self, domains: int, workers: int) -> None:
        """Shared block checkpoints of the sharded readers: ``[logical worker, sharded domain, entry]``.
        Meta columns: sequence (odd while written), draws, pass, shard position, block, JSON length
        (-1: too long to keep), readers per domain when it was written."""
        e = domains
        self._meta = torch.zeros(workers, e, _RING, 7, dtype=torch.int64).share_memory_()
        self._json = torch.zeros(workers, e, _RING, _RING_BYTES if e else 0, dtype=torch.uint8).share_memory_()
        self._head = torch.zeros(workers, e, dtype=torch.int64).share_memory_()

    @property
    def workers(self) -> int:
        """How many logical workers have rings."""
        return self._meta.shape[0]

    def grow(self, workers: int) -> None:
        """Make room for ``workers`` logical workers (new, empty rings when there are more than now)."""
        if workers > self.workers:
            self._alloc(self._meta.shape[1], workers)

    # ------------------------------------------------------------------ recorded by this process's readers
    def recorder(self, row: int, e: int, readers: int) -> Recorder | None:
        """The ``record`` callback of logical worker ``row``'s reader of sharded domain ``e`` (one of
        ``readers``), or ``None`` when that worker has no ring."""
        if row >= self.workers:
            return None
        meta, data = self._meta[row, e].numpy(), self._json[row, e].numpy()
        head = self._head[row].numpy()

        def record(draws: int, pass_: int, pos: int, block: int, snapshot: str | None) -> None:
            entry = meta[int(head[e]) % _RING]
            raw = b"" if snapshot is None else snapshot.encode()
            entry[0] += 1  # odd: being written
            if len(raw) > _RING_BYTES:
                entry[5] = -1
            else:
                data[int(head[e]) % _RING, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
                entry[5] = len(raw)
            entry[1:5] = draws, pass_, pos, block
            entry[6] = readers
            entry[0] += 1
            head[e] += 1

        return record

    def checkpoint(self, row: int, e: int, readers: int, draws: int) -> BlockCheckpoint | None:
        """The latest recorded block start of a reader at or before draw ``draws``, or ``None``."""
        if row >= self.workers:
            return None
        meta, data = self._meta[row, e].numpy(), self._json[row, e].numpy()
        best: BlockCheckpoint | None = None
        for slot in range(_RING):
            seq = int(meta[slot, 0])
            entry = meta[slot].copy()
            raw = bytes(data[slot, : max(int(entry[5]), 0)])
            if seq == 0 or seq % 2 or int(meta[slot, 0]) != seq:  # empty, or being written: skip it
                continue
            if entry[6] != readers or entry[5] < 0 or entry[1] > draws:
                continue
            if best is None or entry[1] >= best["draws"]:
                best = {"draws": int(entry[1]), "pass": int(entry[2]), "shard_pos": int(entry[3]),
                        "block": int(entry[4]), "state": raw.decode() if entry[5] else None}
        return best

    # ------------------------------------------------------------------ brought by a loaded state
    @staticmethod
    def parse(readers: object) -> LoadedReaders:
        """The ``"readers"`` part of a saved state; raises ``KeyError``, ``TypeError`` or ``ValueError`` when it
        is malformed."""
        if not isinstance(readers, Mapping):
            raise KeyError("readers")
        layout = tuple(int(x) for x in readers["layout"])
        checkpoints: dict[str, BlockCheckpoint] = {
            str(key): {"draws": int(c["draws"]), "pass": int(c["pass"]), "shard_pos": int(c["shard_pos"]),
                       "block": int(c["block"]), "state": None if c.get("state") is None else str(c["state"])}
            for key, c in dict(readers["checkpoints"]).items()
        }
        draws = {str(k): [int(x) for x in v] for k, v in dict(readers["draws"]).items()}
        if len(layout) != 3 or min(layout[:2]) < 1 or layout[2] < 0:
            raise ValueError(f"reader layout {list(layout)}")
        return LoadedReaders(ReaderLayout(*layout), checkpoints, draws)

    def load(self, loaded: LoadedReaders | None) -> None:
        """Keep the checkpoints of a loaded state (from :meth:`parse`; ``None``: there are none)."""
        self._loaded = loaded

    @property
    def loaded_layout(self) -> ReaderLayout | None:
        """The reader layout of the loaded state, if any."""
        return None if self._loaded is None else self._loaded.layout

    def stored(self, domain: str, reader: int, layout: tuple[int, int, int], draws: int) -> BlockCheckpoint | None:
        """The loaded checkpoint of reader ``reader`` of ``domain`` if the state was saved with
        ``layout`` and the checkpoint lies at or before draw ``draws``, else ``None``."""
        loaded = self._loaded
        if loaded is None or loaded.layout != layout:
            return None
        ckpt = loaded.checkpoints.get(f"{domain}/{reader}")
        return ckpt if ckpt is not None and ckpt["draws"] <= draws else None
