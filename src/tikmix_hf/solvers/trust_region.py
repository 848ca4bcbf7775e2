r"""TiKMiX-D with a scale-aware objective: the largest predicted loss drop within a trust region.

The paper's Eq. 10 trades a row-normalised gain against the entropy ``H(w)``; the two are in
unrelated units, and the entropy pulls every answer back toward the uniform mixture whatever the
evidence. This objective (``--tikmix_objective trust_region``, the default) keeps the paper's
ingredients but gives each a unit a user can reason about:

.. math::

    \max_w\ \overline{G(w)} - \alpha\,\mathrm{std}(G(w)),\qquad G_i(w) = h\,(S w)_i

    \text{s.t.}\quad \mathrm{KL}(w \,\|\, \tilde w_{prev}) \le \rho,\quad S w \ge S w_{prev}\ (\text{Pareto}),
    \quad lo \le w \le hi,\quad \textstyle\sum_j w_j = 1

- ``G_i`` is the first-order **predicted drop of task i's validation loss** over the coming stage,
  in nats: ``S_ij`` is the loss change per unit step along domain ``j``'s (preconditioned) gradient
  and ``h`` the stage's step length (learning rate x steps, so that with the ``adam``
  preconditioner ``h S w`` is the effect of the stage's Adam steps).
- The **trust region** is measured against the *previous* mixture, in nats of KL divergence, so
  evidence accumulates over stages: a consistent signal moves the mixture a little further at every
  decision, a one-off one cannot move it far. ``w_prev`` is mixed with ``1e-3`` of the uniform
  mixture (``tilde w_prev``) so that a domain at zero weight can come back. Where ``w_prev`` breaks
  a guard (a repetition cap, a floor), its projection onto the guards takes its place: that move is
  forced, so it does not spend the radius.
- ``std`` over tasks (population, smoothed at equal tasks) keeps the gain balanced; the Pareto
  constraint, the floor and the upper bounds (e.g. a repetition cap) are those of TiKMiX-D.

Properties (``docs/method.md`` derives them): the answer is invariant to a positive rescaling of
``S`` and does not depend on ``h`` (the objective is homogeneous in ``S``, the constraints are
scale-free), so ``h`` only sets the *reported* predicted gains. With ``alpha = 0`` and no other
active constraint the answer is the exponential tilt ``w \propto \tilde w_{prev} e^{t\,\sum_i S_i}``
with ``t`` chosen so that the KL equals ``rho``. With ``S = 0`` the prior is kept.
"""

from __future__ import annotations

import math
import time

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize

from ..validation import check_positive, project_bounded_simplex
from .problem import build_problem
from .result import SolverResult
from .threads import one_blas_thread

#: Weight of the uniform mixture blended into the KL reference, so no domain is locked at zero.
REFERENCE_BLEND = 1e-3
#: Relative smoothing of std near equal tasks (SLSQP needs a differentiable objective).
STD_SMOOTHING = 1e-6
#: Weight of KL(w || w_prev) in the objective itself: along directions that change no task's gain it
#: makes the answer move as little as possible (proportionally to the previous mixture).
TIE_BREAK = 1e-2
#: Slack allowed on the KL constraint when checking an answer (nats).
KL_TOL = 1e-7


def kl_divergence(w: ArrayLike, q: ArrayLike) -> float:
    """``KL(w || q) = sum_j w_j log(w_j / q_j)`` in nats (``0 log 0 = 0``)."""
    w, q = np.asarray(w, dtype=np.float64), np.asarray(q, dtype=np.float64)
    positive = w > 0
    return float(np.sum(w[positive] * np.log(w[positive] / q[positive])))


def kl_reference(prior: np.ndarray) -> np.ndarray:
    """The KL reference: the previous mixture blended with ``REFERENCE_BLEND`` of the uniform one."""
    m = prior.size
    return (1.0 - REFERENCE_BLEND) * prior + REFERENCE_BLEND / m


