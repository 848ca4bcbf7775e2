"""Sharded models: what this rank holds of each parameter, and how one aligned backward step fills it.

Under FSDP (FSDP2 ``fully_shard`` or FSDP1 ``FullyShardedDataParallel(use_orig_params=True)``)
every rank holds a disjoint piece of every parameter, and after a backward its piece of the
gradient is the rank average of the gradients of the batches that all ranks differentiated in
that step (FSDP's reduce-scatter). Influence is linear in gradients, so:

- a dot product of two gradient-sized vectors is the sum over ranks of the dot products of their
  local pieces: the validation gradients are kept as pieces, ``(n + 1) x P / world`` bytes per rank;
- the batches of one domain or task are differentiated in aligned steps, ``world`` batches per
  step, every rank on the same set at the same time (the reduce-scatter sums across ranks, so the
  ranks must be working on the same domain). The set's labelled batches are split evenly in order,
  rank ``r`` taking batch ``s * world + r`` of step ``s``; a rank with no batch left in the last
  step differentiates a *pad batch* (one row of the set's first batch, every label ignored), whose
  loss and gradient are exactly zero but which runs the same collectives;
- the loss is multiplied by ``world`` before the backward, so that the averaged gradient is the sum.

A step's gradient mixes ``world`` batches; quantities that are not linear in one batch's gradient
(the Fisher diagonal, the per-batch standard errors) are handled by the engine on that basis.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping

import torch

from .._loss import IGNORE_INDEX


def local_piece(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a parameter, gradient or optimizer state, flattened (a view, no copy)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.reshape(-1)


def _fsdp1_roots(module):
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return []
    return [(name, sub) for name, sub in module.named_modules() if isinstance(sub, FullyShardedDataParallel)]


def _fsdp2_modules(module):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [sub for sub in module.modules() if isinstance(sub, FSDPModule)]


@dataclasses.dataclass
class Step:
    """One aligned step of a batch set: this rank's batch (a pad batch when ``tokens == 0``)."""

    index: int
    batch: Mapping
    tokens: int
    step_tokens: int


