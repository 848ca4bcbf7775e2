"""One TiKMiX problem as every solver sees it: the checked inputs, the guards turned into per-domain
bounds, the Pareto reference, and the objective of Eq. 10 with its gradient (for SLSQP)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.special import entr

from ..validation import check_mixture, format_value, project_bounded_simplex
from .checks import check_coefficient, check_influence, check_names, check_per_domain
from .objective import centred, neg_entropy_smooth, normalised_influence, objective_terms, std_and_grad
from .result import STATUSES, SolverResult

PARETO_TOL = 1e-9
"""Largest normalised Pareto violation an answer may have (``min_i (A w - A w_ref)_i >= -tol``)."""

BOUND_TOL = 1e-12
"""Slack allowed on the per-domain bounds and on ``sum w = 1`` after cleanup."""


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
        return centred(self.A)

    def objective(self, w: np.ndarray, with_std: bool = True) -> tuple[float, np.ndarray]:
        """Eq. 10 and its gradient, with the smooth entropy continuation (for SLSQP).

        ``with_std=False`` drops the std term, for use where it is constrained to be zero.
        """
        p = self.A @ w
        negent, dnegent = neg_entropy_smooth(w)
        value = -self.beta * p.sum() + self.gamma * negent
        grad = -self.beta * self.A.sum(axis=0) + self.gamma * dnegent
        if with_std:
            std, dstd = std_and_grad(self.Ac, w)
            value += self.alpha * std
            grad = grad + self.alpha * dstd
        return float(value), grad

    def exact_objective(self, w: np.ndarray) -> float:
        std = std_and_grad(self.Ac, w)[0]
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
    prior = check_mixture(prior, "prior", m, domains)
    alpha = check_coefficient(alpha, "alpha")
    beta = check_coefficient(beta, "beta")
    gamma = check_coefficient(gamma, "gamma")
    if not isinstance(pareto, (bool, np.bool_)):
        raise ValueError(f"pareto must be True or False; got {format_value(pareto)}")

    floor_a = check_per_domain(floor, m, "floor")
    upper_a = check_per_domain(upper, m, "upper")
    change_a = check_per_domain(max_change, m, "max_change")
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
    A = normalised_influence(S)
    return Problem(
        S=S, A=A, prior=prior, reference=reference, lo=lo, hi=hi, alpha=alpha, beta=beta,
        gamma=gamma, pareto=bool(pareto), domains=domains, tasks=tasks, guards=guards,
        notes=notes, conflict=conflict,
    )
