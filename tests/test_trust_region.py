"""The scale-aware TiKMiX-D objective and its trust-radius controller (docs/method.md, section 5b)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import brentq

from tikmix_hf.solvers import solve_direct
from tikmix_hf.solvers.trust_radius import CONSISTENT, GROW, SHRINK, TrustRadius, gain_direction, matrix_rse
from tikmix_hf.solvers.trust_region import kl_divergence, kl_reference, solve_trust_region


def tilt(q, c, radius):
    """Brute force: the exponential tilt of q along c whose KL to q is the radius."""

    def w(t):
        x = q * np.exp(t * c)
        return x / x.sum()

    t = brentq(lambda t: kl_divergence(w(t), q) - radius, 0.0, 50.0 / np.abs(c).max())
    return w(t)


@pytest.mark.parametrize("seed", range(4))
def test_without_std_or_pareto_the_answer_is_the_exponential_tilt(seed):
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(3, 6))
    prior = rng.dirichlet(np.ones(6))
    res = solve_trust_region(S, prior, radius=0.2, alpha=0.0, pareto=False)
    assert res.status == "converged"
    np.testing.assert_allclose(res.weights, tilt(kl_reference(prior), S.mean(axis=0), 0.2), atol=2e-6)


def test_a_zero_information_matrix_keeps_the_prior():
    prior = np.array([0.5, 0.3, 0.2])
    res = solve_trust_region(np.zeros((2, 3)), prior, radius=0.5)
    assert res.status == "fallback" and "all zeros" in res.message
    np.testing.assert_array_equal(res.weights, prior)


@pytest.mark.parametrize("radius", [0.01, 0.1, 0.5])
def test_a_one_hot_helpful_domain_gains_weight_at_most_as_far_as_the_radius(radius):
    prior = np.array([0.4, 0.3, 0.2, 0.1])
    S = np.zeros((2, 4))
    S[:, 2] = 1.0
    res = solve_trust_region(S, prior, radius=radius)
    q = kl_reference(prior)
    assert res.weights[2] > prior[2]
    assert kl_divergence(res.weights, q) <= radius + 1e-7
    # the whole radius is used, and the other domains shrink in proportion (the least change)
    np.testing.assert_allclose(kl_divergence(res.weights, q), radius, rtol=1e-4)
    others = np.delete(res.weights, 2) / np.delete(q, 2)
    np.testing.assert_allclose(others, others[0], rtol=1e-4)


def test_answer_is_invariant_to_rescaling_S_and_to_the_step_length():
    rng = np.random.default_rng(7)
    S = rng.normal(size=(3, 5))
    prior = np.full(5, 0.2)
    base = solve_trust_region(S, prior, radius=0.3)
    for factor, step in ((1e-6, 1.0), (1e4, 1.0), (1.0, 250.0)):
        other = solve_trust_region(factor * S, prior, radius=0.3, step=step)
        np.testing.assert_allclose(other.weights, base.weights, atol=1e-6)
        # the step length only scales the reported predicted gains: h S w in nats
        np.testing.assert_allclose(other.details["predicted_gain"], step * factor * S @ other.weights, rtol=1e-12)


def test_pareto_floor_and_upper_bounds_hold():
    rng = np.random.default_rng(3)
    S = rng.normal(size=(3, 6))
    prior = np.full(6, 1 / 6)
    upper = np.array([0.25, 1, 1, 1, 1, 1])
    res = solve_trust_region(S, prior, radius=1.0, floor=0.02, upper=upper)
    w = res.weights
    assert w.min() >= 0.02 - 1e-9 and w[0] <= 0.25 + 1e-9
    assert np.all(S @ w >= S @ prior - 1e-9)  # no task predicted worse than under the previous mixture
    assert abs(w.sum() - 1) < 1e-12


# A late decision of a demo run (19 domains, a few near zero, a repetition cap): SLSQP over logits needs
# about 210 iterations here, as the logits of the domains heading for zero run off.
S_LATE = np.array([
    [-11.1, 49.5, -14.3, 0.179, 36.6, 2.72, -2.06, 2.22, -17.9, -58.9, -24.0, -11.9, -4.3, -11.6, -13.8, 18.1, 11.0,
     -5.83, 1.67],
    [2.77, -4.46, -0.103, -6.54, -8.69, -0.375, 16.0, 8.38, 48.5, -8.91, 21.7, 24.1, 9.89, 20.4, -19.1, -13.5, 12.4,
     6.69, 58.0],
    [7.25, 5.93, 12.6, 34.4, 36.2, -0.514, 5.7, 9.02, 3.95, 46.6, 16.9, 24.7, 32.7, 40.1, -30.0, 19.5, 21.4, 19.4,
     28.8],
])
PRIOR_LATE = np.array([0.162, 0.317, 0.0118, 0.00695, 0.0161, 0.0276, 0.0114, 0.0419, 0.00685, 0.000155, 0.00751,
                       0.00992, 0.0143, 0.0254, 0.0224, 0.0067, 0.0371, 0.0591, 0.216])
UPPER_LATE = np.array([1.0, 0.976, 0.742, 1.0, 0.652, 0.618, 0.497, 0.661, 1.0, 1.0, 1.0, 0.76, 0.471, 0.415, 0.771,
                       1.0, 1.0, 1.0, 1.0])


def test_a_slow_late_decision_still_moves_and_an_iterate_at_the_limit_is_used_when_it_improves():
    prior = PRIOR_LATE / PRIOR_LATE.sum()
    full = solve_trust_region(S_LATE, prior, radius=0.2, upper=UPPER_LATE)
    assert full.status == "converged" and "converged in" in full.message  # within the default iteration limit
    # A few iterations short of convergence SLSQP's iterate is feasible and better than the prior, so an
    # iteration limit there still gives a decision that moves (with scipy 1.17: 208 iterations, cut at 198).
    nit = full.details["attempt"]["nit"]
    limit = nit - max(1, nit // 20)
    limited = solve_trust_region(S_LATE, prior, radius=0.2, upper=UPPER_LATE, maxiter=limit)
    assert limited.details["attempt"]["nit"] == limit and not limited.details["attempt"]["success"]
    assert limited.status == "converged" and f"iteration limit ({limit})" in limited.message
    for res in (full, limited):
        w = res.weights
        assert kl_divergence(w, kl_reference(prior)) == pytest.approx(0.2, abs=1e-6)  # it moved the whole radius
        assert np.all(S_LATE @ w >= S_LATE @ prior - 1e-9) and np.all(w <= UPPER_LATE + 1e-12)
        assert np.mean(S_LATE @ w) > np.mean(S_LATE @ prior)
    assert np.abs(limited.weights - full.weights).max() < 0.05  # near the converged answer
    stopped = solve_trust_region(S_LATE, prior, radius=0.2, upper=UPPER_LATE, maxiter=1)  # infeasible after one
    assert stopped.status == "fallback" and "Iteration limit reached" in stopped.message
    np.testing.assert_allclose(stopped.weights, prior, atol=1e-12)


def test_bad_radius_and_step_fail_clearly():
    with pytest.raises(ValueError, match="radius must be a finite number > 0"):
        solve_trust_region(np.ones((1, 2)), [0.5, 0.5], radius=0.0)
    with pytest.raises(ValueError, match="step must be"):
        solve_trust_region(np.ones((1, 2)), [0.5, 0.5], radius=0.1, step=float("nan"))


def test_the_paper_objective_is_unchanged_through_the_mixer():
    """--tikmix_objective paper takes the same solve_direct call as before, to 1e-10."""
    from tikmix_hf.config import TiKMiXConfig
    from tikmix_hf.mixers import StageInputs, solver_kwargs

    S = np.array([[1.0, 0.2, -0.1], [0.1, 0.8, 0.3]])
    prior = np.array([0.5, 0.3, 0.2])
    config = TiKMiXConfig(tikmix_objective="paper", tikmix_floor=0.01)
    inputs = StageInputs(stage=0, step=1, domains=["a", "b", "c"], prior=prior, model=None, optimizer=None,
                         domain_batches={}, validation_batches={}, config=config)
    via_mixer = solve_direct(S, prior, **solver_kwargs(inputs, ["t0", "t1"]))
    direct = solve_direct(S, prior, alpha=1.0, beta=1.0, gamma=1.0, pareto=True, floor=0.01, max_change=None,
                          domains=["a", "b", "c"], tasks=["t0", "t1"])
    np.testing.assert_allclose(via_mixer.weights, direct.weights, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------------------------------
# The radius controller


def scripted(controller, rounds):
    """Feed (losses now, direction, rse, predicted next) rounds; return the radii used."""
    used = []
    for losses, direction, rse, predicted in rounds:
        radius, _ = controller.update(losses, direction, rse)
        controller.record(predicted, losses)
        used.append(radius)
    return used


def test_radius_grows_when_predictions_are_realised_and_the_evidence_agrees():
    c = TrustRadius(0.1, 0.01, 0.5)
    d = [1.0, -1.0, 0.0]
    rounds = [([3.0], d, None, [0.1]), ([2.9], d, None, [0.1]), ([2.8], d, None, [0.1]), ([2.7], d, None, [0.1]),
              ([2.6], d, None, [0.1])]
    assert scripted(c, rounds) == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])  # doubled, then held at the bound


def test_radius_shrinks_when_the_loss_does_not_follow_or_the_signal_flips():
    c = TrustRadius(0.4, 0.05, 1.0)
    d = np.array([1.0, -1.0, 0.0])
    rounds = [([3.0], d, None, [0.1]), ([3.1], d, None, [0.1]),  # loss went up: shrink
              ([3.0], -d, None, [0.1]),  # realised, but the direction flipped: shrink
              ([2.9], d, None, [0.1]), ([2.8], -d, None, [0.1])]
    assert scripted(c, rounds) == pytest.approx([0.4, 0.2, 0.1, 0.05, 0.05])


def test_uncertainty_scales_the_radius_down():
    c = TrustRadius(0.2, 0.01, 1.0)
    radius, info = c.update([1.0], [1.0, 0.0], rse=1.0)
    assert radius == pytest.approx(0.1) and info["uncertainty_factor"] == pytest.approx(0.5)


def test_controller_state_resumes_exactly_through_json():
    d = [0.5, -0.5]
    a = TrustRadius(0.1, 0.01, 1.0)
    scripted(a, [([3.0], d, 0.3, [0.2]), ([2.7], d, 0.2, [0.2])])
    b = TrustRadius(0.1, 0.01, 1.0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    rest = [([2.6], d, 0.1, [0.1]), ([2.9], [-0.5, 0.5], None, [0.1])]
    assert scripted(a, rest) == scripted(b, rest)
    assert a.state_dict() == b.state_dict()


def test_controller_refuses_bad_bounds_and_state():
    with pytest.raises(ValueError, match="minimum <= radius <= maximum"):
        TrustRadius(0.5, 0.01, 0.1)
    with pytest.raises(ValueError, match="unknown keys"):
        TrustRadius(0.1, 0.01, 1.0).load_state_dict({"radius": 0.1, "minimum": 0.01, "maximum": 1.0, "oops": 1})


def test_direction_and_rse_helpers():
    S = np.array([[1.0, 0.0], [1.0, 0.0]])
    g = gain_direction(S, [0.5, 0.5])
    np.testing.assert_allclose(g, [1 / np.sqrt(2), -1 / np.sqrt(2)])
    assert matrix_rse(S, np.full((2, 2), 0.5)) == pytest.approx(np.sqrt(4 * 0.25) / np.sqrt(2))
    assert matrix_rse(S, None) is None


# --------------------------------------------------------------------------------------------------
# In a Trainer run: the metrics reach a real TensorBoard event file


def test_tikmix_metrics_reach_a_tensorboard_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Trainer, TrainingArguments

    from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig
    from tikmix_hf.history import load_history
    from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation

    mixture = DomainMixture(toy_domains(), weights={"pattern": 0.2, "echo": 0.2, "noise": 0.6}, seed=3)
    config = TiKMiXConfig(tikmix_initial_weights="keep", tikmix_stage_steps=6, tikmix_show_progress=False,
                          tikmix_probe_sequences=16,
                          tikmix_preconditioner="adam")
    callback = TiKMiXCallback(mixture, toy_validation(), config)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=18, per_device_train_batch_size=8, learning_rate=3e-3, use_cpu=True,
        report_to=["tensorboard"], save_strategy="no", logging_steps=3,
        disable_tqdm=True, seed=0, remove_unused_columns=False, lr_scheduler_type="constant",
    )
    trainer = Trainer(model=toy_model(0), args=args, train_dataset=mixture, data_collator=RecordingCollator())
    callback.bind(trainer)
    trainer.train()
    stages = load_history(tmp_path / "tikmix" / "history.json")["stages"]
    assert [s["step"] for s in stages] == [6, 12]
    (event_file,) = tmp_path.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    tags = {t.removeprefix("train/") for t in tags}  # the Trainer files its logs under train/
    for tag in ("tikmix/weight/pattern", "tikmix/entropy", "tikmix/status", "tikmix/trust_radius",
                "tikmix/predicted_gain/held_out_pattern", "tikmix/realised_gain/held_out_pattern",
                "tikmix/influence/held_out_pattern/noise"):
        assert tag in tags, f"{tag} missing from {sorted(t for t in tags if t.startswith('tikmix'))}"
    # the event file holds the history's numbers: the starting weights at step 0, then the weights after each
    # stage, and the radius each used
    weights = events.Scalars("train/tikmix/weight/pattern")
    assert [e.step for e in weights] == [0, 6, 12]
    np.testing.assert_allclose([e.value for e in weights], [0.2] + [s["weights_after"]["pattern"] for s in stages],
                               rtol=1e-6)
    radii = [e.value for e in events.Scalars("train/tikmix/trust_radius")]
    np.testing.assert_allclose(radii, [s["mixer"]["trust_region"]["radius_used"] for s in stages], rtol=1e-6)
    # the Trainer's own loss log is kept at the boundaries, which are logging steps too
    assert {e.step for e in events.Scalars("train/loss")} == {3, 6, 9, 12, 15, 18}
    # the realised gain is logged from the second decision on: the first has nothing to compare with
    assert len(events.Scalars("train/tikmix/realised_gain/held_out_pattern")) == 1
    # Each decision is the solver's own, moved the whole radius it was given (one task: nothing else binds) and
    # predicts a larger drop than the mixture it replaced; a solver that kept the prior fails every line.
    for stage in stages:
        trust, details = stage["mixer"]["trust_region"], stage["solver_result"]["details"]
        assert stage["status"] == "converged" and details["solver"] == "trust_region"
        before, after = (np.array(list(stage[k].values())) for k in ("weights_before", "weights_after"))
        assert kl_divergence(after, kl_reference(before)) == pytest.approx(trust["radius_used"], rel=1e-4)
        assert np.mean(details["predicted_gain"]) > np.mean(details["predicted_gain_prior"])
        rse = trust["rse"] or 0.0
        assert trust["radius_used"] == pytest.approx(trust["radius"] / (1 + rse * rse), rel=1e-12)
    # The controller followed its rule on the evidence it recorded (docs/method.md, the radius).
    first, second = (stage["mixer"]["trust_region"] for stage in stages)
    assert first["action"] == "first" and first["radius"] == config.tikmix_trust_radius
    ratio, consistency = second["realised_ratio"], second["consistency"]
    expected = ("grow" if ratio > 0 and consistency >= CONSISTENT
                else "shrink" if ratio <= 0 or consistency < 0 else "keep")
    assert second["action"] == expected
    factor = {"grow": GROW, "shrink": SHRINK, "keep": 1.0}[expected]
    bounds = config.tikmix_trust_radius_min, config.tikmix_trust_radius_max
    assert second["radius"] == pytest.approx(min(max(first["radius"] * factor, bounds[0]), bounds[1]))


def test_repetition_cap_bounds_a_domain_by_its_epochs_over_the_remaining_training():
    from tikmix_hf.config import TiKMiXConfig
    from tikmix_hf.mixers import StageInputs
    from tikmix_hf.mixers.tikmix import repetition_cap

    def inputs(sizes, remaining):
        return StageInputs(stage=0, step=0, domains=["a", "b", "c"], prior=np.full(3, 1 / 3), model=None,
                           optimizer=None, domain_batches={}, validation_batches={}, config=TiKMiXConfig(),
                           remaining_samples=remaining, domain_sizes=sizes)

    caps, note = repetition_cap(inputs({"a": 100, "b": 1000, "c": 10_000}, 2000), 4.0)
    np.testing.assert_allclose(caps, [0.2, 1.0, 1.0])
    assert note.startswith("applied")
    assert repetition_cap(inputs({"a": 100, "b": None, "c": 10}, 2000), 4.0)[0] is None  # a size unknown
    caps, note = repetition_cap(inputs({"a": 10, "b": 10, "c": 10}, 2000), 4.0)  # 120 < 2000: nothing can hold
    assert caps is None and "exceed" in note
    assert repetition_cap(inputs({"a": 1, "b": 1, "c": 1}, 10), None) == (None, None)
