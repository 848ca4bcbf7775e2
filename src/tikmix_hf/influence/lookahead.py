"""The TiKMiX-M target: validation-loss drops after one virtual step along each candidate mixture."""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import ArrayLike

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
    W: ArrayLike,
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
    A caller that scores several ``W`` or step sizes at the same parameters uses :class:`Lookahead`,
    which measures the unmoved model once.

    Returns:
        ``(N, n_tasks)`` float64 array.
    """
    lookahead = Lookahead(model, result, validation_batches, max_sequences=max_sequences,
                          show_progress=show_progress)
    return lookahead.gains(W, step_size=step_size)


class Lookahead:
    """Virtual steps from one set of parameters: :func:`lookahead_gain`, called many times, for less.

    ``gains(W, step_size=...)`` returns what ``lookahead_gain`` returns for the same arguments, bit for
    bit, but the unmoved model's forward pass runs once per :class:`Lookahead`, not once per call, and
    a row already scored at the same step size is not run again. TiKMiX-M needs both: it climbs the
    step size along its anchor mixture, then scores its candidates (the anchor among them) at the
    step it chose. ``forwards`` counts the forward passes over the scored sequences so far.

    The model's parameters must be those ``result`` was measured at and must not change between
    calls: every call steps from them and restores them bitwise.
    """

    def __init__(self, model: torch.nn.Module, result: InfluenceResult, validation_batches: Batches, *,
                 max_sequences: int | None = None, show_progress: bool = True) -> None:
        if not isinstance(result, InfluenceResult):
            raise TypeError(
                f"result must be an InfluenceResult from group_influence, got {type(result).__name__}"
            )
        if result.domain_gradients is None:
            raise ValueError(
                "result holds no domain gradients; call group_influence(..., keep_domain_gradients=True) "
                "to get a result that lookahead_gain can step along"
            )
        module = unwrap(model, sharded=True)
        rank, world = rank_and_world()
        sharding = sharding_of(module, world)
        if sharding is not None and sharding.kind == "FSDP1":
            raise ValueError(
                "lookahead_gain does not support FullyShardedDataParallel (FSDP1): after a forward without "
                "backward its root module keeps the gathered parameters and reuses them in the next forward, so "
                "a virtual step written into the shards would not be seen. Shard the model with fully_shard "
                "(FSDP2; accelerate: fsdp_version: 2), or use the solver 'direct' / 'surrogate' with "
                "preconditioner 'identity' or 'adam', which need group_influence only"
            )
        local = None if sharding is None else local_piece
        layout = ParameterLayout.by_names(module, result.parameter_names, result.domain_gradients.dtype, local)
        if result.domain_gradients.shape[1] != layout.total:
            raise ValueError(
                f"result holds domain gradients of {result.domain_gradients.shape[1]} values per domain but this "
                f"rank has {layout.total} of the parameters {'as shards' if sharding else 'whole'}; pass the "
                f"model, sharded the same way, that group_influence measured"
            )
        validation_batches = first_sequences(validation_batches, max_sequences, "max_sequences")
        self.result, self.module, self.layout = result, module, layout
        self.tasks = batch_sets(validation_batches, "validation_batches", "task", layout.device)
        self.pass_ = InfluencePass(module, layout, rank, world, show_progress, sharding)
        self.forwards = 0
        self._base: np.ndarray | None = None
        self._scored: dict[tuple[float, bytes], np.ndarray] = {}

    def gains(self, W: ArrayLike, *, step_size: float) -> np.ndarray:
        """``(N, n_tasks)`` float64 drops of ``W``'s rows at ``step_size``, as :func:`lookahead_gain`."""
        step_size = float(step_size)
        if not math.isfinite(step_size) or step_size <= 0:
            raise ValueError(f"step_size must be a finite positive number, got {step_size!r}")
        W = check_mixtures(W, self.result.domain_names)
        keys = [(step_size, row.tobytes()) for row in W]
        todo = [k for k in range(W.shape[0]) if keys[k] not in self._scored and keys[k] not in keys[:k]]
        layout, pass_, tasks = self.layout, self.pass_, self.tasks
        runs = len(todo) + (self._base is None and bool(todo))
        with pass_.progress(runs * sum(pass_.local_count(t) for t in tasks.values())), \
                measurement_mode(self.module), torch.no_grad():
            # Sharded, the step moves this rank's pieces in place; FSDP gathers them in the next forward.
            originals = [p.detach().clone() for p in layout.pieces] if todo else []
            try:
                if todo and self._base is None:
                    base = finite_losses(pass_.eval_losses(tasks), tasks)
                    self._base = np.array([base[name] for name in tasks])
                    self.forwards += 1
                kept = self.result.domain_gradients
                if kept is None:
                    raise RuntimeError("the result's domain gradients were freed after this Lookahead was made")
                weights = torch.as_tensor(W, dtype=kept.dtype, device=kept.device)
                for k in todo:
                    direction = (weights[k] @ kept).to(layout.device)
                    for (start, stop), p, original in zip(layout.spans, layout.pieces, originals):
                        p.copy_(original - step_size * direction[start:stop].view_as(p))
                    del direction
                    losses = finite_losses(
                        pass_.eval_losses(tasks), tasks,
                        context=f" after the virtual step of candidate {k} (step_size={step_size}); "
                        "try a smaller step_size",
                    )
                    self.forwards += 1
                    self._scored[keys[k]] = self._base - np.array([losses[name] for name in tasks])
            finally:
                for p, original in zip(layout.pieces, originals):
                    p.copy_(original)
        return np.array([self._scored[key] for key in keys], dtype=np.float64)
