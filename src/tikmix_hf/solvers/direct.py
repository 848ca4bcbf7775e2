"""TiKMiX-D with the paper's objective (Eqs. 9-11, ``--tikmix_objective paper``): the mixture that directly
optimises the normalised influence. The default objective is the trust region's (:mod:`.trust_region`)."""

from __future__ import annotations

import time

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize

from ..validation import project_bounded_simplex
from .problem import Problem, build_problem
from .result import SolverResult
from .threads import one_blas_thread

OBJECTIVE_RTOL = 1e-9
"""An answer whose objective exceeds the reference's by more than this (relative) is refused."""

KINK_STD = 1e-4
"""At an answer with ``std(P_hat)`` below this, the polish assumes all tasks equal (see ``_polish``)."""

ACTIVE_TOL = 1e-6
"""A bound or Pareto row closer than this at SLSQP's answer counts as active in the polish."""


@one_blas_thread
def solve_direct(
    S: ArrayLike,
    prior: ArrayLike,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    pareto: bool = True,
    floor: ArrayLike | None = None,
    max_change: ArrayLike | None = None,
    upper: ArrayLike | None = None,
    domains: list[str] | None = None,
    tasks: list[str] | None = None,
    tol: float = 1e-10,
    maxiter: int = 200,
) -> SolverResult:
    r"""TiKMiX-D with the paper's Eq. 10 objective (``--tikmix_objective paper``), not the default one.

    The default, ``--tikmix_objective trust_region``, is :func:`solve_trust_region`. This solver finds
    the mixture that best trades off the tasks' normalised gains (paper Eqs. 9-11).

    With ``P_hat = A w``, ``A_ij = S_ij / (max_j |S_ij| + 1e-8)`` (Eq. 9), it solves

    .. math::

        \min_w\ \alpha\,\mathrm{std}(\hat P) - \beta \sum_i \hat P_i - \gamma H(w),
        \quad H(w) = -\sum_j w_j \log w_j

    subject to ``sum w = 1``, ``w >= 0`` and, with ``pareto=True``, ``S w >= S prior`` (no task
    worse off than under the prior). ``std`` is the population std (ddof 0). The objective is
    convex, and strictly convex for ``gamma > 0``, so the answer is unique.

    Method: SLSQP with analytic gradients from the uniform mixture; if that fails, leaves a
    constraint violated or ends worse than the prior, SLSQP again from the prior; if that
    fails too, the prior is kept (``status="fallback"``), with the reasons in ``message``.
    The prior is always feasible, so the answer is never worse than the prior. Each accepted
    answer is cleaned up by projection onto the (bounded) simplex, re-checked, and refined by an
    active-set polish (``_polish``) where SLSQP stalls at the std's kink or at dependent
    constraints. Weights are accurate to about 1e-6 at the default ``tol``.

    Args:
        S: influence matrix, n_tasks x n_domains; ``S[i, j] > 0`` means domain j helps task i.
        prior: the current mixture (array, or mapping domain -> weight when ``domains`` is
            given); non-negative and summing to 1 within 1e-6.
        alpha, beta, gamma: weights of the std, gain and entropy terms (non-negative).
        pareto: impose ``S w >= S prior``.
        floor: optional lower bound per domain (scalar or array), ``w_j >= floor_j``.
        max_change: optional trust region per domain (scalar or array),
            ``|w_j - prior_j| <= max_change_j`` (L-infinity, so it stays a simple bound).
        upper: optional upper bound per domain (scalar or array), e.g. an epoch cap.
        domains, tasks: optional names of the columns and rows of ``S``.
        tol: SLSQP ``ftol``. maxiter: SLSQP iteration limit per attempt.

    Returns:
        :class:`SolverResult`; ``details`` holds the attempts (start, success, SLSQP message,
        iterations, evaluations), their totals and the seconds spent.

    Example:
        >>> import numpy as np
        >>> S = np.array([[1.0, 0.2, 0.1], [0.1, 0.8, 0.3]])
        >>> res = solve_direct(S, [1 / 3, 1 / 3, 1 / 3], domains=["code", "web", "law"])
        >>> res.status, round(float(res.weights.sum()), 12), list(res.as_mapping())
        ('converged', 1.0, ['code', 'web', 'law'])
    """
    start_time = time.perf_counter()
    problem = build_problem(
        S, prior, alpha=alpha, beta=beta, gamma=gamma, pareto=pareto, floor=floor,
        max_change=max_change, upper=upper, domains=domains, tasks=tasks,
    )
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"tol must be a positive number; got {tol!r}") from None
    if not tol > 0:
        raise ValueError(f"tol must be a positive number; got {tol!r}")
    if isinstance(maxiter, bool) or not isinstance(maxiter, (int, np.integer)) or maxiter < 0:
        raise ValueError(f"maxiter must be a non-negative integer; got {maxiter!r}")

    def finish(weights, status, message, attempts):
        details = {
            "solver": "direct",
            "attempts": attempts,
            "nit": sum(a["nit"] for a in attempts),
            "nfev": sum(a["nfev"] for a in attempts),
            "njev": sum(a["njev"] for a in attempts),
            "tol": tol,
            "maxiter": int(maxiter),
            "seconds": time.perf_counter() - start_time,
        }
        return problem.result(weights, status, message, details)

    if problem.conflict is not None:
        return finish(problem.prior, "fallback", f"Kept the prior: {problem.conflict}.", [])
    if not problem.has_information:
        return finish(
            problem.reference, "fallback",
            "Kept the prior: S is all zeros, so no domain is known to help or hurt any task.", [],
        )

    uniform = project_bounded_simplex(np.full(problem.m, 1.0 / problem.m), problem.lo, problem.hi)
    attempts = []
    for name, x0 in (("uniform", uniform), ("prior", problem.reference)):
        weights, attempt = _slsqp(problem, x0, name, tol, int(maxiter))
        attempts.append(attempt)
        if attempt["failure"] is None:
            weights = _polish(problem, weights, tol, int(maxiter), attempts)
            if name == "uniform":
                msg = f"SLSQP converged from the uniform start in {_iterations(attempt)}."
                return finish(weights, "converged", msg, attempts)
            msg = (
                f"SLSQP from the uniform start failed ({attempts[0]['failure']}); the restart "
                f"from the prior converged in {_iterations(attempt)}."
            )
            return finish(weights, "restarted", msg, attempts)
    msg = (
        f"Kept the prior: SLSQP failed from the uniform start ({attempts[0]['failure']}) and from "
        f"the prior ({attempts[1]['failure']})."
    )
    return finish(problem.reference, "fallback", msg, attempts)


