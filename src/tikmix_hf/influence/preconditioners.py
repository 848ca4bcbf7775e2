"""Diagonal curvature for Group Influence: the ``P^{-1}`` in ``S_ij = grad f_i^T P^{-1} g_j``.

Paper Eq. 8 writes the curvature as ``(H + lambda I)^{-1}``. tikmix_hf offers three diagonal
stand-ins for it (``docs/influence.md`` explains the choice):

- ``identity``: ``P = I``. No state, the same under every optimizer and sharding; damping is
  irrelevant because every direction is scaled alike.
- ``adam``: ``P^{-1} = 1 / (sqrt(v_hat) + eps)`` with ``v_hat = exp_avg_sq / (1 - beta2^t)``, read
  from a live Adam/AdamW optimizer. This is the scaling the next optimizer step applies, so
  ``S`` becomes the first-order effect of an Adam step on the mixed gradient.
- ``diag_fisher``: ``P^{-1} = 1 / (F + damping)`` with ``F`` the mean over probe micro-batches of
  the squared micro-batch gradient (an empirical Fisher at micro-batch granularity).

Every preconditioner acts one parameter at a time (:meth:`DiagonalPreconditioner.scale_`), so
none of them holds a parameter-sized buffer of its own except ``diag_fisher``, which needs ``F``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

__all__ = [
    "PRECONDITIONERS",
    "AdamPreconditioner",
    "DiagonalPreconditioner",
    "FisherPreconditioner",
    "IdentityPreconditioner",
    "PreconditionerFallbackWarning",
    "adam_or_identity",
    "check_preconditioner_name",
]

PRECONDITIONERS = ("identity", "adam", "diag_fisher")


class PreconditionerFallbackWarning(UserWarning):
    """The requested preconditioner could not be built; identity was used instead."""


def check_preconditioner_name(name: str) -> str:
    if name not in PRECONDITIONERS:
        raise ValueError(
            f"preconditioner={name!r} is not known; choose one of {', '.join(map(repr, PRECONDITIONERS))} "
            "(EK-FAC is not offered: use kronfluence directly for per-example studies)."
        )
    return name


class DiagonalPreconditioner:
    """A diagonal ``P^{-1}`` over an ordered list of parameters, applied per parameter in place."""

    name = "identity"

    def scale_(self, index: int, block: torch.Tensor) -> None:
        """Multiply ``block`` (``(..., numel)`` of parameter ``index``, flattened) by ``P^{-1}``."""


class IdentityPreconditioner(DiagonalPreconditioner):
    name = "identity"


class AdamPreconditioner(DiagonalPreconditioner):
    """``1 / (sqrt(exp_avg_sq / (1 - beta2^t)) + eps)``, the denominator of the next Adam step.

    The diagonal is recomputed per parameter when applied rather than stored: it costs a few
    elementwise operations and saves a parameter-sized buffer.
    """

    name = "adam"

    def __init__(self, entries: Sequence[tuple[torch.Tensor, float, float, float]]):
        # One (second moment, beta2, step, eps) per parameter, in layout order.
        self._entries = list(entries)

    def scale_(self, index: int, block: torch.Tensor) -> None:
        second_moment, beta2, step, eps = self._entries[index]
        v_hat = second_moment.detach().reshape(-1).to(device=block.device, dtype=block.dtype)
        v_hat = v_hat / (1.0 - beta2**step)
        block.div_(v_hat.sqrt_().add_(eps))


class FisherPreconditioner(DiagonalPreconditioner):
    """``1 / (F + damping)`` with ``F`` a flat buffer laid out like the gradient buffers."""

    name = "diag_fisher"

    def __init__(self, fisher: torch.Tensor, offsets: Sequence[int], damping: float):
        self.fisher = fisher
        self.damping = float(damping)
        self._offsets = list(offsets)

    def scale_(self, index: int, block: torch.Tensor) -> None:
        start, stop = self._offsets[index], self._offsets[index + 1]
        block.div_(self.fisher[start:stop].to(device=block.device, dtype=block.dtype) + self.damping)


def _step_count(state: dict) -> float | None:
    step = state.get("step")
    if step is None:
        return None
    return float(step.item() if torch.is_tensor(step) else step)


def adam_or_identity(
    names: Sequence[str], params: Sequence[torch.Tensor], optimizer, local=None
) -> tuple[DiagonalPreconditioner, str | None]:
    """Build :class:`AdamPreconditioner` from ``optimizer``'s state, or say why not.

    ``optimizer`` may be a ``torch.optim`` optimizer or anything that proxies ``.state`` and
    ``.param_groups`` (accelerate's ``AcceleratedOptimizer``). Returns the preconditioner and
    ``None``, or :class:`IdentityPreconditioner` and the reason, after warning with
    :class:`PreconditionerFallbackWarning`. A partial state (some parameters without a second
    moment) also falls back entirely: mixing Adam-scaled and unscaled coordinates would give a
    score in no consistent metric. ``local`` maps a sharded second moment to this rank's piece
    (laid out like the parameter's piece), for models whose gradients are kept as shards.
    """
    # A rank whose piece of a parameter is empty (FSDP1) never steps it, so it has no state to read
    # and nothing to scale.
    empty = [local is not None and local(p).numel() == 0 for p in params]
    reason = _adam_unavailable_reason(
        [n for n, e in zip(names, empty) if not e], [p for p, e in zip(params, empty) if not e], optimizer
    )
    if reason is None:
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        entries = []
        for p, is_empty in zip(params, empty):
            if is_empty:
                entries.append((local(p), 0.0, 1.0, 1.0))
                continue
            state, group = optimizer.state[p], groups[id(p)]
            # amsgrad steps with the running maximum of the second moment, so that is the scaling.
            amsgrad = group.get("amsgrad") and "max_exp_avg_sq" in state
            moment = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
            if local is not None:
                moment = local(moment)
            step = _step_count(state)
            assert step is not None  # _adam_unavailable_reason found a step count > 0 for every parameter
            entries.append((moment, float(group["betas"][1]), step, float(group["eps"])))
        return AdamPreconditioner(entries), None
    warnings.warn(
        f"preconditioner='adam' is unavailable ({reason}); using preconditioner='identity' instead. "
        "InfluenceResult.preconditioner records the one actually used.",
        PreconditionerFallbackWarning,
        stacklevel=4,
    )
    return IdentityPreconditioner(), reason


def _adam_unavailable_reason(names, params, optimizer) -> str | None:
    if optimizer is None:
        return "no optimizer was passed; pass optimizer=<the training optimizer>"
    if not hasattr(optimizer, "state") or not hasattr(optimizer, "param_groups"):
        return f"optimizer of type {type(optimizer).__name__} has no .state/.param_groups"
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in zip(names, params) if id(p) not in groups]
    if missing:
        return f"{len(missing)} parameter(s) are not in the optimizer, e.g. {missing[0]!r}"
    for name, p in zip(names, params):
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            if state:
                return (
                    f"{type(getattr(optimizer, 'optimizer', optimizer)).__name__} keeps no 'exp_avg_sq' for "
                    f"{name!r} (factored or non-Adam optimizer)"
                )
            return f"the optimizer has no state for {name!r} yet (it has not taken a step)"
        step = _step_count(state)
        if not step:
            return f"the optimizer state of {name!r} is at step 0 (no bias-corrected second moment yet)"
        if "betas" not in groups[id(p)] or "eps" not in groups[id(p)]:
            return f"the parameter group of {name!r} has no 'betas'/'eps' (not an Adam-family optimizer)"
    return None
