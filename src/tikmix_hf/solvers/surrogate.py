"""TiKMiX-M: a LightGBM surrogate of a measured target, searched around the TiKMiX-D answer
(paper Section 3.3 and Algorithm 1)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import qmc, spearmanr

from ..validation import Range, as_float64, check_mixture, check_number, format_value, project_bounded_simplex
from .direct import solve_direct
from .problem import BOUND_TOL, PARETO_TOL, build_problem
from .result import SolverResult

MIN_CANDIDATES = 10
"""Fewer kept candidates than this and no surrogate is fitted (the TiKMiX-D answer is kept)."""

MAX_LHS_BATCHES = 64
"""Latin Hypercube batches of ``n_candidates`` drawn at most while collecting candidates."""

DEFAULT_LGBM_PARAMS = {
    "objective": "regression",
    "boosting": "gbdt",
    "learning_rate": 0.01,
    "num_leaves": 7,
    "min_data_in_leaf": 5,
    "max_bin": 63,
    "num_threads": 1,
    "deterministic": True,
    "force_row_wise": True,
    "seed": 0,
    "verbose": -1,
    "num_boost_round": 1000,
    "early_stopping_rounds": 50,
}
"""RegMix's LightGBM settings (gbdt, lr 0.01, up to 1000 rounds, early stopping on a held-out
fifth) adapted to a few hundred rows: small trees (7 leaves, 63 bins), which fit a smooth target
in 26 dimensions better and predict faster than LightGBM's 31 leaves, and a patience of 50
rounds, since RegMix's 3 rounds stop on noise at lr 0.01. One thread and ``deterministic`` make
the fit bitwise reproducible; predictions use the same ``num_threads`` (each row is summed over
the trees in a fixed order, so more threads change the speed, not the values). ``seed`` is
replaced by the ``seed`` argument unless ``lgbm_params`` sets it."""


def solve_surrogate(
    S: ArrayLike,
    prior: ArrayLike,
    evaluate: Callable[[np.ndarray], np.ndarray],
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    pareto: bool = True,
    n_candidates: int = 256,
    box: tuple[float, float] = (0.5, 2.0),
    rounds: int = 10,
    samples: int = 5000,
    top_k: int = 50,
    seed: int = 0,
    lgbm_params: Mapping | None = None,
    direct: SolverResult | np.ndarray | None = None,
    concentration: tuple[float, float] | None = None,
    min_r2: float = 0.1,
    floor: ArrayLike | None = None,
    max_change: ArrayLike | None = None,
    upper: ArrayLike | None = None,
    domains: list[str] | None = None,
    tasks: list[str] | None = None,
) -> SolverResult:
    """TiKMiX-M: refine the TiKMiX-D mixture with a surrogate of a measured target ``y(w)``.

    1. ``w_D`` = ``direct`` if given, else :func:`solve_direct` with the same arguments.
    2. Candidates: Latin Hypercube points (``scipy.stats.qmc.LatinHypercube``, seeded) in the box
       ``[box[0] * w_D, box[1] * w_D]`` (intersected with the guards), renormalised and kept only
       if still inside the box; batches are drawn until ``n_candidates`` are kept or
       ``MAX_LHS_BATCHES`` batches were used. ``w_D`` itself is added as the first row.
    3. ``y = evaluate(W)``, W of shape (N, m) with rows on the simplex, y of shape (N,), higher is
       better. The target is the caller's (tikmix_hf's callback measures a one-step look-ahead
       loss drop); it should depend on ``w`` non-linearly, or the surrogate can add nothing to
       TiKMiX-D.
    4. LightGBM (``lightgbm.train``, :data:`DEFAULT_LGBM_PARAMS` updated by ``lgbm_params``) with
       early stopping on a held-out fifth; its held-out R^2 and Spearman go into ``details``.
       The search model is then refitted on all rows with the chosen number of rounds.
    5. Search (Algorithm 1): ``rounds`` rounds of ``samples`` Dirichlet draws around ``w_best``
       with a concentration that *increases* log-spaced over ``concentration`` (default
       ``(4 m, 4000 m)``): exploration first, local refinement last. Each draw is projected onto
       the box, Pareto-infeasible draws are dropped (``pareto=True``), and ``w_best`` becomes the
       mean of the ``top_k`` by prediction. Box and Pareto set are convex, so the mean stays in.

    Guard against a useless surrogate: if the held-out R^2 is below ``min_r2`` (or undefined),
    or the search's pick is predicted worse than the best evaluated feasible candidate, that
    candidate is returned instead (``status="fallback"``, ``details["fallback_to"] =
    "best_candidate"``; it may be ``w_D`` itself, the first row). If ``y`` is constant or too few
    candidates fit the box, ``w_D`` is returned (``"direct"``). With ``pareto=True`` every answer
    satisfies ``S w >= S prior``; candidates that do not are still evaluated and used to fit the
    surrogate, but never returned.

    Same inputs and seed give bitwise the same output. ``details["seconds"]`` is the wall time,
    ``details["seconds_evaluate"]`` the part spent inside ``evaluate``.
    """
    start_time = time.perf_counter()
    coef = dict(alpha=alpha, beta=beta, gamma=gamma, pareto=pareto)
    guards = dict(floor=floor, max_change=max_change, upper=upper)
    problem = build_problem(S, prior, **coef, **guards, domains=domains, tasks=tasks)
    m = problem.m
    if not callable(evaluate):
        raise ValueError(f"evaluate must be a callable W -> y (W: (N, {m}) mixtures); got {format_value(evaluate)}")
    n_candidates = _check_int(n_candidates, "n_candidates", MIN_CANDIDATES)
    rounds = _check_int(rounds, "rounds", 1)
    samples = _check_int(samples, "samples", 1)
    top_k = _check_int(top_k, "top_k", 1)
    if top_k > samples:
        raise ValueError(f"top_k = {top_k} exceeds samples = {samples}; lower top_k or raise samples")
    seed = _check_int(seed, "seed", 0)
    box_lo, box_hi = _check_pair(box, "box")
    if not (0 < box_lo <= 1 <= box_hi):
        raise ValueError(f"box must satisfy 0 < box[0] <= 1 <= box[1] (scale factors of w_D); got {box!r}")
    if concentration is None:
        concentration = (4.0 * m, 4000.0 * m)
    c_start, c_end = _check_pair(concentration, "concentration")
    if not (0 < c_start <= c_end):
        raise ValueError(f"concentration must be (start, end) with 0 < start <= end; got {concentration!r}")
    try:
        min_r2 = float(min_r2)
    except (TypeError, ValueError):
        raise ValueError(f"min_r2 must be a number <= 1; got {min_r2!r}") from None
    if math.isnan(min_r2) or min_r2 > 1:
        raise ValueError(f"min_r2 must be a number <= 1 (-inf trusts any fit); got {min_r2!r}")
    if lgbm_params is not None and not isinstance(lgbm_params, Mapping):
        raise ValueError(f"lgbm_params must be a dict of LightGBM parameters; got {format_value(lgbm_params)}")

    timing = {"seconds_evaluate": 0.0, "seconds_direct": 0.0}
    details: dict = {"solver": "surrogate", "seed": seed, "box": [box_lo, box_hi]}

    def finish(weights, status, message, fallback_to=None):
        details["fallback_to"] = fallback_to
        details.update(timing)
        details["seconds"] = time.perf_counter() - start_time
        details["seconds_without_evaluate"] = details["seconds"] - timing["seconds_evaluate"]
        return problem.result(weights, status, message, details)

    if problem.conflict is not None:
        return finish(problem.prior, "fallback", f"Kept the prior: {problem.conflict}.", "prior")
    if not problem.has_information:
        return finish(
            problem.reference, "fallback",
            "Kept the prior: S is all zeros, so no domain is known to help or hurt any task.", "prior",
        )

    # 1. The TiKMiX-D anchor.
    t0 = time.perf_counter()
    if direct is None:
        d = solve_direct(S, prior, **coef, **guards, domains=domains, tasks=tasks)
        w_d, d_status, d_message = d.weights, d.status, d.message
    else:
        w_d = direct.weights if isinstance(direct, SolverResult) else direct
        w_d = check_mixture(w_d, "direct", m)
        violation = problem.violation(w_d)
        if violation is not None:
            raise ValueError(
                f"direct (the TiKMiX-D answer) is not feasible here: {violation}. Was it solved "
                "with other S, prior, pareto or guards? Pass direct=None to solve it here"
            )
        w_d = project_bounded_simplex(w_d, problem.lo, problem.hi)  # last ulps only
        d_status = direct.status if isinstance(direct, SolverResult) else "given"
        d_message = direct.message if isinstance(direct, SolverResult) else "given by the caller"
    timing["seconds_direct"] = time.perf_counter() - t0
    details["direct"] = {"weights": w_d.copy(), "status": d_status, "message": d_message}

    seeds = np.random.SeedSequence(seed).spawn(3)
    lo = np.maximum(problem.lo, box_lo * w_d)
    hi = np.minimum(problem.hi, box_hi * w_d)

    # 2. Candidates.
    cands, drawn = _lhs_candidates(w_d, lo, hi, n_candidates, np.random.default_rng(seeds[0]))
    details.update(candidates_drawn=drawn, candidates_kept=len(cands), acceptance=len(cands) / drawn)
    shortfall = ""
    if len(cands) < n_candidates:
        shortfall = (
            f" Only {len(cands)} of {n_candidates} candidates stayed inside the box after "
            f"renormalisation ({drawn} drawn); widen box or lower n_candidates."
        )
    if len(cands) < MIN_CANDIDATES:
        return finish(
            w_d, "fallback",
            f"Kept the TiKMiX-D answer: too few candidates to fit a surrogate.{shortfall}", "direct",
        )
    W = np.vstack([w_d[None, :], cands])

    # 3. The caller's target.
    t0 = time.perf_counter()
    y = evaluate(W.copy())
    timing["seconds_evaluate"] = time.perf_counter() - t0
    y = _check_target(y, W.shape[0])
    feasible = _feasible(problem, W)  # row 0 (w_D) always is
    best_idx = int(np.flatnonzero(feasible)[np.argmax(y[feasible])])
    details.update(
        n_evaluated=W.shape[0], n_feasible=int(feasible.sum()), y_direct=float(y[0]),
        y_best_candidate=float(y[best_idx]), best_candidate_index=best_idx,
    )
    best_msg = "the TiKMiX-D answer" if best_idx == 0 else f"evaluated candidate {best_idx}"
    if np.ptp(y) == 0:
        return finish(
            w_d, "fallback",
            f"Kept the TiKMiX-D answer: evaluate returned {y[0]!r} for every candidate, so "
            f"there is nothing to learn.{shortfall}", "direct",
        )

    # 4. The surrogate.
    model, fit = _fit_surrogate(W, y, seed, lgbm_params, np.random.default_rng(seeds[1]))
    details["surrogate"] = fit
    r2 = fit["r2"]
    if not (math.isfinite(r2) and r2 >= min_r2):
        return finish(
            W[best_idx], "fallback",
            f"Returned {best_msg} (best measured y among the feasible candidates): the surrogate's "
            f"held-out R^2 = {r2:.3g} is below min_r2 = {min_r2:g}, so its predictions are not "
            f"trusted.{shortfall}", "best_candidate",
        )

    # 5. The search (Algorithm 1, concentration increasing).
    w_best, search = _search(
        problem, model, w_d, lo, hi, rounds, samples, top_k, (c_start, c_end),
        np.random.default_rng(seeds[2]),
    )
    pred_answer, pred_cand = model.predict(np.vstack([w_best, W[best_idx]]))
    search.update(pred_answer=float(pred_answer), pred_best_candidate=float(pred_cand))
    details["search"] = search
    violation = problem.violation(w_best)
    if violation is not None:  # should not happen: the mean of feasible draws is feasible
        return finish(
            W[best_idx], "fallback",
            f"Returned {best_msg}: the search's answer is infeasible ({violation}).{shortfall}",
            "best_candidate",
        )
    if pred_answer < pred_cand:
        return finish(
            W[best_idx], "fallback",
            f"Returned {best_msg}: the surrogate predicts the search's pick ({pred_answer:.6g}) "
            f"worse than that candidate ({pred_cand:.6g}).{shortfall}", "best_candidate",
        )
    message = (
        f"Surrogate search converged: held-out R^2 = {r2:.3g}, Spearman = {fit['spearman']:.3g}; "
        f"predicted y {pred_answer:.6g} vs {pred_cand:.6g} for {best_msg}.{shortfall}"
    )
    return finish(w_best, "converged", message)


def _check_int(value, arg: str, minimum: int) -> int:
    return int(check_number(value, arg, Range(low=minimum, integer=True)))


def _check_pair(value, arg: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{arg} must be a pair of numbers (low, high); got {format_value(value)}") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"{arg} must be finite; got {value!r}")
    return a, b


def _check_target(y, n: int) -> np.ndarray:
    y = as_float64(y, "evaluate must return numbers, one per row of W")
    if y.shape != (n,):
        raise ValueError(
            f"evaluate returned shape {y.shape} for W of shape ({n}, m); it must return one "
            f"value per row, shape ({n},)"
        )
    bad = ~np.isfinite(y)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"evaluate returned {int(bad.sum())} non-finite values (rows {rows[:10].tolist()}, "
            f"first {y[rows[0]]!r}); make it return a finite score for every mixture"
        )
    return y


def _feasible(problem, W: np.ndarray) -> np.ndarray:
    if not problem.pareto:
        return np.ones(W.shape[0], dtype=bool)
    return problem.pareto_slack(W) >= -PARETO_TOL


def _lhs_candidates(w_d, lo, hi, n_candidates, rng):
    """Latin Hypercube points in [lo, hi], renormalised, kept if still inside (paper Sec. 3.3)."""
    sampler = qmc.LatinHypercube(d=w_d.size, rng=rng)
    kept, drawn = [], 0
    for _ in range(MAX_LHS_BATCHES):
        X = lo + sampler.random(n_candidates) * (hi - lo)
        X /= X.sum(axis=1, keepdims=True)
        drawn += n_candidates
        inside = np.all((X >= lo - BOUND_TOL) & (X <= hi + BOUND_TOL), axis=1)
        kept.extend(X[inside])
        if len(kept) >= n_candidates:
            break
    return np.array(kept[:n_candidates]).reshape(-1, w_d.size), drawn


def _fit_surrogate(W, y, seed, lgbm_params, rng):
    """LightGBM with early stopping on a held-out fifth, then refitted on every row."""
    import lightgbm  # here: it pulls in scikit-learn, which `import tikmix_hf.solvers` need not pay for

    params = {**DEFAULT_LGBM_PARAMS, "seed": seed, **(lgbm_params or {})}
    num_rounds = int(params.pop("num_boost_round"))
    patience = int(params.pop("early_stopping_rounds"))
    n = W.shape[0]
    order = rng.permutation(n)
    n_hold = max(2, int(round(n / 5)))
    hold, train = order[:n_hold], order[n_hold:]
    # Standardise y: tree splits do not care, but LightGBM's absolute thresholds
    # (min_gain_to_split, min_sum_hessian) then mean the same whatever the target's units.
    mu, sd = float(y[train].mean()), float(y[train].std()) or 1.0
    z = (y - mu) / sd
    dataset_params = {"verbose": -1, "min_data_in_bin": 1}
    train_set = lightgbm.Dataset(W[train], z[train], params=dataset_params, free_raw_data=False)
    hold_set = lightgbm.Dataset(W[hold], z[hold], reference=train_set, params=dataset_params)
    booster = lightgbm.train(
        params, train_set, num_boost_round=num_rounds, valid_sets=[hold_set],
        callbacks=[lightgbm.early_stopping(patience, verbose=False)],
    )
    best_iter = int(booster.best_iteration) or num_rounds
    pred = np.asarray(booster.predict(W[hold], num_iteration=best_iter)) * sd + mu  # typed as a union with lists
    ss_tot = float(np.sum((y[hold] - y[hold].mean()) ** 2))
    r2 = 1.0 - float(np.sum((y[hold] - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    spearman = float(spearmanr(pred, y[hold]).statistic) if np.ptp(pred) > 0 and ss_tot > 0 else float("nan")

    full_set = lightgbm.Dataset(W, z, params=dataset_params)
    final = lightgbm.train(params, full_set, num_boost_round=best_iter)
    fit = {
        "r2": r2, "spearman": spearman, "best_iteration": best_iter,
        "n_train": int(train.size), "n_holdout": int(hold.size), "params": params,
    }
    return _Scaled(final, mu, sd, int(params.get("num_threads", 1))), fit


class _Scaled:
    """A booster whose predictions are mapped back to the units of y."""

    def __init__(self, booster, mu: float, sd: float, num_threads: int):
        self.booster, self.mu, self.sd, self.num_threads = booster, mu, sd, num_threads

    def predict(self, X):
        return self.booster.predict(X, num_threads=self.num_threads) * self.sd + self.mu


def _search(problem, model, w_d, lo, hi, rounds, samples, top_k, concentration, rng):
    """Algorithm 1 with the concentration increasing (exploration first, then refinement)."""
    concentrations = np.geomspace(concentration[0], concentration[1], rounds)
    support = hi > 0
    w_best = w_d.copy()
    kept_per_round = []
    for c in concentrations:
        X = np.zeros((samples, problem.m))
        X[:, support] = rng.dirichlet(c * np.maximum(w_best[support], 1e-12), size=samples)
        X = project_bounded_simplex(X, lo, hi)
        X = X[_feasible(problem, X)]
        kept_per_round.append(int(X.shape[0]))
        if X.shape[0] == 0:
            continue
        pred = model.predict(X)
        top = np.argsort(-pred, kind="stable")[:top_k]
        w_best = project_bounded_simplex(X[top].mean(axis=0), lo, hi)
    return w_best, {"concentrations": concentrations, "feasible_per_round": kept_per_round}
