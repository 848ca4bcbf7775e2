"""What one Group Influence measurement returns (:class:`InfluenceResult`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .._io import jsonable

#: Fields that stay in memory only: the names are long lists, the gradients are tensors.
_NOT_SAVED = ("parameter_names", "domain_gradients")


@dataclasses.dataclass
class InfluenceResult:
    """What :func:`group_influence` measured.

    ``scores[i, j]`` is ``S_ij`` of paper Eq. 8 for task ``task_names[i]`` and domain
    ``domain_names[j]``; positive means up-weighting the domain lowers the task's loss.
    """

    scores: np.ndarray
    task_names: list[str]
    domain_names: list[str]
    preconditioner: str
    requested_preconditioner: str
    preconditioner_fallback: str | None
    damping: float | None
    projection_dim: int | None
    seed: int
    num_parameters: int
    domain_tokens: dict[str, int]
    task_tokens: dict[str, int]
    domain_losses: dict[str, float]
    task_losses: dict[str, float]
    seconds: float
    peak_memory_bytes: int
    buffer_bytes: int
    buffer_dtype: str
    memory_measure: str
    world_size: int
    parameter_names: list[str] = dataclasses.field(repr=False)
    domain_gradients: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    """``(m, P)``: the preconditioned domain gradients ``P^{-1} g_j`` (``keep_domain_gradients`` only)."""
    stderr: np.ndarray | None = None
    """``(n, m)`` standard error of every ``S_ij`` over probe batches (``docs/uncertainty.md``): the
    ratio estimator's, with batches as the sampling unit. ``nan`` for a domain with fewer than two
    probe batches; ``None`` when it could not be measured (``projection_dim``, or
    ``keep_domain_gradients`` with ``diag_fisher``). See ``uncertainty_note``."""
    split_half: dict[str, float] | None = None
    """Per task: Spearman rank correlation over domains between ``S`` from the even and from the odd
    probe batches (global batch index within each domain); ``nan`` when undefined."""
    probe_batches: dict[str, int] | None = None
    """Probe micro-batches with at least one labelled target, per domain (the sampling units)."""
    uncertainty_note: str | None = None
    """Why ``stderr`` is ``None`` or holds ``nan`` entries; ``None`` when every entry is measured."""
    adaptive: dict | None = None
    """:func:`adaptive_group_influence` only: per domain the batches and tokens drawn, the final
    relative standard error and why drawing stopped."""
    window: dict | None = None
    """:class:`~tikmix_hf.influence.window.TrainingWindow` only: its training micro-batches, the sequences
    each domain contributed, the top-up probe tokens, and the seconds of its validation pass and hooks."""

    def to_dict(self) -> dict:
        """JSON-ready summary (lists, floats, ints, strings; ``nan`` as ``None``); the kept gradients are left out."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in _NOT_SAVED:
                continue
            out[f.name] = jsonable(getattr(self, f.name))
        out["has_domain_gradients"] = self.domain_gradients is not None
        return out
