"""Uncertainty-aware transforms of the influence matrix, applied before the TiKMiX solvers.

Pure numpy (no torch): the inputs are ``S`` and its standard errors from
:class:`tikmix_hf.influence.InfluenceResult` (``docs/uncertainty.md`` derives them).

- :func:`shrink_influence`: soft threshold ``sign(S) max(|S| - z SE, 0)``; entries that are not
  ``z`` standard errors away from zero become exactly zero, so they can neither move weight nor bind
  the Pareto constraint ``S w >= S w_prev``.
- :class:`PrecisionSmoother`: a decayed precision-weighted (``1/SE^2``) average of ``S`` over stages,
  whose state is JSON (it checkpoints and resumes exactly).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["PrecisionSmoother", "shrink_influence"]

# Standard errors below this fraction of |S| (or below _SE_ABS) are treated as this small when
# turned into precisions, so that 1/SE^2 stays finite for noise-free entries.
_SE_REL_FLOOR = 1e-12
_SE_ABS_FLOOR = 1e-100


def shrink_influence(scores: ArrayLike, stderr: ArrayLike, z: float) -> np.ndarray:
    """``sign(S) * max(|S| - z * SE, 0)`` elementwise, a new float64 array.

    Args:
        scores: ``(n, m)`` influence matrix ``S``.
        stderr: ``(n, m)`` standard errors, or ``None``. A ``nan`` (or ``inf``) standard error means the
            entry's noise is unknown (fewer than two probe batches); with ``z > 0`` it is treated as
            infinite and the entry becomes ``0``: unknown is not significant.
        z: the threshold in standard errors, ``>= 0``. ``z == 0`` returns an exact copy of ``S``
            (``stderr`` is not even read), which is the paper's plain behaviour.

    The soft threshold (rather than a hard test that keeps surviving entries whole) is continuous in
    ``S`` and moves every surviving entry toward zero by its own uncertainty: for a positive entry
    ``S - z SE`` is the lower confidence bound, for a negative one ``S + z SE`` the upper one, i.e.
    each entry is replaced by the end of its confidence interval nearest to zero.
    """
    S = np.array(scores, dtype=np.float64, copy=True)
    z = float(z)
    if not math.isfinite(z) or z < 0:
        raise ValueError(f"z must be a finite number >= 0 (standard errors), got {z!r}")
    if z == 0:
        return S
    if stderr is None:
        raise ValueError("shrinking needs the standard errors of S (stderr is None)")
    se = np.asarray(stderr, dtype=np.float64)
    if se.shape != S.shape:
        raise ValueError(f"stderr has shape {se.shape}, the scores {S.shape}")
    if (se < 0).any():
        raise ValueError("standard errors must be >= 0")
    se = np.where(np.isfinite(se), se, np.inf)
    with np.errstate(invalid="ignore"):
        magnitude = np.abs(S) - z * se
    return np.sign(S) * np.where(magnitude > 0, magnitude, 0.0)


class PrecisionSmoother:
    """Decayed precision-weighted average of ``S`` over stages.

    With stage estimates ``S_k`` (standard errors ``SE_k``) and decay ``lam`` in ``[0, 1)``, after stage
    ``K``::

        a_k = lam^(K-k) / SE_k^2,    S_bar = sum_k a_k S_k / sum_k a_k,
        SE_bar = sqrt(sum_k a_k^2 SE_k^2) / sum_k a_k

    (``SE_bar`` is exact for independent stage estimates of a fixed matrix; the decay is the
    allowance for the matrix drifting as training moves). It is updated recursively from three
    accumulators ``A = sum a_k``, ``B = sum a_k S_k``, ``C = sum a_k^2 SE_k^2``::

        A <- lam A + 1/SE^2,   B <- lam B + S/SE^2,   C <- lam^2 C + 1/SE^2

    ``lam = 0`` is no smoothing (the current stage alone). An entry whose standard error is unknown
    (``nan``) enters with zero precision: it keeps the previous smoothed value (decayed weight), or,
    with no history, the raw value with a ``nan`` standard error.

    The state (:meth:`state_dict`) is plain JSON: lists of floats, names and a stage count.
    """

    def __init__(self, decay: float) -> None:
        decay = float(decay)
        if not (0 <= decay < 1):
            raise ValueError(f"decay must lie in [0, 1), got {decay!r}")
        self.decay = decay
        self.reset()

    def reset(self) -> None:
        # The accumulators of the docstring and the names they belong to; empty before the first stage.
        self.A = self.B = self.C = np.zeros(0)
        self.tasks: list[str] = []
        self.domains: list[str] = []
        self.stages = 0

    def update(self, scores: ArrayLike, stderr: ArrayLike | None, tasks: Iterable[str],
               domains: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Fold in one stage; returns ``(S_bar, SE_bar)``. New task/domain names restart the average."""
        S = np.asarray(scores, dtype=np.float64)
        se = np.full_like(S, np.nan) if stderr is None else np.asarray(stderr, dtype=np.float64)
        tasks, domains = list(tasks), list(domains)
        if self.stages == 0 or self.tasks != tasks or self.domains != domains or self.A.shape != S.shape:
            self.reset()
            self.tasks, self.domains = tasks, domains
            self.A, self.B, self.C = (np.zeros_like(S) for _ in range(3))
        known = np.isfinite(se)
        floor = np.maximum(_SE_REL_FLOOR * np.abs(S), _SE_ABS_FLOOR)
        precision = np.where(known, 1.0 / np.maximum(np.where(known, se, 1.0), floor) ** 2, 0.0)
        lam = self.decay
        self.A = lam * self.A + precision
        self.B = lam * self.B + precision * np.where(known, S, 0.0)
        self.C = lam * lam * self.C + precision
        self.stages += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            smoothed = np.where(self.A > 0, self.B / self.A, S)
            smoothed_se = np.where(self.A > 0, np.sqrt(self.C) / self.A, np.nan)
        return smoothed, smoothed_se

    def state_dict(self) -> dict:
        if self.stages == 0:
            return {"decay": self.decay, "stages": 0}
        return {
            "decay": self.decay, "stages": self.stages, "tasks": list(self.tasks), "domains": list(self.domains),
            "A": self.A.tolist(), "B": self.B.tolist(), "C": self.C.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        if not state or not state.get("stages"):
            return
        self.stages = int(state["stages"])
        self.tasks, self.domains = list(state["tasks"]), list(state["domains"])
        self.A, self.B, self.C = (np.asarray(state[k], dtype=np.float64) for k in ("A", "B", "C"))
