"""How the Trainer's training DataLoader reads the mixture: samples per micro-step, per rank, per worker.

The callback needs these numbers to turn an optimizer step into a stream position (where the
mixture's new weights may start, where a resume must seek) and a training micro-batch into the
mixture samples it holds (the training window). :meth:`LoaderGeometry.of` reads them once from the
loader accelerate prepared; everything else is arithmetic on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LoaderGeometry"]


@dataclass(frozen=True)
class LoaderGeometry:
    """Samples of the mixture's stream consumed by training, per micro-step and per rank."""

    micro_global: int = 1  # stream samples per micro-step, all ranks together
    grad_accum: int = 1  # micro-steps per optimizer step
    per_worker_batch: int = 1  # samples each DataLoader worker reads per batch it yields
    num_workers: int = 0
    prefetch_factor: int | None = None
    ranks: int | None = None  # dispatch_batches=False: each rank reads only its slice of every batch
    rank: int | None = None
    steps_per_epoch: int | None = None  # optimizer steps per pass over the loader (None: it has no length)

    @classmethod
    def of(cls, loader: Any, args: Any) -> LoaderGeometry:
        """The geometry of accelerate's prepared training ``loader`` under ``args`` (``TrainingArguments``)."""
        from accelerate.data_loader import IterableDatasetShard

        dataset = loader.dataset
        batch = loader.batch_size or args.per_device_train_batch_size
        split = bool(getattr(args.accelerator_config, "split_batches", False))
        world = max(args.world_size, 1)
        sharded = isinstance(dataset, IterableDatasetShard)
        if sharded:  # dispatch_batches=False: every rank reads everything, and keeps its slice
            per_worker = dataset.batch_size * (1 if dataset.split_batches else dataset.num_processes)
        else:  # one process, or rank 0 reading for all (dispatch_batches=True)
            per_worker = batch
        # accelerate's own total_batch_size does not count the ranks of an IterableDatasetShard.
        sliced = sharded and dataset.num_processes > 1
        try:
            per_epoch = len(loader) // int(args.gradient_accumulation_steps)
        except TypeError:
            per_epoch = None
        return cls(
            micro_global=int(batch if split else batch * world),
            grad_accum=int(args.gradient_accumulation_steps),
            per_worker_batch=int(per_worker),
            num_workers=int(loader.num_workers),
            prefetch_factor=loader.prefetch_factor,
            ranks=dataset.num_processes if sliced else None,
            rank=dataset.process_index if sliced else None,
            steps_per_epoch=per_epoch,
        )

    def consumed(self, global_step: int) -> int:
        """Stream samples trained on after ``global_step`` optimizer steps, all ranks together."""
        return int(global_step) * self.grad_accum * self.micro_global

    def rows_per_rank(self, world: int) -> int:
        """Sequences of one rank's training micro-batch."""
        return self.micro_global // max(world, 1)

    def micro_batch_start(self, step: int, k: int, rank: int, world: int) -> int:
        """The stream index of the first sample of ``rank``'s ``k``-th training micro-batch since ``step``.

        accelerate gives rank ``r`` the ``r``-th slice of every global batch, in stream order.
        """
        return self.consumed(step) + k * self.micro_global + rank * self.rows_per_rank(world)

    def resume_start(self, global_step: int, *, ignore_data_skip: bool, max_steps: int) -> int:
        """The stream index the resumed DataLoader starts from.

        With ``ignore_data_skip`` that is the position reached; otherwise the Trainer replays and discards
        the batches already trained in this epoch, so the stream starts at the epoch's beginning (a loader
        without a length has one epoch, the whole run).
        """
        consumed = self.consumed(global_step)
        if ignore_data_skip:
            return consumed
        per_epoch = max(self.steps_per_epoch if self.steps_per_epoch is not None else max_steps, 1)
        skipped_micro = (global_step % per_epoch) * self.grad_accum
        return consumed - skipped_micro * self.micro_global

    def domain_reader(self, opened_at: int, domain_ids: Callable[[int, int], np.ndarray], rank: int,
                      world: int) -> Callable[[int, int], tuple[np.ndarray, int]]:
        """``(k, rows) -> (ids, offset)`` for the training window: the domain ids of every sample of the ``k``-th
        training micro-step since step ``opened_at`` (all ranks, stream order), and where ``rank``'s rows start.

        ``domain_ids(start, stop)`` gives the domains of the stream's samples ``[start, stop)``. A
        micro-batch whose row count is not one mixture example per row is refused.
        """
        rows = self.rows_per_rank(world)

        def domain_of(k: int, got: int) -> tuple[np.ndarray, int]:
            if got != rows:
                raise ValueError(
                    f"a training micro-batch has {got} sequences where the stream gives each rank {rows} per "
                    "micro-step (a collator that packs or splits examples?); the training window needs one row per "
                    "mixture example: use tikmix_influence_source='probes'"
                )
            start = self.micro_batch_start(opened_at, k, 0, world)
            return domain_ids(start, start + self.micro_global), rank * rows

        return domain_of
