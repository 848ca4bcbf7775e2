"""What both TiKMiX solvers share: input checks, the objective of paper Eqs. 9-10, the optional
guards turned into per-domain bounds, the projection onto the bounded simplex, and the result.

Conventions used throughout (see ``docs/solvers.md``):

- ``S`` is n_tasks x n_domains, ``S[i, j] > 0`` meaning that up-weighting domain j helps task i.
- ``A = S / (max_j |S_ij| + 1e-8)`` row by row, so ``P_hat = A @ w`` (Eq. 9). The solvers only
  ever see ``A``; that makes every answer invariant to a positive rescaling of ``S``.
- The Pareto constraint ``S w >= S w_ref`` is checked in normalised units, ``A w >= A w_ref``;
  the slack reported is ``min_i (A w - A w_ref)_i``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from scipy.special import entr

from .._io import jsonable
from ..simplex import SIMPLEX_TOL

NORMALISATION_EPS = 1e-8
"""The epsilon of paper Eq. 9."""

LOG_FLOOR = 1e-12
"""Below this weight ``w log w`` is continued along its tangent, so ``log 0`` never occurs."""

PRIOR_SUM_TOL = SIMPLEX_TOL
"""How far from 1 the prior may sum before it is refused (it is then renormalised exactly)."""

PARETO_TOL = 1e-9
"""Largest normalised Pareto violation an answer may have (``min_i (A w - A w_ref)_i >= -tol``)."""

BOUND_TOL = 1e-12
"""Slack allowed on the per-domain bounds and on ``sum w = 1`` after cleanup."""

STATUSES = ("converged", "restarted", "fallback")


@dataclass
class SolverResult:
    """The answer of :func:`solve_direct` or :func:`solve_surrogate`.

    ``status`` is one of:

    - ``"converged"``: the first attempt succeeded (TiKMiX-D: SLSQP from the uniform start;
      TiKMiX-M: the surrogate's pick was used).
    - ``"restarted"``: TiKMiX-D only; the uniform start failed and the restart from the prior
      succeeded.
    - ``"fallback"``: the optimiser's answer was not used. TiKMiX-D keeps the prior (or, when
      the prior breaks ``floor``/``upper``, its projection onto those guards). TiKMiX-M returns
      what ``details["fallback_to"]`` names: ``"prior"``, ``"direct"`` or ``"best_candidate"``.

    ``message`` says in words what happened and why. ``terms`` holds the objective terms of
    Eq. 10 at the answer and at the prior (see :func:`objective_terms`).
    """

    weights: np.ndarray
    status: str
    message: str
    terms: dict
    domains: list[str] | None = None
    tasks: list[str] | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready copy: lists, floats, ints, strings, ``None`` (NaN and inf become ``None``)."""
        return {
            "weights": jsonable(self.weights),
            "status": self.status,
            "message": self.message,
            "terms": jsonable(self.terms),
            "domains": None if self.domains is None else list(self.domains),
            "tasks": None if self.tasks is None else list(self.tasks),
            "details": jsonable(self.details),
        }

    def as_mapping(self) -> dict[str, float]:
        """``{domain: weight}``; needs the result to carry domain names."""
        if self.domains is None:
            raise ValueError(
                "as_mapping() needs domain names, but this result has domains=None; "
                "pass domains=[...] to the solver, or use .weights"
            )
        return {name: float(w) for name, w in zip(self.domains, self.weights)}


