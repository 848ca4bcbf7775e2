"""TiKMiX-D and TiKMiX-M (src/tikmix_hf/solvers): properties, brute-force references, fallbacks,
input checks. Pure numpy/scipy/lightgbm; no torch anywhere in this file."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tikmix_hf.solvers import (
    SolverResult,
    normalised_performance,
    objective_terms,
    solve_direct,
    solve_surrogate,
)
from tikmix_hf.validation import project_bounded_simplex

PROPERTY = settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def normalised(S):
    S = np.asarray(S, dtype=float)
    return S / (np.abs(S).max(axis=1, keepdims=True) + 1e-8)


def pareto_slack(S, w, prior):
    A = normalised(S)
    return float(np.min(A @ w - A @ prior))


def assert_on_simplex(w):
    assert w.dtype == np.float64
    assert np.all(w >= 0.0)
    assert abs(w.sum() - 1.0) <= 1e-12


@st.composite
def problems(draw, max_tasks=4, max_domains=6):
    """Small problems with coarse entries, so ties, zero rows and equal columns all turn up."""
    n = draw(st.integers(1, max_tasks))
    m = draw(st.integers(2, max_domains))
    entries = draw(st.lists(st.integers(-100, 100), min_size=n * m, max_size=n * m))
    S = np.array(entries, dtype=float).reshape(n, m) / 100.0
    counts = draw(st.lists(st.integers(0, 10), min_size=m, max_size=m).filter(lambda c: sum(c) > 0))
    prior = np.array(counts, dtype=float) / sum(counts)
    return S, prior


coefficients = st.fixed_dictionaries(
    {
        "alpha": st.sampled_from([0.0, 0.5, 1.0, 2.0]),
        "beta": st.sampled_from([0.5, 1.0, 2.0]),
        "gamma": st.sampled_from([0.0, 0.1, 1.0, 3.0]),
    }
)


# ----------------------------------------------------------------------------------------------
# The hard rule: no torch


def test_solvers_do_not_import_torch():
    code = (
        "import sys, numpy as np\n"
        "import tikmix_hf.solvers as s\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'import'\n"
        "S = np.array([[1.0, 0.2, 0.1], [0.1, 0.8, 0.3]])\n"
        "s.solve_surrogate(S, [1/3, 1/3, 1/3], lambda W: -((W - 0.3) ** 2).sum(1), pareto=False,\n"
        "                  n_candidates=20, rounds=2, samples=100, top_k=5)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------------
# Eq. 9 and Eq. 10


def test_normalised_performance_uses_max_abs():
    S = np.array([[2.0, 1.0, -4.0], [-1.0, -3.0, -2.0]])
    w = np.array([0.2, 0.3, 0.5])
    expected = (S @ w) / (np.array([4.0, 3.0]) + 1e-8)
    np.testing.assert_allclose(normalised_performance(S, w), expected, rtol=1e-15)
    # An all-negative row keeps its sign (the paper's max_j S_ij would flip it).
    assert normalised_performance(S, w)[1] < 0
    np.testing.assert_allclose(normalised_performance(S, np.vstack([w, w])), np.vstack([expected] * 2))


def test_objective_terms_match_the_definition():
    S = np.array([[1.0, 0.5, 0.0], [0.2, 0.4, 1.0]])
    w = np.array([0.5, 0.5, 0.0])
    p = normalised(S) @ w
    entropy = -2 * 0.5 * np.log(0.5)  # 0 log 0 = 0
    t = objective_terms(S, w, prior=[1 / 3] * 3, alpha=2.0, beta=0.5, gamma=3.0)
    assert t["std"] == pytest.approx(np.std(p))
    assert t["gain"] == pytest.approx(p.sum())
    assert t["entropy"] == pytest.approx(entropy)
    assert t["objective"] == pytest.approx(2.0 * np.std(p) - 0.5 * p.sum() - 3.0 * entropy)
    assert t["pareto_slack"] == pytest.approx(pareto_slack(S, w, np.full(3, 1 / 3)))


def test_projection_onto_bounded_simplex_matches_bisection():
    rng = np.random.default_rng(0)
    m = 7
    lo = rng.uniform(0, 0.08, m)
    hi = lo + rng.uniform(0.05, 0.6, m)
    hi[2] = lo[2]  # a domain pinned by equal bounds
    X = rng.normal(scale=0.5, size=(300, m))
    P = project_bounded_simplex(X, lo, hi)
    for x, p in zip(X, P):
        a, b = np.min(x - hi) - 1, np.max(x - lo) + 1
        for _ in range(200):  # sum(clip(x - tau)) is non-increasing in tau
            tau = (a + b) / 2
            a, b = (tau, b) if np.clip(x - tau, lo, hi).sum() > 1 else (a, tau)
        np.testing.assert_allclose(p, np.clip(x - (a + b) / 2, lo, hi), atol=1e-12)
    assert np.all(P >= lo) and np.all(P <= hi)
    assert np.max(np.abs(P.sum(axis=1) - 1)) <= 1e-14


# ----------------------------------------------------------------------------------------------
# TiKMiX-D: properties


@PROPERTY
@given(problems(), coefficients, st.booleans())
def test_direct_answer_is_feasible_and_no_worse_than_prior(problem, coef, pareto):
    S, prior = problem
    res = solve_direct(S, prior, pareto=pareto, **coef)
    w = res.weights
    assert_on_simplex(w)
    assert res.status in ("converged", "restarted", "fallback")
    if pareto:
        # The prior is always feasible here, so the constraint must hold: in normalised
        # units and, since |S| <= 1, in the units of S too.
        assert pareto_slack(S, w, prior) >= -1e-8
        assert np.min(S @ w - S @ prior) >= -1e-8
    f = objective_terms(S, w, **coef)["objective"]
    f_prior = objective_terms(S, prior, **coef)["objective"]
    assert f <= f_prior + 1e-9 * max(1.0, abs(f_prior))
    assert res.terms["answer"]["objective"] == pytest.approx(f)
    assert res.terms["prior"]["objective"] == pytest.approx(f_prior)


@st.composite
def generic_problems(draw):
    """Problems with continuous entries: no ties, so no degenerate constraint geometry."""
    n, m, seed = draw(st.integers(1, 5)), draw(st.integers(2, 8)), draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, m)) + rng.uniform(-0.5, 0.5), rng.dirichlet(np.ones(m))


SCALES = st.sampled_from([0.5, 2.0, 10.0, 1e3, 1e6])


@PROPERTY
@given(generic_problems(), SCALES, st.booleans())
def test_direct_is_invariant_to_scaling_S(problem, scale, pareto):
    # Eq. 9 divides every row by its largest |S_ij|, so c * S is the same problem up to the
    # 1e-8 in the denominator. The answer is unique (gamma > 0); what remains is SLSQP's
    # precision, which `tol` sets: over 1500 random problems the two answers differed by at
    # most 5e-6 at the default tol=1e-10 and 5e-7 at tol=1e-12.
    S, prior = problem
    a = solve_direct(S, prior, pareto=pareto, tol=1e-12)
    b = solve_direct(scale * S, prior, pareto=pareto, tol=1e-12)
    np.testing.assert_allclose(a.weights, b.weights, atol=1e-6)


@PROPERTY
@given(problems(), SCALES, st.booleans())
def test_direct_objective_is_invariant_to_scaling_S_even_when_degenerate(problem, scale, pareto):
    # On the coarse grid, ties make constraints linearly dependent at the optimum (e.g. a task
    # row equal on the support of the prior), where SLSQP pins the weights only to ~1e-3 and
    # the path may differ between the two runs. The objective still agrees closely.
    S, prior = problem
    a = solve_direct(S, prior, pareto=pareto, tol=1e-12)
    b = solve_direct(scale * S, prior, pareto=pareto, tol=1e-12)
    fa = objective_terms(S, a.weights)["objective"]
    fb = objective_terms(S, b.weights)["objective"]
    assert fa == pytest.approx(fb, abs=1e-6)


@PROPERTY
@given(problems())
def test_direct_large_gamma_tends_to_uniform(problem):
    S, _ = problem
    assume(np.any(S))  # S == 0 keeps the prior by design
    m = S.shape[1]
    uniform = np.full(m, 1.0 / m)
    for prior, pareto in ((uniform, True), (np.eye(m)[0], False)):
        res = solve_direct(S, prior, pareto=pareto, gamma=1e4)
        assert np.max(np.abs(res.weights - uniform)) <= 1e-3


@st.composite
def dominated_problems(draw):
    S, prior = draw(problems(max_tasks=4, max_domains=6))
    n, m = S.shape
    a, b = draw(st.lists(st.integers(0, m - 1), min_size=2, max_size=2, unique=True))
    gaps = np.array(draw(st.lists(st.integers(0, 50), min_size=n, max_size=n)), dtype=float) / 100
    gaps[draw(st.integers(0, n - 1))] = draw(st.integers(1, 50)) / 100  # strict on one task
    S[:, a] = S[:, b] - gaps
    return S, prior, a, b


@PROPERTY
@given(dominated_problems(), coefficients, st.booleans())
def test_direct_dominated_domain_never_outweighs_its_dominator(problem, coef, pareto):
    """Column a <= column b on every task, strictly on one: then w_a <= w_b at the optimum,
    PROVIDED alpha * sqrt(n - 1) < beta * n (always true for the paper's alpha = beta = 1).

    Why: swap w_a and w_b in an optimum with w_a > w_b. Entropy and the simplex are unchanged,
    P_hat moves by t * d with t = w_a - w_b > 0 and d = A[:, b] - A[:, a] >= 0 (so the Pareto
    constraint still holds), the gain rises by t * sum(d) > 0, and the std, a seminorm, rises by
    at most t * std(d) <= t * sum(d) * sqrt(n - 1) / n (the largest std of a non-negative vector
    with a given sum puts it all on one entry). The objective therefore drops by at least
    t * sum(d) * (beta - alpha * sqrt(n - 1) / n) > 0, a contradiction. Without the condition
    the std term can prefer the dominated domain: see the next test.
    """
    S, prior, a, b = problem
    n = S.shape[0]
    if not coef["alpha"] * np.sqrt(n - 1) < coef["beta"] * n:
        coef = {**coef, "alpha": 0.9 * coef["beta"] * n / np.sqrt(n - 1)}
    res = solve_direct(S, prior, pareto=pareto, **coef)
    assert res.status != "fallback", res.message
    assert res.weights[a] <= res.weights[b] + 1e-6


def test_direct_std_term_can_favour_a_dominated_domain():
    # Task 2 gains nothing from either domain, so the std is |P_hat_1| / 2 and with
    # alpha = 10 > beta * n / sqrt(n - 1) = 2 the objective is 2 * (1 + w_b) - H(w): it
    # prefers the dominated domain a.
    S = np.array([[1.0, 2.0], [0.0, 0.0]])
    res = solve_direct(S, [0.5, 0.5], alpha=10.0, pareto=False)
    assert res.status == "converged"
    assert res.weights[0] > res.weights[1] + 0.1


# ----------------------------------------------------------------------------------------------
# TiKMiX-D: brute force on a grid of the simplex


def simplex_grid(m, steps):
    points = [c for c in itertools.product(range(steps + 1), repeat=m - 1) if sum(c) <= steps]
    G = np.array([list(c) + [steps - sum(c)] for c in points], dtype=float) / steps
    return G


def grid_objective(S, G, alpha, beta, gamma):
    P = G @ normalised(S).T
    with np.errstate(divide="ignore", invalid="ignore"):
        neg_entropy = np.where(G > 0, G * np.log(G), 0.0).sum(axis=1)
    return alpha * P.std(axis=1) - beta * P.sum(axis=1) + gamma * neg_entropy


KNOWN = [
    # (S, prior, kwargs)
    ([[1.0, 0.3], [0.2, 0.9]], [0.5, 0.5], {}),
    ([[1.0, 0.3], [0.2, 0.9]], [0.9, 0.1], {"gamma": 0.2}),
    ([[-1.0, 0.5], [0.4, -0.2]], [0.3, 0.7], {"alpha": 2.0}),
    ([[1.0, 0.3], [0.2, 0.9]], [0.5, 0.5], {"floor": 0.3, "gamma": 0.1}),
    ([[1.0, 0.2, 0.1], [0.1, 0.8, 0.3]], [1 / 3, 1 / 3, 1 / 3], {}),
    ([[1.0, 0.2, 0.1], [0.1, 0.8, 0.3], [0.0, 0.1, 1.0]], [0.6, 0.3, 0.1], {"gamma": 0.3}),
    ([[0.5, -0.7, 1.0], [-0.3, 0.9, 0.2]], [0.2, 0.2, 0.6], {"alpha": 0.5, "beta": 2.0}),
    ([[1.0, 0.2, 0.1], [0.1, 0.8, 0.3]], [0.2, 0.5, 0.3], {"upper": [0.4, 1.0, 1.0], "max_change": 0.15}),
    ([[1.0, 0.2, 0.1], [0.1, 0.8, 0.3]], [0.2, 0.5, 0.3], {"pareto": False, "gamma": 0.5}),
]


@pytest.mark.parametrize("S, prior, kwargs", KNOWN)
def test_direct_agrees_with_brute_force(S, prior, kwargs):
    S, prior = np.array(S), np.array(prior)
    m = S.shape[1]
    coef = {k: kwargs.get(k, 1.0) for k in ("alpha", "beta", "gamma")}
    steps = 20000 if m == 2 else 500
    G = simplex_grid(m, steps)
    ok = np.ones(len(G), dtype=bool)
    if kwargs.get("pareto", True):
        ok &= (G @ normalised(S).T - normalised(S) @ prior >= -1e-12).all(axis=1)
    if "floor" in kwargs:
        ok &= (G >= np.asarray(kwargs["floor"]) - 1e-12).all(axis=1)
    if "upper" in kwargs:
        ok &= (G <= np.asarray(kwargs["upper"]) + 1e-12).all(axis=1)
    if "max_change" in kwargs:
        ok &= (np.abs(G - prior) <= kwargs["max_change"] + 1e-12).all(axis=1)
    G = G[ok]
    values = grid_objective(S, G, **coef)
    res = solve_direct(S, prior, **kwargs)
    assert res.status == "converged", res.message
    f = grid_objective(S, res.weights[None, :], **coef)[0]
    assert f <= values.min() + 1e-9  # at least as good as every feasible grid point
    np.testing.assert_allclose(res.weights, G[np.argmin(values)], atol=4.0 / steps)


# ----------------------------------------------------------------------------------------------
# TiKMiX-D: statuses and fallbacks


def small_problem():
    S = np.array([[0.9, 0.1, 0.3, -0.2], [0.2, 0.7, -0.1, 0.4], [0.1, 0.2, 0.8, 0.3]])
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    return S, prior


def test_direct_converges_with_details():
    S, prior = small_problem()
    res = solve_direct(S, prior, domains=["a", "b", "c", "d"], tasks=["x", "y", "z"])
    assert res.status == "converged"
    assert "converged from the uniform start" in res.message
    assert [a["start"] for a in res.details["attempts"]] == ["uniform", "active-set polish"]
    assert res.details["nit"] > 0 and res.details["seconds"] > 0
    assert set(res.terms) == {"answer", "prior"}
    assert set(res.terms["answer"]) == {"std", "gain", "entropy", "objective", "pareto_slack"}
    assert res.terms["answer"]["objective"] < res.terms["prior"]["objective"]
    assert list(res.as_mapping()) == ["a", "b", "c", "d"]
    assert sum(res.as_mapping().values()) == pytest.approx(1.0)
    text = json.dumps(res.to_dict(), allow_nan=False)
    assert json.loads(text)["weights"] == pytest.approx(res.weights.tolist())


def sabotage_first_minimize(monkeypatch, how):
    """Make the first SLSQP run (the uniform start) come back broken; later runs are real."""
    import tikmix_hf.solvers.direct as direct_module

    real, calls = direct_module.minimize, []

    def fake(fun, x0, **kwargs):
        calls.append(kwargs)
        res = real(fun, x0, **kwargs)
        if len(calls) == 1:
            how(res)
        return res

    monkeypatch.setattr(direct_module, "minimize", fake)
    return calls


def test_direct_restarts_from_the_prior_when_slsqp_fails(monkeypatch):
    S, prior = small_problem()
    expected = solve_direct(S, prior)

    def fail(res):
        res.success, res.message = False, "Positive directional derivative for linesearch"

    sabotage_first_minimize(monkeypatch, fail)
    res = solve_direct(S, prior)
    assert res.status == "restarted", res.message
    assert "uniform start failed (SLSQP: Positive directional derivative" in res.message
    assert "restart from the prior converged" in res.message
    assert [a["start"] for a in res.details["attempts"]][:2] == ["uniform", "prior"]
    np.testing.assert_allclose(res.weights, expected.weights, atol=1e-5)


def test_direct_restarts_when_the_answer_breaks_pareto(monkeypatch):
    S, prior = small_problem()

    def break_pareto(res):  # claims success at a point that hurts task 0
        res.x = np.array([0.0, 0.5, 0.0, 0.5])

    sabotage_first_minimize(monkeypatch, break_pareto)
    res = solve_direct(S, prior)
    assert res.status == "restarted"
    assert "after cleanup, Pareto constraint violated" in res.message
    assert pareto_slack(S, res.weights, prior) >= -1e-8


def test_direct_restarts_naturally_when_iterations_run_out():
    S, prior = small_problem()
    optimum = solve_direct(S, prior).weights
    # With the optimum as prior, SLSQP from the prior stops after 1 step; from uniform, 2
    # steps are too few.
    res = solve_direct(S, optimum, maxiter=2)
    assert res.status == "restarted", res.message
    assert "Iteration limit" in res.message
    np.testing.assert_allclose(res.weights, optimum, atol=1e-9)


def test_direct_falls_back_to_the_prior_when_slsqp_fails():
    S, prior = small_problem()
    res = solve_direct(S, prior, maxiter=0)
    assert res.status == "fallback"
    assert res.message.startswith("Kept the prior")
    assert "Iteration limit" in res.message
    np.testing.assert_array_equal(res.weights, prior)
    assert len(res.details["attempts"]) == 2


def test_direct_keeps_the_prior_when_S_is_zero():
    prior = np.array([0.2, 0.3, 0.5])
    res = solve_direct(np.zeros((2, 3)), prior)
    assert res.status == "fallback"
    assert "all zeros" in res.message
    np.testing.assert_array_equal(res.weights, prior)


def test_direct_keeps_the_prior_when_guards_conflict_with_it():
    S, _ = small_problem()
    prior = np.array([0.0, 0.3, 0.3, 0.4])
    res = solve_direct(S, prior, floor=0.1, max_change=0.05, domains=["a", "b", "c", "d"])
    assert res.status == "fallback"
    assert "max_change" in res.message and "'a'" in res.message
    np.testing.assert_array_equal(res.weights, prior)


# ----------------------------------------------------------------------------------------------
# TiKMiX-D: guards


def test_direct_guards_are_respected():
    S, prior = small_problem()
    free = solve_direct(S, prior)
    floor = np.array([0.0, 0.0, 0.0, 0.3])
    upper = np.array([0.35, 1.0, 1.0, 1.0])
    guarded = solve_direct(S, prior, floor=floor, upper=upper, max_change=0.12)
    assert guarded.status == "converged"
    w = guarded.weights
    assert_on_simplex(w)
    assert np.all(w >= floor - 1e-12) and np.all(w <= upper + 1e-12)
    assert np.max(np.abs(w - prior)) <= 0.12 + 1e-12
    assert pareto_slack(S, w, prior) >= -1e-8
    assert not np.allclose(w, free.weights, atol=1e-3)  # the guards bind here


def test_direct_prior_outside_the_floor_uses_its_projection():
    S, _ = small_problem()
    prior = np.array([0.0, 0.2, 0.4, 0.4])
    res = solve_direct(S, prior, floor=0.1)
    assert res.status == "converged"
    assert res.details["pareto_reference"] == "prior projected onto the floor/upper guards"
    assert res.details["notes"]
    reference = project_bounded_simplex(prior, np.full(4, 0.1), np.ones(4))
    # Euclidean projection: domain 0 rises to its floor, the others give up 1/30 each.
    np.testing.assert_allclose(reference, [0.1, 0.2 - 1 / 30, 0.4 - 1 / 30, 0.4 - 1 / 30])
    assert np.all(res.weights >= 0.1 - 1e-12)
    assert pareto_slack(S, res.weights, reference) >= -1e-8
    assert "reference" in res.terms


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"floor": 0.3}, r"floor sums to 1\.2"),
        ({"floor": -0.1}, "floor must be finite and non-negative"),
        ({"floor": [0.1, 0.1]}, r"floor must be a scalar or have shape \(4,\)"),
        ({"upper": 0.2}, r"upper sums to 0\.8"),
        ({"upper": [0.5, 0.5, 0.05, 0.5], "floor": [0, 0, 0.1, 0]}, r"floor\[2\] = 0\.1 exceeds upper\[2\]"),
        ({"max_change": -0.1}, "max_change must be finite and non-negative"),
        ({"max_change": float("nan")}, "max_change must be finite"),
    ],
)
def test_direct_refuses_impossible_guards(kwargs, match):
    S, prior = small_problem()
    with pytest.raises(ValueError, match=match):
        solve_direct(S, prior, **kwargs)


# ----------------------------------------------------------------------------------------------
# Bad input, both solvers


def dummy_evaluate(W):
    return -np.sum((W - 0.25) ** 2, axis=1)


def call(solver, S, prior, **kwargs):
    if solver is solve_surrogate:
        return solver(S, prior, dummy_evaluate, n_candidates=20, rounds=1, samples=50, top_k=5, **kwargs)
    return solver(S, prior, **kwargs)


S_OK, PRIOR_OK = small_problem()

BAD_INPUTS = [
    ({"S": S_OK[0]}, r"S must be 2-D.*reshape\(1, -1\)"),
    ({"S": S_OK[:, :1], "prior": [1.0]}, "at least 2 domains"),
    ({"S": np.where(np.eye(3, 4) > 0, np.nan, S_OK)}, r"S must be finite; S\[0, 0\] = nan"),
    ({"S": np.where(np.eye(3, 4) > 0, np.inf, S_OK)}, r"S must be finite; S\[0, 0\] = inf"),
    ({"S": [["a", "b"], ["c", "d"]]}, "S must be a numeric"),
    ({"prior": [0.5, 0.5]}, r"prior must have shape \(4,\)"),
    ({"prior": [0.6, -0.1, 0.3, 0.2]}, r"prior must be non-negative; prior\[1\] = -0\.1"),
    ({"prior": [0.3, 0.3, 0.3, 0.3]}, "prior must sum to 1.*sums to 1.2"),
    ({"prior": [np.nan, 0.5, 0.25, 0.25]}, "prior must be finite"),
    ({"prior": {"a": 0.5, "b": 0.5, "c": 0.0, "d": 0.0}}, "needs domains"),
    ({"alpha": -1.0}, "alpha must be a finite non-negative number; got -1.0"),
    ({"beta": float("inf")}, "beta must be a finite non-negative number"),
    ({"gamma": float("nan")}, "gamma must be a finite non-negative number"),
    ({"gamma": "lots"}, "gamma must be a non-negative number"),
    ({"domains": ["a", "b"]}, "domains has 2 names but S has 4 domains"),
    ({"domains": ["a", "a", "b", "c"]}, "domains must not repeat names"),
    ({"tasks": ["x"]}, "tasks has 1 names but S has 3 tasks"),
    ({"pareto": "yes"}, "pareto must be True or False"),
    (
        {"prior": {"a": 0.5, "b": 0.5, "zz": 0.0}, "domains": ["a", "b", "c", "d"]},
        r"prior keys must match domains exactly; missing \['c', 'd'\], unknown \['zz'\]",
    ),
]


@pytest.mark.parametrize("solver", [solve_direct, solve_surrogate], ids=["direct", "surrogate"])
@pytest.mark.parametrize("change, match", BAD_INPUTS)
def test_bad_input_is_refused_with_the_argument_named(solver, change, match):
    args = {"S": S_OK, "prior": PRIOR_OK, **change}
    S, prior = args.pop("S"), args.pop("prior")
    with pytest.raises(ValueError, match=match):
        call(solver, S, prior, **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tol": 0.0}, "tol must be a positive number"),
        ({"maxiter": -1}, "maxiter must be a non-negative integer"),
    ],
)
def test_direct_refuses_bad_solver_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve_direct(S_OK, PRIOR_OK, **kwargs)


def test_prior_as_mapping_follows_domain_order():
    domains = ["a", "b", "c", "d"]
    mapping = dict(zip(reversed(domains), reversed(PRIOR_OK.tolist())))
    res_map = solve_direct(S_OK, mapping, domains=domains)
    res_arr = solve_direct(S_OK, PRIOR_OK, domains=domains)
    np.testing.assert_array_equal(res_map.weights, res_arr.weights)


def test_as_mapping_needs_domains():
    with pytest.raises(ValueError, match="as_mapping\\(\\) needs domain names"):
        solve_direct(S_OK, PRIOR_OK).as_mapping()


# ----------------------------------------------------------------------------------------------
# TiKMiX-M


def nonlinear_problem():
    """A target with its optimum w_star inside the box around w_D but well away from it."""
    S = np.array([[1.0, 0.4, 0.2, 0.6], [0.3, 0.9, 0.5, 0.1], [0.2, 0.3, 1.0, 0.4]])
    prior = np.full(4, 0.25)
    direct = solve_direct(S, prior, pareto=False)
    w_star = direct.weights * np.array([1.5, 0.7, 1.3, 0.6])
    w_star /= w_star.sum()
    assert np.all(w_star > 0.5 * direct.weights) and np.all(w_star < 2.0 * direct.weights)
    return S, prior, direct, w_star


def test_surrogate_moves_towards_a_nonlinear_optimum():
    S, prior, direct, w_star = nonlinear_problem()
    seen = []

    def evaluate(W):
        seen.append(W.copy())
        return -np.sum((W - w_star) ** 2, axis=1)

    res = solve_surrogate(S, prior, evaluate, pareto=False, seed=3)
    assert res.status == "converged", res.message
    assert_on_simplex(res.weights)
    d_direct = np.linalg.norm(direct.weights - w_star)
    d_surrogate = np.linalg.norm(res.weights - w_star)
    assert d_surrogate < 0.4 * d_direct, (d_surrogate, d_direct)
    # One call; w_D first, then the kept Latin Hypercube candidates, all inside the box.
    assert len(seen) == 1
    W = seen[0]
    assert W.shape == (257, 4) and res.details["n_evaluated"] == 257
    np.testing.assert_allclose(W[0], direct.weights, atol=1e-12)
    assert np.all(W >= 0.5 * direct.weights - 1e-12) and np.all(W <= 2.0 * direct.weights + 1e-12)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)
    fit = res.details["surrogate"]
    assert fit["r2"] > 0.8 and fit["spearman"] > 0.8
    assert res.details["candidates_kept"] == 256
    assert res.details["seconds_without_evaluate"] <= res.details["seconds"]
    json.dumps(res.to_dict(), allow_nan=False)


def test_surrogate_is_deterministic():
    S, prior, direct, w_star = nonlinear_problem()

    def evaluate(W):
        return -np.sum((W - w_star) ** 2, axis=1) + 0.1 * W[:, 0] * W[:, 1]

    kwargs = dict(rounds=4, samples=1000, top_k=20, seed=11)
    a = solve_surrogate(S, prior, evaluate, **kwargs)
    b = solve_surrogate(S, prior, evaluate, **kwargs)
    assert a.status == b.status
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.details["surrogate"]["r2"] == b.details["surrogate"]["r2"]


def test_surrogate_answer_satisfies_pareto_and_the_box():
    rng = np.random.default_rng(5)
    S = rng.normal(size=(4, 8)) + 0.3
    prior = rng.dirichlet(np.full(8, 2.0))
    direct = solve_direct(S, prior)
    w_star = direct.weights * rng.uniform(0.6, 1.6, 8)
    w_star /= w_star.sum()

    def evaluate(W):
        return normalised_performance(S, W).sum(axis=1) - 20 * np.sum((W - w_star) ** 2, axis=1)

    res = solve_surrogate(S, prior, evaluate, direct=direct, rounds=5, samples=2000)
    assert res.status == "converged", res.message
    assert_on_simplex(res.weights)
    assert pareto_slack(S, res.weights, prior) >= -1e-8
    assert np.all(res.weights >= 0.5 * direct.weights - 1e-12)
    assert np.all(res.weights <= 2.0 * direct.weights + 1e-12)
    assert evaluate(res.weights[None])[0] > evaluate(direct.weights[None])[0]


def test_surrogate_falls_back_when_the_target_is_noise():
    S, prior, _, _ = nonlinear_problem()
    noise = np.random.default_rng(0)
    seen = []

    def evaluate(W):
        seen.append(W.copy())
        return noise.normal(size=W.shape[0])

    res = solve_surrogate(S, prior, evaluate, pareto=False, rounds=2, samples=200)
    assert res.status == "fallback"
    assert res.details["fallback_to"] == "best_candidate"
    assert "R^2" in res.message
    assert np.any(np.all(seen[0] == res.weights, axis=1))  # one of the evaluated rows


def test_surrogate_falls_back_when_the_target_is_constant():
    S, prior, direct, _ = nonlinear_problem()
    res = solve_surrogate(S, prior, lambda W: np.ones(W.shape[0]), pareto=False, direct=direct)
    assert res.status == "fallback" and res.details["fallback_to"] == "direct"
    assert "nothing to learn" in res.message
    np.testing.assert_allclose(res.weights, direct.weights, atol=1e-15)


def test_surrogate_keeps_the_prior_when_S_is_zero():
    calls = []
    res = solve_surrogate(np.zeros((2, 3)), [0.2, 0.3, 0.5], lambda W: calls.append(W) or np.zeros(len(W)))
    assert res.status == "fallback" and res.details["fallback_to"] == "prior"
    assert "all zeros" in res.message and not calls


def test_surrogate_keeps_direct_when_no_candidate_fits_the_box():
    # With box (1, 2) every renormalised point falls below w_D somewhere: none can be kept.
    S, prior, direct, _ = nonlinear_problem()
    calls = []
    res = solve_surrogate(S, prior, lambda W: calls.append(W) or np.zeros(len(W)), pareto=False,
                          direct=direct, box=(1.0, 2.0), n_candidates=16)
    assert res.status == "fallback" and res.details["fallback_to"] == "direct"
    assert "Only 0 of 16 candidates" in res.message and not calls
    assert res.details["candidates_drawn"] == 64 * 16


def test_surrogate_respects_guards_and_accepts_an_array_anchor():
    S, prior, free, w_star = nonlinear_problem()
    floor = np.array([0.0, 0.0, 0.0, 0.25])  # w_star[3] = 0.10 lies below it
    direct = solve_direct(S, prior, pareto=False, floor=floor)
    seen = []

    def evaluate(W):
        seen.append(W)
        return -np.sum((W - w_star) ** 2, axis=1)

    res = solve_surrogate(S, prior, evaluate, pareto=False, floor=floor, direct=direct.weights,
                          rounds=3, samples=500, top_k=10)
    assert res.details["direct"]["status"] == "given"
    assert np.all(seen[0] >= floor - 1e-12) and np.all(res.weights >= floor - 1e-12)
    with pytest.raises(ValueError, match="direct .* not feasible here: a weight is outside its bounds"):
        solve_surrogate(S, prior, evaluate, pareto=False, floor=floor, direct=free.weights)


@pytest.mark.parametrize(
    "evaluate, match",
    [
        (lambda W: np.zeros(len(W) - 1), r"evaluate returned shape \(20,\) .* shape \(21,\)"),
        (lambda W: np.zeros((len(W), 1)), r"evaluate returned shape \(21, 1\)"),
        (
            lambda W: np.where(np.arange(len(W)) == 3, np.nan, 0.0),
            r"evaluate returned 1 non-finite values \(rows \[3\]",
        ),
        (lambda W: np.full(len(W), np.inf), "evaluate returned 21 non-finite"),
        (lambda W: ["x"] * len(W), "evaluate must return numbers"),
        ("not callable", "evaluate must be a callable"),
    ],
)
def test_surrogate_refuses_bad_evaluate(evaluate, match):
    with pytest.raises(ValueError, match=match):
        solve_surrogate(S_OK, PRIOR_OK, evaluate, n_candidates=20, rounds=1, samples=50, top_k=5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_candidates": 5}, "n_candidates must be an integer >= 10"),
        ({"top_k": 100, "samples": 50}, "top_k = 100 exceeds samples = 50"),
        ({"box": (1.5, 2.0)}, "box must satisfy 0 < box"),
        ({"box": (0.5,)}, "box must be a pair"),
        ({"rounds": 0}, "rounds must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"concentration": (10.0, 1.0)}, "concentration must be"),
        ({"lgbm_params": [1, 2]}, "lgbm_params must be a dict"),
        ({"min_r2": 2.0}, "min_r2 must be a number <= 1"),
        ({"direct": np.array([0.5, 0.5])}, r"direct must have shape \(4,\)"),
        ({"direct": np.array([1.0, 0.0, 0.0, 0.0])}, "direct .* is not feasible here: Pareto"),
    ],
)
def test_surrogate_refuses_bad_options(kwargs, match):
    base = dict(n_candidates=20, rounds=1, samples=50, top_k=5)
    with pytest.raises(ValueError, match=match):
        solve_surrogate(S_OK, PRIOR_OK, dummy_evaluate, **{**base, **kwargs})


def test_solver_result_round_trips_through_json():
    res = SolverResult(
        weights=np.array([0.5, 0.5]), status="converged", message="ok",
        terms={"answer": {"std": np.float64(0.1)}}, domains=["a", "b"], tasks=None,
        details={"r2": float("nan"), "n": np.int64(3), "arr": np.arange(2)},
    )
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["details"] == {"r2": None, "n": 3, "arr": [0, 1]}
    assert res.as_mapping() == {"a": 0.5, "b": 0.5}