def _polish(problem: Problem, weights: np.ndarray, tol: float, maxiter: int, attempts: list):
    """Re-solve with the constraints active at SLSQP's answer turned into equalities.

    SLSQP assumes a smooth objective and independent active constraints. Two common shapes of
    this problem break that and leave it short of the optimum (errors up to ~1e-2 in the
    weights were seen, reported as success):

    - ``std(P_hat)`` is a norm with a kink where all tasks are equal, and optima often sit on
      it (the std term pulls the tasks together);
    - ties make active constraints linearly dependent, e.g. a task row constant on the
      support of the prior, which together with ``sum w = 1`` pins a domain at zero.

    So: domains at a bound are fixed there; active Pareto rows, ``sum w = 1`` and, at the kink,
    ``P_hat_1 = ... = P_hat_n`` (std dropped, it is zero there) become equalities, reduced
    to an independent set by SVD; the rest stays as it was. The answer replaces SLSQP's only
    if it passes the same checks and is at least as good on the exact objective, so a wrong
    guess of the active set costs time, never quality.
    """
    lo, hi = problem.lo, problem.hi
    at_lo, at_hi = weights <= lo + ACTIVE_TOL, weights >= hi - ACTIVE_TOL
    free = ~(at_lo | at_hi)
    base = np.where(at_lo, lo, np.where(at_hi, hi, 0.0))

    rows, rhs = [np.ones((1, problem.m))], [np.ones(1)]
    kink = problem.alpha > 0 and np.std(problem.A @ weights) <= KINK_STD
    if kink:
        E = _equal_tasks_basis(problem.A)
        kink = E.shape[0] > 0  # one task, or all alike: the std is identically zero
        rows.append(E)
        rhs.append(np.zeros(E.shape[0]))
    P = problem.A[_distinct_rows(problem.A)] if problem.pareto else np.zeros((0, problem.m))
    ref = P @ problem.reference
    active = P @ weights - ref <= ACTIVE_TOL
    rows.append(P[active])
    rhs.append(ref[active])
    M, b = np.vstack(rows), np.concatenate(rhs)
    Mf, bf = M[:, free], b - M[:, ~free] @ base[~free]
    if Mf.shape[1] == 0:
        return weights
    u, sv, vt = np.linalg.svd(Mf, full_matrices=False)
    keep = sv > 1e-9 * sv.max()
    if keep.sum() >= Mf.shape[1]:  # the equalities alone fix the answer
        return weights
    Eq, eq_rhs = vt[keep], (u[:, keep].T @ bf) / sv[keep]
    Pin, pin_rhs = P[~active][:, free], ref[~active] - P[~active][:, ~free] @ base[~free]

    def embed(wf):
        x = base.copy()
        x[free] = wf
        return x

    def fun(wf):
        value, grad = problem.objective(embed(wf), with_std=not kink)
        return value, grad[free]

    constraints = [{"type": "eq", "fun": lambda wf: Eq @ wf - eq_rhs, "jac": lambda wf: Eq}]
    if Pin.shape[0]:
        constraints.append({"type": "ineq", "fun": lambda wf: Pin @ wf - pin_rhs, "jac": lambda wf: Pin})
    res = minimize(
        fun, weights[free], jac=True, method="SLSQP", bounds=list(zip(lo[free], hi[free])),
        constraints=constraints, options={"maxiter": maxiter, "ftol": tol},
    )
    res.x = embed(res.x) if np.all(np.isfinite(res.x)) else np.full(problem.m, np.nan)
    polished, attempt = _accept(problem, res, "active-set polish")
    if attempt["failure"] is None and problem.exact_objective(polished) > problem.exact_objective(weights):
        attempt["failure"] = "not better than the unpolished answer"
    attempt.update(used=attempt["failure"] is None, fixed=int((~free).sum()),
                   equalities=int(keep.sum()), kink=bool(kink))
    attempts.append(attempt)
    return polished if attempt["used"] else weights


