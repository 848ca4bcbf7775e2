"""The TiKMiX-M target: validation-loss drops after one virtual step along each candidate mixture."""

from __future__ import annotations

import math

import numpy as np
import torch

from .._distributed import rank_and_world, unwrap
from .._loss import measurement_mode
from .checks import Batches, batch_sets, check_mixtures, finite_losses, first_sequences
from .engine import InfluencePass
from .layout import ParameterLayout
from .result import InfluenceResult
from .sharding import local_piece, sharding_of


def lookahead_gain(
    model: torch.nn.Module,
    result: InfluenceResult,
    validation_batches: Batches,
    W,
    *,
    step_size: float,
    max_sequences: int | None = None,
    show_progress: bool = True,
) -> np.ndarray:
    """Validation-loss drop after one virtual preconditioned step along each candidate mixture.

    The TiKMiX-M target of ``docs/method.md`` §4: for each row ``w_k`` of ``W``::

        gain[k, i] = L_i(theta) - L_i(theta - step_size * P^{-1} sum_j W_kj g_j)

    with ``P^{-1} g_j`` the preconditioned domain gradients kept by
    ``group_influence(..., keep_domain_gradients=True)`` (same preconditioner, same parameters) and
    ``L_i`` the mean token cross-entropy of task ``i`` (the columns follow ``validation_batches``),
    over the task's first ``max_sequences`` sequences when given (the look-ahead costs one forward
    pass over them per candidate; the drop is paired, measured on the same sequences before and
    after the step, so a few sequences rank candidates well).
    Only forward passes run, under ``torch.no_grad()``. For small steps ``gain ~= step_size * S w``;
    for finite steps the gain is non-linear in ``w`` (curvature along the mixed direction), which is
    what makes it worth a regressor while ``S w`` is not.

    The parameters are moved in place and restored bitwise from a copy afterwards (one extra
    parameter-sized buffer, plus one for the mixed direction); the other guarantees of
    :func:`group_influence` hold too. Under data parallelism each rank evaluates its slice of the
    validation batches and the losses are all-reduced, so every rank returns the same array.

    Returns:
        ``(N, n_tasks)`` float64 array.
    """
    if not isinstance(result, InfluenceResult):
        raise TypeError(
            f"result must be an InfluenceResult from group_influence, got {type(result).__name__}"
        )
    if result.domain_gradients is None:
        raise ValueError(
            "result holds no domain gradients; call group_influence(..., keep_domain_gradients=True) "
            "to get a result that lookahead_gain can step along"
        )
    step_size = float(step_size)
    if not math.isfinite(step_size) or step_size <= 0:
        raise ValueError(f"step_size must be a finite positive number, got {step_size!r}")
    W = check_mixtures(W, result.domain_names)
    module = unwrap(model, sharded=True)
    rank, world = rank_and_world()
    sharding = sharding_of(module, world)
    if sharding is not None and sharding.kind == "FSDP1":
        raise ValueError(
            "lookahead_gain does not support FullyShardedDataParallel (FSDP1): after a forward without backward "
            "its root module keeps the gathered parameters and reuses them in the next forward, so a virtual "
            "step written into the shards would not be seen. Shard the model with fully_shard (FSDP2; accelerate: "
            "fsdp_version: 2), or use the solver 'direct' / 'surrogate' with preconditioner 'identity' or 'adam', "
            "which need group_influence only"
        )
    local = None if sharding is None else local_piece
    layout = ParameterLayout.by_names(module, result.parameter_names, result.domain_gradients.dtype, local)
    if result.domain_gradients.shape[1] != layout.total:
        raise ValueError(
            f"result holds domain gradients of {result.domain_gradients.shape[1]} values per domain but this rank "
            f"has {layout.total} of the parameters {'as shards' if sharding else 'whole'}; pass the model, "
            f"sharded the same way, that group_influence measured"
        )
    validation_batches = first_sequences(validation_batches, max_sequences, "max_sequences")
    tasks = batch_sets(validation_batches, "validation_batches", "task", layout.device)
    pass_ = InfluencePass(module, layout, rank, world, show_progress, sharding)
    gains = np.empty((W.shape[0], len(tasks)), dtype=np.float64)
    kept = result.domain_gradients
    n_micro = (W.shape[0] + 1) * sum(pass_.local_count(t) for t in tasks.values())
    with pass_.progress(n_micro), measurement_mode(module), torch.no_grad():
        # Sharded, the step moves this rank's pieces in place; FSDP gathers them in the next forward.
        originals = [p.detach().clone() for p in layout.pieces]
        try:
            base = finite_losses(pass_.eval_losses(tasks), tasks)
            base = np.array([base[name] for name in tasks])
            weights = torch.as_tensor(W, dtype=kept.dtype, device=kept.device)
            for k in range(W.shape[0]):
                direction = (weights[k] @ kept).to(layout.device)
                for (start, stop), p, original in zip(layout.spans, layout.pieces, originals):
                    p.copy_(original - step_size * direction[start:stop].view_as(p))
                del direction
                losses = finite_losses(
                    pass_.eval_losses(tasks), tasks,
                    context=f" after the virtual step of candidate {k} (step_size={step_size}); "
                    "try a smaller step_size",
                )
                gains[k] = base - np.array([losses[name] for name in tasks])
        finally:
            for p, original in zip(layout.pieces, originals):
                p.copy_(original)
    return gains
