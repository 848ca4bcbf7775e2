"""The objective of paper Eqs. 9-10: normalised performance, its spread across tasks, and the entropy.

Conventions used throughout (see ``docs/solvers.md``):

- ``S`` is n_tasks x n_domains, ``S[i, j] > 0`` meaning that up-weighting domain j helps task i.
- ``A = S / (max_j |S_ij| + 1e-8)`` row by row (:func:`normalised_influence`), so ``P_hat = A @ w``
  (Eq. 9). The solvers only ever see ``A``; that makes every answer invariant to a positive
  rescaling of ``S``.
- The Pareto constraint ``S w >= S w_ref`` is checked in normalised units, ``A w >= A w_ref``;
  the slack reported is ``min_i (A w - A w_ref)_i``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import entr

NORMALISATION_EPS = 1e-8
"""The epsilon of paper Eq. 9."""

LOG_FLOOR = 1e-12
"""Below this weight ``w log w`` is continued along its tangent, so ``log 0`` never occurs."""


def task_scale(S: np.ndarray) -> np.ndarray:
    """The per-task normaliser of Eq. 9, ``max_j |S_ij| + 1e-8``.

    The paper divides by ``max_j S_ij``; with every entry of a row negative that flips the sign
    of the row, so the absolute value is used instead.
    """
    return np.max(np.abs(S), axis=1) + NORMALISATION_EPS


def normalised_influence(S: ArrayLike) -> np.ndarray:
    """``A = S / (max_j |S_ij| + 1e-8)`` row by row, the matrix of Eq. 9 (``P_hat = A w``)."""
    S = np.asarray(S, dtype=np.float64)
    return S / task_scale(S)[:, None]


def normalised_performance(S: ArrayLike, w: ArrayLike) -> np.ndarray:
    """Paper Eq. 9: ``P_hat_i = (S w)_i / (max_j |S_ij| + 1e-8)``.

    ``w`` may be one mixture, shape (m,), giving (n,), or a stack of mixtures, shape (N, m),
    giving (N, n).
    """
    return np.asarray(w, dtype=np.float64) @ normalised_influence(S).T


def centred(A: np.ndarray) -> np.ndarray:
    """``A`` minus its column means, so that ``centred(A) @ w = P_hat - mean(P_hat)``.

    Centring the matrix rather than ``P_hat`` keeps the std and its gradient accurate when the
    tasks are nearly alike: ``P_hat - mean(P_hat)`` would leave a rounding residue ~1e-16 in
    the common direction, which the gradient divides by the (tiny) std.
    """
    return A - A.mean(axis=0)


def std_and_grad(Ac: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Population std of ``P_hat`` and its gradient in ``w``, from the centred matrix ``Ac``.

    At the kink (all tasks equal) the gradient is taken as zero.
    """
    centred_gains = Ac @ w
    std = float(np.sqrt(np.mean(centred_gains**2)))
    if std == 0.0:
        return 0.0, np.zeros(Ac.shape[1])
    return std, Ac.T @ centred_gains / (centred_gains.size * std)


def neg_entropy_smooth(w: np.ndarray) -> tuple[float, np.ndarray]:
    """``sum_j w_j log w_j`` and its gradient, continued along the tangent below ``LOG_FLOOR``.

    The continuation keeps value and gradient continuous (C1) and finite at ``w_j = 0``,
    where the true gradient is ``-inf``; above the floor it is exact.
    """
    small = w < LOG_FLOOR
    logw = np.log(np.where(small, LOG_FLOOR, w))
    tangent = LOG_FLOOR * math.log(LOG_FLOOR) + (math.log(LOG_FLOOR) + 1.0) * (w - LOG_FLOOR)
    value = np.where(small, tangent, w * logw)
    return float(value.sum()), logw + 1.0


def objective_terms(S: ArrayLike, w: ArrayLike, *, prior: ArrayLike | None = None, alpha: float = 1.0,
                    beta: float = 1.0, gamma: float = 1.0) -> dict:
    """The terms of paper Eq. 10 at mixture ``w``.

    Returns ``std`` (population std of ``P_hat``), ``gain`` (``sum_i P_hat_i``), ``entropy``
    (``H(w) = -sum_j w_j log w_j``, with ``0 log 0 = 0``) and
    ``objective = alpha * std - beta * gain - gamma * entropy`` (lower is better). With
    ``prior`` it also returns ``pareto_slack = min_i (P_hat(w) - P_hat(prior))_i``, which is
    ``>= 0`` exactly when no task is worse off than under the prior.
    """
    A = normalised_influence(S)
    w = np.asarray(w, dtype=np.float64)
    p = A @ w
    std = std_and_grad(centred(A), w)[0]
    gain = float(p.sum())
    entropy = float(entr(w).sum())
    out = {
        "std": std,
        "gain": gain,
        "entropy": entropy,
        "objective": alpha * std - beta * gain - gamma * entropy,
    }
    if prior is not None:
        out["pareto_slack"] = float(np.min(p - A @ np.asarray(prior, dtype=np.float64)))
    return out
