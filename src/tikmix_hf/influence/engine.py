"""The pass engine: micro-batch gradients, the validation side, the probe streams, the bytes they cost.

One :class:`InfluencePass` per call of a public influence function holds the machinery every pass
shares: the loss, the gradient of one micro-batch, the collectives and the memory ledger.

With a sharded model (:mod:`.sharding`) every gradient-sized buffer holds this rank's pieces; the
micro-batches become aligned steps of ``world`` batches, gradient buffers need no all-reduce (FSDP's
reduce-scatter already summed them), and dot products are partial sums that the small tables'
all-reduce completes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from .._distributed import all_reduce
from .._loss import forward_extras, summed_token_loss
from .checks import BatchSet, finite_losses
from .preconditioners import (
    DiagonalPreconditioner,
    FisherPreconditioner,
    IdentityPreconditioner,
    adam_or_identity,
)
from .result import InfluenceResult
from .sharding import local_piece


class Ledger:
    """Bytes of the buffers the pass allocates (the CPU memory measure), current and peak."""

    def __init__(self):
        self.now = self.peak = 0

    def hold(self, nbytes):
        self.now += int(nbytes)
        self.peak = max(self.peak, self.now)

    def release(self, nbytes):
        self.now -= int(nbytes)

    @contextlib.contextmanager
    def transient(self, nbytes):
        self.hold(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)


def new_buffer(shape, dtype, device, ledger):
    tensor = torch.zeros(shape, dtype=dtype, device=device)
    ledger.hold(tensor.numel() * tensor.element_size())
    return tensor


class InfluencePass:
    """Shared machinery of one call: the loss, micro-batch gradients, collectives, accounting."""

    def __init__(self, module, layout, rank, world, show_progress, sharding=None):
        self.module, self.layout, self.rank, self.world = module, layout, rank, world
        self.sharding = sharding
        self.show_progress = show_progress
        self.ledger = Ledger()
        self.bar = None
        self.task_losses: dict[str, float] = {}
        self.peak_memory_bytes = 0
        self.memory_measure = "cpu_buffers"
        self.forward_extra = forward_extras(module)
        # Per-micro-batch gradient (autograd's output) plus, when the buffers have another dtype,
        # one converted parameter-sized slice at a time.
        converted = layout.largest * layout.dtype.itemsize if layout.converts else 0
        self.micro_batch_bytes = layout.gradient_bytes + converted
        self._span_index = {span: index for index, span in enumerate(layout.spans)}

    def result(self, *, started: float, tasks, **measured):
        """The :class:`InfluenceResult` of this pass: what every pass knows, plus what the caller measured."""
        layout = self.layout
        return InfluenceResult(
            num_parameters=layout.total,
            task_tokens={name: t.tokens for name, t in tasks.items()},
            task_losses=self.task_losses,
            seconds=time.perf_counter() - started,
            peak_memory_bytes=self.peak_memory_bytes,
            buffer_bytes=self.ledger.peak,
            buffer_dtype=str(layout.dtype).removeprefix("torch."),
            memory_measure=self.memory_measure,
            world_size=self.world,
            parameter_names=list(layout.names),
            **measured,
        )

    # -- bookkeeping ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def measure(self):
        device = self.layout.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        try:
            yield
        finally:
            if device.type == "cuda":
                self.peak_memory_bytes = torch.cuda.max_memory_allocated(device) - before
                self.memory_measure = "cuda_max_memory_allocated"
            else:
                self.peak_memory_bytes = self.ledger.peak

    @contextlib.contextmanager
    def progress(self, total):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            desc="group influence",
            unit="batch",
            disable=not self.show_progress or self.rank != 0,
        )
        try:
            yield
        finally:
            self.bar.close()
            self.bar = None

    # -- one micro-batch -----------------------------------------------------------------------

    def summed_loss(self, batch) -> torch.Tensor:
        """Sum of next-token cross-entropies over the labelled targets of one batch."""
        return summed_token_loss(self.module, batch, self.forward_extra)

    def local_count(self, bset: BatchSet) -> int:
        """Forward/backward calls this rank makes for one pass over ``bset``."""
        if self.sharding is not None:
            return len(self.sharding.steps(bset, self.rank))
        return len(bset.local(self.rank, self.world))

    def units(self, bset: BatchSet) -> list[int]:
        """The index of each micro-batch :meth:`micro_batches` yields: the batch's (or sharded, the step's)."""
        if self.sharding is not None:
            return [step.index for step in self.sharding.steps(bset, self.rank)]
        return bset.local_indices(self.rank, self.world)

    def micro_batches(self, bset: BatchSet, replicated: bool = False) -> Iterator:
        """``(tokens, summed_loss, grads)`` per local micro-batch; grads of ``summed_loss / bset.tokens``.

        Summing per-token losses and dividing by the set's total count makes the accumulated gradient
        the gradient of the mean over the whole domain or task, not a mean of batch means.

        Sharded, a micro-batch is an aligned step: ``tokens`` are the step's over all ranks, the loss
        is this rank's and the grads are this rank's pieces of the step's summed gradient. With
        ``replicated`` every rank differentiates every batch, so a step's gradient is one batch's.
        """
        if self.sharding is not None:
            yield from self._sharded_micro_batches(bset, replicated)
            return
        for batch, tokens in bset.local(self.rank, self.world):
            with torch.enable_grad():
                loss = self.summed_loss(batch)
                try:
                    grads = torch.autograd.grad(loss / bset.tokens, self.layout.params, allow_unused=True)
                except RuntimeError as error:
                    if "reentrant" in str(error):
                        raise RuntimeError(
                            "group_influence differentiates with torch.autograd.grad, which reentrant "
                            "gradient checkpointing does not support; enable checkpointing with "
                            "gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers "
                            "default)"
                        ) from error
                    raise
            with self.ledger.transient(self.micro_batch_bytes):
                yield tokens, loss.detach(), grads
            del grads
            if self.bar is not None:
                self.bar.update(1)

    def _sharded_micro_batches(self, bset, replicated):
        sharding = self.sharding
        if replicated:
            steps = [(b, c) for b, c in zip(bset.batches, bset.counts) if c > 0]
            # FSDP averages the identical gradients of all ranks: the average is the batch's gradient.
            scale = 1.0
        else:
            steps = [(step.batch, step.step_tokens) for step in sharding.steps(bset, self.rank)]
            # FSDP averages over ranks; scaling the loss by world makes the reduced gradient the sum.
            scale = float(self.world)
        for batch, tokens in steps:
            with torch.enable_grad():
                loss = self.summed_loss(batch)
                grads = sharding.gradients(loss / bset.tokens, self.layout.params, scale)
            with self.ledger.transient(self.micro_batch_bytes):
                yield tokens, loss.detach(), grads
            del grads
            if self.bar is not None:
                self.bar.update(1)

    # -- collectives -----------------------------------------------------------------------------

    def reduce_gradients(self, buffer):
        """Sum a gradient-sized buffer over ranks; sharded, FSDP's reduce-scatter has already done it."""
        if self.sharding is None:
            all_reduce(buffer, self.world)
        return buffer

    def record(self, stats, pending, j, k, tokens, own, total):
        """Record one micro-batch's column in ``stats``; sharded, a partial column waits for :meth:`settle`.

        A sharded column is a sum of per-rank partial dot products, and the standard errors square
        it, so it must be complete before it is recorded.
        """
        if self.sharding is None:
            stats.add(j, k, tokens, own, total)
        else:
            pending.append((j, k, tokens, own.double(), total))

    def settle(self, stats, pending):
        """Complete the pending partial columns with one all-reduce and record them."""
        if self.sharding is None or stats is None or not pending:
            return
        columns = all_reduce(torch.stack([own for _, _, _, own, _ in pending]), self.world)
        for (j, k, tokens, _, total), own in zip(pending, columns):
            stats.add(j, k, tokens, own, total)

    def reduce_stats(self, stats):
        """Sum per-rank statistics; sharded, :meth:`settle` recorded complete columns on every rank."""
        if self.sharding is None:
            stats.reduce(self.world)

    def preconditioner(self, name, optimizer, fisher, damping):
        """The ``P^{-1}`` named ``name``, on this rank's pieces when sharded; and the fallback reason."""
        layout = self.layout
        if name == "adam":
            if self.sharding is None:
                return adam_or_identity(layout.names, layout.params, optimizer)
            precond, reason = adam_or_identity(layout.names, layout.params, optimizer, local_piece)
            # Each rank reads the state of its own pieces; all must scale alike or all fall back.
            failed = all_reduce(torch.tensor([float(reason is not None)], device=layout.device), self.world)
            if failed.item() and reason is None:
                precond = IdentityPreconditioner()
                reason = "the optimizer state of another rank's pieces is unusable (that rank's warning says why)"
            return precond, reason
        if name == "diag_fisher":
            if damping is None:
                if self.sharding is None:
                    mean = float(fisher.mean())
                else:
                    # The mean over all pieces, so that every rank damps alike.
                    parts = torch.tensor([float(fisher.sum(dtype=torch.float64)), fisher.numel()],
                                         dtype=torch.float64, device=fisher.device)
                    total, count = all_reduce(parts, self.world).tolist()
                    mean = total / count
                damping = 0.1 * mean if mean > 0 else 1.0
            return FisherPreconditioner(fisher, layout.offsets, damping), None
        return IdentityPreconditioner(), None

    def dots(self, task_side, grads) -> torch.Tensor:
        """``<p_i, grad>`` for every row ``p_i`` of ``task_side``: one matrix-vector product per parameter."""
        column = torch.zeros(task_side.shape[0], dtype=self.layout.compute_dtype, device=self.layout.device)
        for (start, stop), g in self.flat(grads):
            column.add_(torch.mv(task_side[:, start:stop], g))
        return column

    def flat(self, grads):
        """``(span, flattened gradient)`` per parameter in buffer dtype, skipping unused parameters."""
        for span, g in zip(self.layout.spans, grads):
            if g is not None:
                yield span, g.reshape(-1).to(self.layout.dtype)

    # -- passes ----------------------------------------------------------------------------------

    def fisher(self, domains) -> torch.Tensor:
        """``F = mean over probe micro-batches b of (grad of b's mean loss)^2``, all domains and ranks."""
        fisher = new_buffer(self.layout.total, self.layout.dtype, self.layout.device, self.ledger)
        for domain in domains.values():
            # Sharded, a step's gradient sums world batches and its square would add cross terms;
            # F needs one batch per backward, so every rank differentiates every probe batch.
            for tokens, _, grads in self.micro_batches(domain, replicated=True):
                self._add_fisher(fisher, grads, domain.tokens / tokens)
        return self._finish_fisher(fisher, domains)

    def _add_fisher(self, fisher, grads, rescale):
        # grads are of (summed loss / domain tokens); rescaling gives the batch-mean gradient.
        for (start, stop), g in self.flat(grads):
            fisher[start:stop].addcmul_(g, g, value=rescale**2)

    def _finish_fisher(self, fisher, domains):
        self.reduce_gradients(fisher)
        n_batches = sum(1 for domain in domains.values() for count in domain.counts if count > 0)
        return fisher.div_(n_batches)

    def validation(self, tasks, precond, projector):
        """The ``n`` task gradients, all-reduced, preconditioned if ``precond`` is given, maybe projected."""
        n, layout = len(tasks), self.layout
        loss_sums = torch.zeros(n, dtype=torch.float64, device=layout.device)
        if projector is None:
            rows = new_buffer((n, layout.total), layout.dtype, layout.device, self.ledger)
        else:
            rows = new_buffer((n, projector.k), layout.compute_dtype, layout.device, self.ledger)
            accumulator = new_buffer(layout.total, layout.dtype, layout.device, self.ledger)
        for i, task in enumerate(tasks.values()):
            target = rows[i] if projector is None else accumulator.zero_()
            for _, loss, grads in self.micro_batches(task):
                loss_sums[i] += loss.double()
                for (start, stop), g in self.flat(grads):
                    target[start:stop].add_(g)
            if projector is not None:
                # P^{-1} and the projection are linear and identical on every rank, so the local
                # partial sums can be transformed before the all-reduce of the small k-vectors.
                if precond is not None:
                    self.precondition_rows(accumulator[None], precond)
                rows[i] = projector.project(accumulator[None])[0]
        if projector is not None:
            del accumulator
            self.ledger.release(layout.total * layout.dtype.itemsize)
        if projector is None:
            self.reduce_gradients(rows)
        else:
            all_reduce(rows, self.world)
        all_reduce(loss_sums, self.world)
        self.task_losses = finite_losses(loss_sums, tasks)
        # A row sum is non-finite when any entry is (gradients never come near the overflow
        # threshold), and unlike isfinite(rows) it allocates n numbers, not an n x P mask.
        row_sums = rows.sum(dim=1, dtype=layout.compute_dtype)
        if self.sharding is not None:
            # Each rank sees only its pieces; every rank must take the same decision.
            all_reduce(row_sums, self.world)
        bad = (~torch.isfinite(row_sums)).nonzero()
        if len(bad):
            raise FloatingPointError(
                f"the gradient of task {list(tasks)[int(bad[0])]!r} is not finite; check its batches and the "
                f"model's numerics"
            )
        if projector is None and precond is not None:
            self.precondition_rows(rows, precond)
        return rows

    def precondition_rows(self, rows, precond: DiagonalPreconditioner):
        """Apply ``P^{-1}`` in place to each row of an ``(r, P)`` buffer, one row and parameter at a time.

        The scaling runs in ``compute_dtype`` on the parameters' device; a row slice is converted
        (and copied back) only when the buffer has another dtype or lives in host memory.
        """
        if isinstance(precond, IdentityPreconditioner):
            return
        layout = self.layout
        # One temporary for the diagonal, plus the converted slice when a conversion is needed.
        converts = rows.dtype != layout.compute_dtype or rows.device != layout.device
        with self.ledger.transient((1 + converts) * layout.largest * layout.compute_dtype.itemsize):
            for row in rows:
                for index, (start, stop) in enumerate(layout.spans):
                    block = row[start:stop]
                    work = block.to(device=layout.device, dtype=layout.compute_dtype)
                    precond.scale_(index, work)
                    if work is not block:
                        block.copy_(work)

    def stream_domains(self, domains, task_side, projector, stats=None):
        """Accumulate ``<p_i, grad loss_b>`` over probe micro-batches into the ``n x m`` table.

        With ``stats`` (no projection) each micro-batch's own column of contributions is also
        recorded in :class:`BatchStats`; the table is accumulated exactly as without it.
        """
        layout = self.layout
        table = torch.zeros((task_side.shape[0], len(domains)), dtype=torch.float64, device=layout.device)
        loss_sums = torch.zeros(len(domains), dtype=torch.float64, device=layout.device)
        if projector is not None:
            # Projecting each micro-batch would regenerate the P x k blocks per batch; projecting
            # the domain's sum once costs one more gradient-sized buffer instead.
            accumulator = new_buffer(layout.total, layout.dtype, layout.device, self.ledger)
        pending: list[tuple[int, int, float, torch.Tensor, float]] = []  # see record()
        for j, domain in enumerate(domains.values()):
            column = torch.zeros(task_side.shape[0], dtype=layout.compute_dtype, device=layout.device)
            if projector is not None:
                accumulator.zero_()
            indices = self.units(domain)
            for k, (tokens, loss, grads) in zip(indices, self.micro_batches(domain)):
                loss_sums[j] += loss.double()
                if projector is None:
                    own = self.dots(task_side, grads)
                    column.add_(own)
                    if stats is not None:
                        self.record(stats, pending, j, k, tokens, own, domain.tokens)
                else:
                    for (start, stop), g in self.flat(grads):
                        accumulator[start:stop].add_(g)
            if projector is not None:
                column = task_side @ projector.project(accumulator[None])[0]
            table[:, j] = column.double()
        all_reduce(table, self.world)
        all_reduce(loss_sums, self.world)
        self.settle(stats, pending)
        return table, loss_sums

    def keep_domains(self, domains, keep_device, want_fisher, stats=None, task_side=None, precond=None):
        """Accumulate each domain's gradient ``g_j`` (m buffers), and ``F`` in the same pass if wanted.

        With ``stats`` (and the preconditioner known up front) each micro-batch's contributions
        ``<v_i, P^{-1} grad loss_b>`` are recorded too; ``task_side`` holds the raw ``v_i``.
        """
        layout = self.layout
        device = layout.device if keep_device == "params" else keep_device
        kept = new_buffer((len(domains), layout.total), layout.dtype, device, self.ledger)
        fisher = new_buffer(layout.total, layout.dtype, layout.device, self.ledger) if want_fisher else None
        loss_sums = torch.zeros(len(domains), dtype=torch.float64, device=layout.device)
        pending: list[tuple[int, int, float, torch.Tensor, float]] = []  # see record()
        for j, domain in enumerate(domains.values()):
            indices = self.units(domain)
            for k, (tokens, loss, grads) in zip(indices, self.micro_batches(domain)):
                loss_sums[j] += loss.double()
                if fisher is not None:
                    self._add_fisher(fisher, grads, domain.tokens / tokens)
                own = None
                if stats is not None:
                    own = torch.zeros(task_side.shape[0], dtype=layout.compute_dtype, device=layout.device)
                for (start, stop), g in self.flat(grads):
                    kept[j, start:stop].add_(g.to(device))
                    if own is not None:
                        work = g.to(layout.compute_dtype, copy=True)
                        if not isinstance(precond, IdentityPreconditioner):
                            precond.scale_(self._span_index[(start, stop)], work)
                        own.add_(torch.mv(task_side[:, start:stop].to(layout.compute_dtype), work))
                if own is not None:
                    self.record(stats, pending, j, k, tokens, own, domain.tokens)
        if self.sharding is not None:
            pass  # each rank keeps its pieces of the already reduced gradients
        elif kept.device == layout.device:
            all_reduce(kept, self.world)
        else:
            # Host-memory copies: reduce one domain at a time through the parameters' device, which
            # every backend (NCCL included) can all-reduce.
            for row in kept:
                row.copy_(all_reduce(row.to(layout.device), self.world))
        all_reduce(loss_sums, self.world)
        self.settle(stats, pending)
        if fisher is not None:
            fisher = self._finish_fisher(fisher, domains)
        return kept, fisher, loss_sums

    def table_from_kept(self, task_side, kept, projector):
        if projector is not None:
            # The kept gradients are full-size (the look-ahead steps along them); the scores still use
            # the projection so that S means the same with and without keep_domain_gradients.
            return (task_side @ projector.project(kept).T).double()
        layout = self.layout
        table = torch.empty((task_side.shape[0], kept.shape[0]), dtype=torch.float64, device=layout.device)
        for j in range(kept.shape[0]):
            column = torch.zeros(task_side.shape[0], dtype=layout.compute_dtype, device=layout.device)
            for start, stop in layout.spans:
                column.add_(torch.mv(task_side[:, start:stop], kept[j, start:stop].to(layout.device)))
            table[:, j] = column.double()
        if self.sharding is not None:
            all_reduce(table, self.world)  # partial dot products of this rank's pieces
        return table

    def eval_losses(self, tasks) -> torch.Tensor:
        """Summed token losses per task over all ranks (forward only)."""
        loss_sums = torch.zeros(len(tasks), dtype=torch.float64, device=self.layout.device)
        with torch.no_grad():
            for i, task in enumerate(tasks.values()):
                if self.sharding is None:
                    batches = [batch for batch, _ in task.local(self.rank, self.world)]
                else:
                    # FSDP gathers in every forward: every rank makes the same number of them.
                    batches = [step.batch for step in self.sharding.steps(task, self.rank)]
                for batch in batches:
                    loss_sums[i] += self.summed_loss(batch).double()
                    if self.bar is not None:
                        self.bar.update(1)
        if self.sharding is not None:
            self.sharding.reshard()
        return all_reduce(loss_sums, self.world)