def _distinct_rows(A: np.ndarray, tol: float = 1e-10) -> list[int]:
    """Indices of the rows of ``A`` that are non-zero and not repeats of an earlier row."""
    keep: list[int] = []
    for i, row in enumerate(A):
        if np.max(np.abs(row)) > tol and all(np.max(np.abs(row - A[k])) > tol for k in keep):
            keep.append(i)
    return keep


def _equal_tasks_basis(A: np.ndarray) -> np.ndarray:
    """Independent rows ``E`` with ``E w = 0`` exactly when every task has the same ``(A w)_i``."""
    D = A[:-1] - A[-1]
    if D.shape[0] == 0:
        return D
    _, sv, vt = np.linalg.svd(D, full_matrices=False)
    return vt[sv > 1e-7 * max(1.0, sv.max())]


def _iterations(attempt: dict) -> str:
    return f"{attempt['nit']} iteration" + ("" if attempt["nit"] == 1 else "s")


def _slsqp(problem: Problem, x0: np.ndarray, name: str, tol: float, maxiter: int):
    """One SLSQP run on the full problem; see :func:`_accept` for what is returned."""
    ones = np.ones(problem.m)
    constraints = [{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: ones}]
    if problem.pareto:
        # Repeated or all-zero rows make SLSQP's subproblem degenerate (seen: 1e-4 errors when
        # two tasks' rows coincide); they add nothing, and violation() still checks every row.
        P = problem.A[_distinct_rows(problem.A)]
        ref_perf = P @ problem.reference
        constraints.append({"type": "ineq", "fun": lambda w: P @ w - ref_perf, "jac": lambda w: P})
    res = minimize(
        problem.objective, x0, jac=True, method="SLSQP",
        bounds=list(zip(problem.lo, problem.hi)), constraints=constraints,
        options={"maxiter": maxiter, "ftol": tol},
    )
    return _accept(problem, res, name)


def _accept(problem: Problem, res, name: str):
    """Clean up an SLSQP result and check it; the record's ``failure`` is None when it is usable."""
    record = {
        "start": name,
        "success": bool(res.success),
        "slsqp_message": str(res.message),
        "nit": int(getattr(res, "nit", 0)),
        "nfev": int(getattr(res, "nfev", 0)),
        "njev": int(getattr(res, "njev", 0)),
        "failure": None,
    }
    weights = None
    if not res.success:
        record["failure"] = f"SLSQP: {res.message}"
    elif not np.all(np.isfinite(res.x)):
        record["failure"] = "SLSQP returned non-finite weights"
    else:
        weights = project_bounded_simplex(res.x, problem.lo, problem.hi)
        record["cleanup_shift"] = float(np.max(np.abs(weights - res.x)))
        violation = problem.violation(weights)
        if violation is not None:
            record["failure"] = f"after cleanup, {violation}"
        else:
            f_ans, f_ref = problem.exact_objective(weights), problem.exact_objective(problem.reference)
            if f_ans > f_ref + OBJECTIVE_RTOL * max(1.0, abs(f_ref)):
                record["failure"] = f"ended worse than the prior (objective {f_ans:.6g} > {f_ref:.6g})"
    return weights, record