class Sharding:
    """The FSDP flavour of a model and the shard-local operations the influence engine needs."""

    def __init__(self, kind: str, module: torch.nn.Module, world: int):
        self.kind, self.module, self.world = kind, module, world
        self._fsdp2 = _fsdp2_modules(module) if kind == "FSDP2" else []

    def __repr__(self):
        return f"Sharding({self.kind}, world={self.world})"

    # -- parameters ------------------------------------------------------------------------------

    def reshard(self) -> None:
        """Put every FSDP2 module back in its sharded state.

        The root module of FSDP2 keeps its parameters unsharded after a forward without backward
        (it expects the backward to need them); its ``named_parameters`` are then full tensors, and
        writes into the shards would not reach the gathered copy the next forward uses. FSDP1 has
        the same habit and no public way to undo it, which is why ``lookahead_gain`` refuses FSDP1.
        """
        for sub in self._fsdp2:
            sub.reshard()

    # -- gradients -------------------------------------------------------------------------------

    def trainable(self) -> list:
        # A backward fills .grad of every trainable parameter, not only of the measured ones.
        return [p for p in self.module.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def own_gradients(self, ledger):
        """Take every ``.grad`` out of the way for the pass and put it back, bit for bit, afterwards.

        FSDP2 makes a new gradient tensor when ``.grad`` is ``None``, so the caller's tensors can be
        set aside as they are. FSDP1's ``.grad`` are views into one flat gradient that later
        backward passes overwrite in place, so they are copied (counted in the ledger).
        """
        params = self.trainable()
        saved = [p.grad for p in params]
        copies = self.kind == "FSDP1"
        if copies:
            saved = [None if g is None else g.detach().clone() for g in saved]
            nbytes = sum(g.numel() * g.element_size() for g in saved if g is not None)
            ledger.hold(nbytes)
        for p in params:
            p.grad = None
        try:
            yield
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            if copies:
                ledger.release(nbytes)

    def gradients(self, loss: torch.Tensor, params, scale: float) -> list:
        """Backward of ``loss * scale`` through the sharded module; this rank's gradient pieces.

        Every ``.grad`` is cleared again, so that the next backward starts from nothing (FSDP would
        add into it). A rank whose piece of a parameter is empty (FSDP1) gets ``None`` for it.
        """
        (loss * scale).backward()
        grads = [None if p.grad is None else local_piece(p.grad) for p in params]
        for p in self.trainable():
            p.grad = None
        return grads

    # -- schedules -------------------------------------------------------------------------------

    def steps(self, bset, rank) -> list[Step]:
        """The aligned steps of a batch set (see the module docstring), the same count on every rank."""
        labelled = [(b, c) for b, c in zip(bset.batches, bset.counts) if c > 0]
        world = self.world
        pad = pad_batch(labelled[0][0])
        steps = []
        for s in range(-(-len(labelled) // world)):
            share = labelled[s * world : (s + 1) * world]
            step_tokens = sum(c for _, c in share)
            if rank < len(share):
                steps.append(Step(s, share[rank][0], share[rank][1], step_tokens))
            else:
                steps.append(Step(s, pad, 0, step_tokens))
        return steps


def pad_batch(batch: Mapping) -> dict:
    """One row of ``batch`` with every label ignored: zero loss and gradient, the same collectives."""
    row = {k: v[:1] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
    row["labels"] = torch.full_like(row["labels"], IGNORE_INDEX)
    return row


def sharding_of(module: torch.nn.Module, world: int) -> Sharding | None:
    """The model's :class:`Sharding`, ``None`` for a whole (single-process or DDP) model.

    Raises ``ValueError`` for layouts whose pieces do not partition every parameter over the ranks
    of the default process group exactly once: FSDP1 with flat parameters, hybrid sharding,
    tensor parallelism.
    """
    from torch.distributed.tensor import DTensor, Shard

    fsdp1 = _fsdp1_roots(module)
    if fsdp1:
        for name, sub in fsdp1:
            if not getattr(sub, "_use_orig_params", False):
                raise ValueError(
                    f"FSDP is not supported with flat parameters (module {name or '<root>'!r} was wrapped with "
                    f"use_orig_params=False): the influence engine needs the model's own parameters. Wrap with "
                    f"FullyShardedDataParallel(..., use_orig_params=True) (accelerate: fsdp_use_orig_params=true)"
                )
            strategy = str(getattr(sub, "sharding_strategy", ""))
            if "HYBRID" in strategy or "NO_SHARD" in strategy:
                # Replicated pieces would be counted once per replica when the dot products are summed.
                raise ValueError(
                    f"FSDP1 module {name or '<root>'!r} uses {strategy}, which replicates parameters across ranks; "
                    f"use ShardingStrategy.FULL_SHARD or SHARD_GRAD_OP (or DDP instead of NO_SHARD)"
                )
        return Sharding("FSDP1", module, world)
    fsdp2 = _fsdp2_modules(module)
    sharding = Sharding("FSDP2", module, world) if fsdp2 else None
    if sharding is not None:
        sharding.reshard()
    sharded = [(n, p) for n, p in module.named_parameters() if isinstance(p, DTensor)]
    if sharding is None:
        if sharded:
            raise ValueError(
                f"parameter {sharded[0][0]!r} is a DTensor but the model has no fully_shard module (tensor "
                f"parallel?); group_influence supports FSDP (fully_shard, or FullyShardedDataParallel with "
                f"use_orig_params=True), DDP and single processes"
            )
        return None
    whole = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if whole:
        # A parameter outside every fully_shard module is replicated: its gradient is neither reduced
        # over ranks nor split between them, so summing shard dot products would count it world times.
        raise ValueError(
            f"parameter {whole[0]!r} (and {len(whole) - 1} more) is not sharded by fully_shard, although the model "
            f"has fully_shard modules; apply fully_shard to the root module too (fully_shard(model) after the "
            f"layers), or freeze those parameters"
        )
    for name, p in sharded:
        if p.device_mesh.ndim != 1 or p.device_mesh.size() != world or list(p.placements) != [Shard(0)]:
            raise ValueError(
                f"parameter {name!r} is sharded as {list(p.placements)} over a mesh of shape "
                f"{tuple(p.device_mesh.shape)}; the influence engine supports fully_shard on a 1-D mesh of all "
                f"{world} ranks (placement Shard(0)), not hybrid sharding or tensor parallelism"
            )
    return sharding
