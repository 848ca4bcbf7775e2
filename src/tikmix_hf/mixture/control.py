"""The control words a mixture shares with its DataLoader workers: how the stream is read, where it starts, and
what the copies of the stream found out.

They are integers in one shared-memory tensor, so a worker (a persistent one too) reads what the main process
sets after the worker started, and the main process reads what a worker records (where the stream ended, the
reader layout it ran with). Each word is an ``int`` attribute of :class:`SharedControl`.
"""

from __future__ import annotations

from typing import Any

import torch


class _Word:
    """One ``int`` of the shared tensor, read and written as an attribute."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __get__(self, control: SharedControl, owner: type | None = None) -> int:
        return int(control.words[self.index])

    def __set__(self, control: SharedControl, value: int) -> None:
        control.words[self.index] = value


class SharedControl:
    """The mixture's control words (module docstring), zero when made, but ``prefetch`` 2 and ``ranks`` 1."""

    #: The sample index the next iterator starts at (:meth:`~tikmix_hf.DomainMixture.seek`).
    seek = _Word(0)
    #: The epoch accelerate set (``set_epoch``).
    epoch = _Word(1)
    #: As bound (:meth:`~tikmix_hf.DomainMixture.bind_loader`): stream samples per DataLoader batch, the
    #: DataLoader's workers and prefetch factor, samples per micro-step over all ranks, and the ranks that
    #: slice each batch and which slice is this process's.
    batch = _Word(2)
    workers = _Word(3)
    prefetch = _Word(4)
    global_batch = _Word(5)
    ranks = _Word(6)
    rank = _Word(7)
    #: 1 while ``set_weights`` publishes new weights: a worker that reserved its batch waits for them.
    swap_pending = _Word(8)
    #: The workers and samples per worker batch the last iterator ran with (0: none ran yet).
    seen_workers = _Word(9)
    seen_chunk = _Word(10)
    #: Where the stream ends, as the sample index + 1 (0: it has not ended), and the domain that ran out.
    ended = _Word(11)
    ended_domain = _Word(12)

    _SIZE = 13

    def __init__(self) -> None:
        self._tensor = torch.zeros(self._SIZE, dtype=torch.int64).share_memory_()
        self.words = self._tensor.numpy()  # a view of the shared memory: cheap to read in the iterator's loop
        self.prefetch, self.ranks = 2, 1

    def __getstate__(self) -> dict[str, Any]:
        return {"tensor": self._tensor}  # the view is rebuilt where it lands: a pickled array would be a copy

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._tensor = state["tensor"]
        self.words = self._tensor.numpy()