def one_blas_thread(func):
    """Run ``func`` with BLAS/LAPACK limited to one thread (through threadpoolctl, if installed).

    The solvers' matrices have tens of rows and columns, where a BLAS thread pool costs more than
    it saves: SLSQP, which calls LAPACK at every iteration, ran 5-50x slower with OpenBLAS's two
    threads than with one on a busy 2-core machine (threads spinning against other processes).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # a dependency of scikit-learn, so normally present
            limit = nullcontext()
        else:
            limit = threadpool_limits(limits=1, user_api="blas")
        with limit:
            return func(*args, **kwargs)

    return wrapper


# ----------------------------------------------------------------------------------------------
# Eq. 9 and Eq. 10


def task_scale(S: np.ndarray) -> np.ndarray:
    """The per-task normaliser of Eq. 9, ``max_j |S_ij| + 1e-8``.

    The paper divides by ``max_j S_ij``; with every entry of a row negative that flips the sign
    of the row, so the absolute value is used instead.
    """
    return np.max(np.abs(S), axis=1) + NORMALISATION_EPS


def normalised_performance(S, w) -> np.ndarray:
    """Paper Eq. 9: ``P_hat_i = (S w)_i / (max_j |S_ij| + 1e-8)``.

    ``w`` may be one mixture, shape (m,), giving (n,), or a stack of mixtures, shape (N, m),
    giving (N, n).
    """
    S = np.asarray(S, dtype=np.float64)
    A = S / task_scale(S)[:, None]
    return np.asarray(w, dtype=np.float64) @ A.T


def _centred(A: np.ndarray) -> np.ndarray:
    """``A`` minus its column means, so that ``_centred(A) @ w = P_hat - mean(P_hat)``.

    Centring the matrix rather than ``P_hat`` keeps the std and its gradient accurate when the
    tasks are nearly alike: ``P_hat - mean(P_hat)`` would leave a rounding residue ~1e-16 in
    the common direction, which the gradient divides by the (tiny) std.
    """
    return A - A.mean(axis=0)


def _std_and_grad(Ac: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Population std of ``P_hat`` and its gradient in ``w``, from the centred matrix ``Ac``.

    At the kink (all tasks equal) the gradient is taken as zero.
    """
    centred = Ac @ w
    std = float(np.sqrt(np.mean(centred**2)))
    if std == 0.0:
        return 0.0, np.zeros(Ac.shape[1])
    return std, Ac.T @ centred / (centred.size * std)


def _neg_entropy_smooth(w: np.ndarray) -> tuple[float, np.ndarray]:
    """``sum_j w_j log w_j`` and its gradient, continued along the tangent below ``LOG_FLOOR``.

    The continuation keeps value and gradient continuous (C1) and finite at ``w_j = 0``,
    where the true gradient is ``-inf``; above the floor it is exact.
    """
    small = w < LOG_FLOOR
    logw = np.log(np.where(small, LOG_FLOOR, w))
    tangent = LOG_FLOOR * math.log(LOG_FLOOR) + (math.log(LOG_FLOOR) + 1.0) * (w - LOG_FLOOR)
    value = np.where(small, tangent, w * logw)
    return float(value.sum()), logw + 1.0


def objective_terms(S, w, *, prior=None, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0) -> dict:
    """The terms of paper Eq. 10 at mixture ``w``.

    Returns ``std`` (population std of ``P_hat``), ``gain`` (``sum_i P_hat_i``), ``entropy``
    (``H(w) = -sum_j w_j log w_j``, with ``0 log 0 = 0``) and
    ``objective = alpha * std - beta * gain - gamma * entropy`` (lower is better). With
    ``prior`` it also returns ``pareto_slack = min_i (P_hat(w) - P_hat(prior))_i``, which is
    ``>= 0`` exactly when no task is worse off than under the prior.
    """
    S = np.asarray(S, dtype=np.float64)
    A = S / task_scale(S)[:, None]
    w = np.asarray(w, dtype=np.float64)
    p = A @ w
    std = _std_and_grad(_centred(A), w)[0]
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


# ----------------------------------------------------------------------------------------------
# Input checks


def format_value(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_influence(S) -> np.ndarray:
    try:
        S = np.asarray(S, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"S must be a numeric n_tasks x n_domains array; could not convert it ({exc})"
        ) from None
    if S.ndim != 2:
        hint = " (for a single task use S.reshape(1, -1))" if S.ndim == 1 else ""
        raise ValueError(f"S must be 2-D, n_tasks x n_domains; got shape {S.shape}{hint}")
    n, m = S.shape
    if n < 1:
        raise ValueError(f"S must have at least one task (row); got shape {S.shape}")
    if m < 2:
        raise ValueError(
            f"S must have at least 2 domains (columns) to mix; got shape {S.shape}. "
            "With one domain there is nothing to solve: its weight is 1"
        )
    bad = ~np.isfinite(S)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"S must be finite; S[{i}, {j}] = {S[i, j]} ({int(bad.sum())} non-finite entries). "
            "Recompute the influence matrix or drop the offending task/domain"
        )
    return S