@one_blas_thread
def solve_trust_region(
    S: ArrayLike,
    prior: ArrayLike,
    *,
    radius: float,
    step: float = 1.0,
    alpha: float = 1.0,
    pareto: bool = True,
    floor: ArrayLike | None = None,
    upper: ArrayLike | None = None,
    max_change: ArrayLike | None = None,
    domains: list[str] | None = None,
    tasks: list[str] | None = None,
    tol: float = 1e-10,
    maxiter: int = 1000,
) -> SolverResult:
    """The scale-aware TiKMiX-D answer (module docstring): max predicted gain with KL(w || w_prev) <= radius.

    Args:
        S: influence matrix, n_tasks x n_domains, in loss change per unit step.
        prior: the mixture in effect (the previous decision), on the simplex.
        radius: the trust radius ``rho`` in nats, > 0.
        step: the stage's step length ``h`` (> 0); it scales the reported gains only.
        alpha: weight of the std of the gains across tasks (>= 0).
        pareto: impose ``S w >= S prior``.
        floor, upper, max_change: per-domain bounds (scalar or array), as in :func:`solve_direct`.
        domains, tasks: optional names.

    Returns:
        :class:`SolverResult` whose ``details`` hold ``predicted_gain`` (per task, ``h S w``, nats),
        ``predicted_gain_prior`` (``h S w_prev``), ``kl`` and ``radius``. Status ``converged``, or
        ``fallback`` (the prior kept) with the reason. SLSQP over logits can need hundreds of iterations
        when the answer puts domains at (near) zero weight, whose logits then run off to minus infinity;
        an iterate left at ``maxiter`` is used when it is feasible and better than the prior (the
        message says so), since it is a valid, improving mixture.
    """
    started = time.perf_counter()
    problem = build_problem(S, prior, alpha=alpha, beta=1.0, gamma=0.0, pareto=pareto, floor=floor,
                            max_change=max_change, upper=upper, domains=domains, tasks=tasks)
    radius, step = check_positive(radius, "radius"), check_positive(step, "step")
    S = problem.S
    reference = problem.reference
    # Where the previous mixture breaks a guard (a repetition cap that tightened, a new floor), the move onto
    # the guards is forced, not chosen: the trust region is centred on that projection, the Pareto reference.
    q = kl_reference(reference)
    logq = np.log(q)
    scale = float(np.max(np.abs(S))) or 1.0
    G = S / scale  # conditioning only: the answer is invariant to this factor
    Gc = G - G.mean(axis=0, keepdims=True)
    n = G.shape[0]
    eps = STD_SMOOTHING

    # The search runs over logits: w(theta) = softmax(log q + theta). Every w(theta) is on the simplex and
    # strictly positive, so the KL term stays smooth where a weight approaches zero (in w itself SLSQP
    # stalled there), and the answer's structure, q times an exponential, is one step from theta = 0.
    def weights_of(theta):
        z = logq + theta
        z = z - z.max()
        e = np.exp(z)
        return e / e.sum()

    def pullback(w, grad_w):
        """The chain rule through softmax: J^T grad, J = diag(w) - w w^T."""
        return w * (grad_w - float(w @ grad_w))

    def jacobian(w):
        return np.diag(w) - np.outer(w, w)

    def kl_and_grad(w):
        return float(np.sum(w * (np.log(w) - logq))), np.log(w) - logq + 1.0

    def objective(theta):
        w = weights_of(theta)
        gains = G @ w
        centred = Gc @ w
        std = math.sqrt(float(np.mean(centred**2)) + eps**2)
        kl, dkl = kl_and_grad(w)
        value = -float(gains.mean()) + problem.alpha * std + TIE_BREAK * kl
        grad = -G.mean(axis=0) + problem.alpha * (Gc.T @ centred) / (n * std) + TIE_BREAK * dkl
        return value, pullback(w, grad)

    def kl_slack(theta):
        return radius - kl_and_grad(weights_of(theta))[0]

    def kl_slack_grad(theta):
        w = weights_of(theta)
        return -pullback(w, kl_and_grad(w)[1])

    def value(w):
        centred = Gc @ w
        return -float((G @ w).mean()) + problem.alpha * math.sqrt(float(np.mean(centred**2)) + eps**2)

    def finish(weights, status, message, extra=None):
        details = {
            "solver": "trust_region",
            "radius": radius,
            "step": step,
            "kl": kl_divergence(weights, q),
            "predicted_gain": (step * (S @ weights)).tolist(),
            "predicted_gain_prior": (step * (S @ problem.prior)).tolist(),
            "seconds": time.perf_counter() - started,
            **(extra or {}),
        }
        return problem.result(weights, status, message, details)

    if problem.conflict is not None:
        return finish(reference, "fallback", f"Kept the prior: {problem.conflict}.")
    if not problem.has_information:
        return finish(reference, "fallback", "Kept the prior: S is all zeros, so no domain is known to help.")

    constraints = [{"type": "ineq", "fun": kl_slack, "jac": kl_slack_grad}]
    if problem.pareto:
        ref_perf = G @ reference
        constraints.append({"type": "ineq", "fun": lambda t: G @ weights_of(t) - ref_perf,
                            "jac": lambda t: G @ jacobian(weights_of(t))})
    lower = problem.lo > 0
    if lower.any():
        constraints.append({"type": "ineq", "fun": lambda t: (weights_of(t) - problem.lo)[lower],
                            "jac": lambda t: jacobian(weights_of(t))[lower]})
    capped = problem.hi < 1
    if capped.any():
        constraints.append({"type": "ineq", "fun": lambda t: (problem.hi - weights_of(t))[capped],
                            "jac": lambda t: -jacobian(weights_of(t))[capped]})
    # Start at the Pareto reference (the prior, or its projection onto the guards) seen as logits.
    theta0 = np.log(np.clip(reference, 1e-12, None)) - logq
    res = minimize(objective, theta0, jac=True, method="SLSQP", constraints=constraints,
                   options={"maxiter": int(maxiter), "ftol": float(tol)})
    attempt = {"success": bool(res.success), "slsqp_message": str(res.message),
               "nit": int(getattr(res, "nit", 0)), "nfev": int(getattr(res, "nfev", 0))}
    failure = None
    at_limit = not res.success and int(getattr(res, "status", -1)) == 9  # scipy's "Iteration limit reached"
    if (not res.success and not at_limit) or not np.all(np.isfinite(res.x)):
        failure = f"SLSQP: {res.message}"
    else:
        weights = project_bounded_simplex(weights_of(res.x), problem.lo, problem.hi)
        violation = problem.violation(weights)
        if violation is None and kl_divergence(weights, q) > radius + KL_TOL:
            violation = f"KL {kl_divergence(weights, q):.6g} exceeds the radius {radius:.6g}"
        if violation is None and value(weights) > value(reference) + 1e-9:
            violation = "ended worse than the prior"
        if violation is not None:
            failure = (f"SLSQP: {res.message}; its last iterate: {violation}" if at_limit
                       else f"after cleanup, {violation}")
    if failure is not None:
        return finish(reference, "fallback", f"Kept the prior: {failure}.", {"attempt": attempt})
    if at_limit:
        return finish(weights, "converged", f"SLSQP stopped at its iteration limit ({attempt['nit']}) at a feasible "
                      "point better than the prior; that point is used.", {"attempt": attempt})
    return finish(weights, "converged", f"SLSQP converged in {attempt['nit']} iterations.", {"attempt": attempt})