def check_names(names, count: int, arg: str, what: str) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"{arg} must be a list of {count} {what} names; got {format_value(names)}")
    names = list(names)
    if len(names) != count:
        raise ValueError(
            f"{arg} has {len(names)} names but S has {count} {what}s; "
            f"pass exactly one name per {what}, in the order of S"
        )
    if not all(isinstance(x, str) for x in names):
        raise ValueError(f"{arg} must contain strings; got {format_value(names)}")
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise ValueError(f"{arg} must not repeat names; repeated: {dup}")
    return names


def check_mixture(w, m: int, arg: str, domains: list[str] | None) -> np.ndarray:
    """A mixture argument (array or mapping domain -> weight) as a float64 vector on the simplex."""
    if isinstance(w, Mapping):
        if domains is None:
            raise ValueError(
                f"{arg} was given as a mapping, which needs domains=[...] to fix the column order of S"
            )
        missing = [d for d in domains if d not in w]
        extra = [k for k in w if k not in domains]
        if missing or extra:
            raise ValueError(
                f"{arg} keys must match domains exactly; missing {missing}, unknown {extra}"
            )
        w = [w[d] for d in domains]
    try:
        w = np.asarray(w, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{arg} must be a numeric vector of {m} weights; could not convert it ({exc})"
        ) from None
    if w.shape != (m,):
        raise ValueError(
            f"{arg} must have shape ({m},), one weight per domain (column of S); got shape {w.shape}"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{arg} must be finite; got {format_value(w.tolist())}")
    if np.any(w < 0):
        j = int(np.argmin(w))
        raise ValueError(f"{arg} must be non-negative; {arg}[{j}] = {w[j]}. Pass a mixture on the simplex")
    total = float(w.sum())
    if abs(total - 1.0) > PRIOR_SUM_TOL:
        raise ValueError(
            f"{arg} must sum to 1 (within {PRIOR_SUM_TOL:g}); it sums to {total!r}. "
            f"Divide it by its sum first"
        )
    return w / total


def check_coefficient(value, arg: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{arg} must be a non-negative number; got {format_value(value)}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{arg} must be a finite non-negative number; got {value!r}")
    return value


def _per_domain(value, m: int, arg: str) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{arg} must be a number or one number per domain; got {format_value(value)}") from None
    if arr.ndim == 0:
        arr = np.full(m, float(arr))
    if arr.shape != (m,):
        raise ValueError(
            f"{arg} must be a scalar or have shape ({m},), one per domain; got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{arg} must be finite and non-negative; got {format_value(arr.tolist())}")
    return arr


# ----------------------------------------------------------------------------------------------
# Guards and the bounded simplex


def project_bounded_simplex(X, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``X`` onto ``{w : sum w = 1, lo <= w <= hi}``.

    The answer is ``clip(x - tau, lo, hi)`` for the ``tau`` at which it sums to 1. That sum is
    piecewise linear and non-increasing in ``tau``, with a breakpoint at every ``x_j - hi_j``
    (slope drops by 1) and ``x_j - lo_j`` (slope rises by 1); walking the sorted breakpoints
    gives the sum at each of them, and the crossing of 1 is interpolated exactly.
    Needs ``sum lo <= 1 <= sum hi``.
    """
    X = np.asarray(X, dtype=np.float64)
    single = X.ndim == 1
    X = np.atleast_2d(X)
    n, m = X.shape
    breaks = np.concatenate([X - hi, X - lo], axis=1)
    order = np.argsort(breaks, axis=1, kind="stable")
    breaks = np.take_along_axis(breaks, order, axis=1)
    slope = np.cumsum(np.concatenate([-np.ones(m), np.ones(m)])[order], axis=1)  # slope after each break
    sums = np.empty_like(breaks)
    sums[:, 0] = hi.sum()
    np.cumsum(slope[:, :-1] * np.diff(breaks, axis=1), axis=1, out=sums[:, 1:])
    sums[:, 1:] += hi.sum()
    k = np.clip((sums >= 1.0).sum(axis=1) - 1, 0, 2 * m - 2)
    rows = np.arange(n)
    s_k, c_k, t_k = sums[rows, k], slope[rows, k], breaks[rows, k]
    tau = t_k + np.where(c_k < 0, (s_k - 1.0) / np.where(c_k < 0, -c_k, 1.0), 0.0)
    w = np.clip(X - tau[:, None], lo, hi)
    # The walk is exact up to rounding; put the last ulps on the free coordinates.
    free = (w > lo) & (w < hi)
    resid = (1.0 - w.sum(axis=1)) / np.maximum(free.sum(axis=1), 1)
    w = np.clip(np.where(free, w + resid[:, None], w), lo, hi)
    return w[0] if single else w


@dataclass
class Problem:
    """One validated TiKMiX problem, as both solvers see it."""

    S: np.ndarray
    A: np.ndarray
    prior: np.ndarray
    reference: np.ndarray  # the Pareto reference and the fallback answer
    lo: np.ndarray
    hi: np.ndarray
    alpha: float
    beta: float
    gamma: float
    pareto: bool
    domains: list[str] | None
    tasks: list[str] | None
    guards: dict
    notes: list[str]
    conflict: str | None  # the guards cannot be met together; nothing is feasible

    @property
    def m(self) -> int:
        return self.S.shape[1]

    @property
    def has_information(self) -> bool:
        return bool(np.any(self.S))

    @cached_property
    def Ac(self) -> np.ndarray:
        return _centred(self.A)

    def objective(self, w: np.ndarray, with_std: bool = True) -> tuple[float, np.ndarray]:
        """Eq. 10 and its gradient, with the smooth entropy continuation (for SLSQP).

        ``with_std=False`` drops the std term, for use where it is constrained to be zero.
        """
        p = self.A @ w
        negent, dnegent = _neg_entropy_smooth(w)
        value = -self.beta * p.sum() + self.gamma * negent
        grad = -self.beta * self.A.sum(axis=0) + self.gamma * dnegent
        if with_std:
            std, dstd = _std_and_grad(self.Ac, w)
            value += self.alpha * std
            grad = grad + self.alpha * dstd
        return float(value), grad

    def exact_objective(self, w: np.ndarray) -> float:
        std = _std_and_grad(self.Ac, w)[0]
        return float(self.alpha * std - self.beta * (self.A @ w).sum() - self.gamma * entr(w).sum())

    def pareto_slack(self, w: np.ndarray) -> float:
        """``min_i (A w - A w_ref)_i``, the normalised Pareto slack (vectorised over rows of ``w``)."""
        return np.min(np.asarray(w) @ self.A.T - self.A @ self.reference, axis=-1)

    def violation(self, w: np.ndarray) -> str | None:
        """Why ``w`` is not an acceptable answer, or ``None``."""
        if not np.all(np.isfinite(w)):
            return "non-finite weights"
        if abs(w.sum() - 1.0) > BOUND_TOL:
            return f"weights sum to {w.sum()!r}"
        if np.any(w < self.lo - BOUND_TOL) or np.any(w > self.hi + BOUND_TOL):
            return "a weight is outside its bounds"
        if self.pareto:
            slack = float(self.pareto_slack(w))
            if slack < -PARETO_TOL:
                return f"Pareto constraint violated by {-slack:.3g} (normalised)"
        return None

    def terms(self, answer: np.ndarray) -> dict:
        coef = dict(alpha=self.alpha, beta=self.beta, gamma=self.gamma)
        out = {
            "answer": objective_terms(self.S, answer, prior=self.reference, **coef),
            "prior": objective_terms(self.S, self.prior, prior=self.reference, **coef),
        }
        if not np.array_equal(self.reference, self.prior):
            out["reference"] = objective_terms(self.S, self.reference, prior=self.reference, **coef)
        return out

    def result(self, weights: np.ndarray, status: str, message: str, details: dict) -> SolverResult:
        assert status in STATUSES
        details = {
            **details,
            "pareto": self.pareto,
            "pareto_reference": "prior" if np.array_equal(self.reference, self.prior)
            else "prior projected onto the floor/upper guards",
            "guards": self.guards,
            "notes": list(self.notes),
        }
        return SolverResult(
            weights=np.array(weights, dtype=np.float64),
            status=status,
            message=message,
            terms=self.terms(weights),
            domains=self.domains,
            tasks=self.tasks,
            details=details,
        )


def build_problem(
    S, prior, *, alpha, beta, gamma, pareto, floor, max_change, upper, domains, tasks
) -> Problem:
    """Validate the inputs shared by both solvers and turn the guards into bounds.

    Guards (all optional) become per-domain bounds ``lo <= w <= hi``:
    ``floor`` gives ``w_j >= floor_j``, ``upper`` gives ``w_j <= upper_j`` and ``max_change``
    gives ``|w_j - prior_j| <= max_change_j`` (a per-domain, L-infinity trust region; it stays
    a plain bound, which SLSQP enforces exactly). Guard settings that contradict each other
    whatever the prior raise ``ValueError``. When they contradict only this prior (a floor out
    of reach within ``max_change``) ``conflict`` says so and the solvers keep the prior. When
    the prior breaks ``floor``/``upper`` but something satisfies them, the Pareto reference
    (and fallback answer) is the prior's Euclidean projection onto the guards.
    """
    S = check_influence(S)
    n, m = S.shape
    domains = check_names(domains, m, "domains", "domain")
    tasks = check_names(tasks, n, "tasks", "task")
    prior = check_mixture(prior, m, "prior", domains)
    alpha = check_coefficient(alpha, "alpha")
    beta = check_coefficient(beta, "beta")
    gamma = check_coefficient(gamma, "gamma")
    if not isinstance(pareto, (bool, np.bool_)):
        raise ValueError(f"pareto must be True or False; got {format_value(pareto)}")

    floor_a = _per_domain(floor, m, "floor")
    upper_a = _per_domain(upper, m, "upper")
    change_a = _per_domain(max_change, m, "max_change")
    lo = np.zeros(m) if floor_a is None else floor_a.copy()
    hi = np.ones(m) if upper_a is None else np.minimum(upper_a, 1.0)
    if floor_a is not None and floor_a.sum() > 1.0 + BOUND_TOL:
        raise ValueError(
            f"floor sums to {floor_a.sum():.6g} > 1 over {m} domains, so no mixture can meet it; "
            f"lower the floor (at most {1.0 / m:.6g} each for a scalar floor)"
        )
    if upper_a is not None and hi.sum() < 1.0 - BOUND_TOL:
        raise ValueError(
            f"upper sums to {hi.sum():.6g} < 1 over {m} domains, so no mixture can meet it; "
            "raise the upper bounds"
        )
    if np.any(lo > hi):
        j = int(np.argmax(lo - hi))
        raise ValueError(
            f"floor[{j}] = {lo[j]:.6g} exceeds upper[{j}] = {hi[j]:.6g}"
            + (f" (domain {domains[j]!r})" if domains else "")
            + "; make floor <= upper for every domain"
        )
    guards = {
        "floor": None if floor_a is None else floor_a,
        "upper": None if upper_a is None else upper_a,
        "max_change": None if change_a is None else change_a,
    }

    notes: list[str] = []
    conflict = None
    if change_a is not None:
        guard_lo, guard_hi = lo, hi
        lo = np.maximum(guard_lo, prior - change_a)
        hi = np.minimum(guard_hi, prior + change_a)
        if np.any(lo > hi + BOUND_TOL):
            j = int(np.argmax(lo - hi))
            name = f" ({domains[j]!r})" if domains else ""
            conflict = (
                f"the guards cannot be met from this prior: floor/upper put domain {j}{name} in "
                f"[{guard_lo[j]:.6g}, {guard_hi[j]:.6g}], but max_change = {change_a[j]:.6g} keeps "
                f"it within [{prior[j] - change_a[j]:.6g}, {prior[j] + change_a[j]:.6g}] of its "
                f"prior weight {prior[j]:.6g}"
            )
        elif lo.sum() > 1.0 + BOUND_TOL or hi.sum() < 1.0 - BOUND_TOL:
            conflict = (
                "the guards cannot be met from this prior: within max_change of the prior the "
                f"floor/upper bounds allow totals in [{lo.sum():.6g}, {hi.sum():.6g}], which excludes 1"
            )
        hi = np.maximum(hi, lo)

    reference = prior
    if conflict is None and (np.any(prior < lo - BOUND_TOL) or np.any(prior > hi + BOUND_TOL)):
        reference = project_bounded_simplex(prior, lo, hi)
        notes.append(
            "the prior breaks the floor/upper guards, so the Pareto constraint and the fallback "
            "use its projection onto them"
        )
    A = S / task_scale(S)[:, None]
    return Problem(
        S=S, A=A, prior=prior, reference=reference, lo=lo, hi=hi, alpha=alpha, beta=beta,
        gamma=gamma, pareto=bool(pareto), domains=domains, tasks=tasks, guards=guards,
        notes=notes, conflict=conflict,
    )
