"""Uncertainty of Group Influence (docs/uncertainty.md): standard errors, split-half agreement, the
adaptive probe budget, shrinkage, smoothing across stages, and the switches-off identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.reference import reference_summed_loss as summed_loss
from scipy.stats import spearmanr

from tikmix_hf.config import TiKMiXConfig
from tikmix_hf.influence import InfluenceResult, adaptive_group_influence, group_influence
from tikmix_hf.influence.stats import BatchStats
from tikmix_hf.mixers import StageInputs, TiKMiXDirect, solver_kwargs
from tikmix_hf.solvers import solve_direct
from tikmix_hf.solvers.uncertainty import PrecisionSmoother, shrink_influence
from tikmix_hf.testing import exact_llama, named_batches, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")

DOMAINS = ("code", "law", "news")
TASKS = ("arc", "wiki")



# --------------------------------------------------------------------------------------------
# Brute force: per-batch contributions from dense gradients, the SE formula written out
# --------------------------------------------------------------------------------------------


def flat_grad(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def dense_contributions(model, domains, tasks):
    """``c[j]``: (B_j, n) array of <grad f_i, grad summed loss of batch b>, ``t[j]``: (B_j,) token counts."""
    model = model.eval()
    V = []
    for batches in tasks.values():
        total, count = 0.0, 0
        for b in batches:
            loss, n = summed_loss(model, b)
            total, count = total + loss, count + n
        V.append(flat_grad(model, total / count))
    V = torch.stack(V)
    c, t = {}, {}
    for name, batches in domains.items():
        rows, counts = [], []
        for b in batches:
            loss, n = summed_loss(model, b)
            rows.append((V @ flat_grad(model, loss)).numpy())
            counts.append(n)
        c[name], t[name] = np.array(rows), np.array(counts, dtype=np.float64)
    return c, t


def reference_se(c, t):
    """Ratio estimator: S = sum c / T, Var = B/(B-1) sum_b (c_b - S t_b)^2 / T^2 (written out, per batch)."""
    B, T = len(t), t.sum()
    S = c.sum(axis=0) / T
    resid = c - S[None, :] * t[:, None]
    return S, np.sqrt(B / (B - 1) * (resid**2).sum(axis=0) / T**2)


def test_stderr_and_split_half_match_dense_per_batch_reference():
    model = exact_llama(seed=0)
    domains = named_batches(DOMAINS, 5, seed=1)
    tasks = named_batches(TASKS, 2, seed=2)
    result = group_influence(model, domains, tasks, show_progress=False)
    c, t = dense_contributions(model, domains, tasks)
    for j, name in enumerate(DOMAINS):
        S, se = reference_se(c[name], t[name])
        np.testing.assert_allclose(result.scores[:, j], S, rtol=1e-10)
        np.testing.assert_allclose(result.stderr[:, j], se, rtol=1e-8)
    assert result.probe_batches == {name: 5 for name in DOMAINS} and result.uncertainty_note is None
    # split half: S from even and odd batch indices, Spearman over domains per task
    even = np.array([c[d][0::2].sum(0) / t[d][0::2].sum() for d in DOMAINS]).T
    odd = np.array([c[d][1::2].sum(0) / t[d][1::2].sum() for d in DOMAINS]).T
    for i, task in enumerate(TASKS):
        assert result.split_half[task] == pytest.approx(spearmanr(even[i], odd[i]).statistic, abs=1e-12)
    # the kept-gradient path (used by TiKMiX-M) measures the same standard errors
    kept = group_influence(model, domains, tasks, keep_domain_gradients=True, show_progress=False)
    np.testing.assert_allclose(kept.stderr, result.stderr, rtol=1e-8)
    # JSON-ready for history.json (strict JSON: no nan)
    doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert np.allclose(doc["stderr"], result.stderr) and set(doc["split_half"]) == set(TASKS)


def test_stderr_agrees_with_a_bootstrap_over_batches():
    model = exact_llama(seed=0)
    domains = named_batches(DOMAINS, 16, seed=3)
    tasks = named_batches(TASKS, 2, seed=4)
    result = group_influence(model, domains, tasks, show_progress=False)
    c, t = dense_contributions(model, domains, tasks)
    rng = np.random.default_rng(0)
    for j, name in enumerate(DOMAINS):
        B = len(t[name])
        idx = rng.integers(0, B, size=(4000, B))
        boot = c[name][idx].sum(axis=1) / t[name][idx].sum(axis=1)[:, None]  # (4000, n)
        # bootstrap variance of a ratio estimator is (B-1)/B of the unbiased one, plus Monte-Carlo noise
        np.testing.assert_allclose(boot.std(axis=0, ddof=1), result.stderr[:, j] * np.sqrt((B - 1) / B), rtol=0.12)


def test_single_batch_domain_gets_nan_stderr_and_a_note():
    model = exact_llama(seed=0)
    domains = named_batches(DOMAINS, 3, seed=1)
    domains["law"] = domains["law"][:1]
    result = group_influence(model, domains, named_batches(TASKS, 1, seed=2), show_progress=False)
    assert np.isnan(result.stderr[:, 1]).all() and np.isfinite(result.stderr[:, [0, 2]]).all()
    assert "law" in result.uncertainty_note and "fewer than 2" in result.uncertainty_note
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["stderr"][0][1] is None
    projected = group_influence(model, domains, named_batches(TASKS, 1, seed=2), projection_dim=8,
                                show_progress=False)
    assert projected.stderr is None and "projection_dim" in projected.uncertainty_note


# --------------------------------------------------------------------------------------------
# Adaptive probe budget
# --------------------------------------------------------------------------------------------


def test_adaptive_budget_stops_where_the_target_says():
    model = exact_llama(seed=0)
    tasks = named_batches(TASKS, 2, seed=2)
    noisy = token_batches(10, seed=11)
    same = token_batches(1, seed=12)[0]
    sources = {"same": lambda k: same, "noisy": noisy}
    # identical batches: zero variance, stops at min_batches on any target
    result = adaptive_group_influence(model, sources, tasks, target_rse=1e-6, max_batches=10, min_batches=3)
    info = result.adaptive["domains"]
    assert info["same"] == {"batches": 3, "tokens": 3 * info["same"]["tokens"] // 3, "rse": 0.0, "stopped": "target"}
    assert info["noisy"]["batches"] == 10 and info["noisy"]["stopped"] == "max_batches"
    assert result.adaptive["total_batches"] == 13
    # a target between: the stop is the first prefix whose column RSE (from group_influence on that
    # prefix, the same estimator) reaches it
    rse = []
    for k in range(2, 11):
        r = group_influence(model, {"noisy": noisy[:k]}, tasks, show_progress=False)
        rse.append(np.linalg.norm(r.stderr[:, 0]) / np.linalg.norm(r.scores[:, 0]))
    target = float(np.median(rse))
    expected = next(k for k, value in zip(range(2, 11), rse) if value <= target)
    result = adaptive_group_influence(model, {"noisy": noisy}, tasks, target_rse=target, max_batches=10)
    assert result.adaptive["domains"]["noisy"]["batches"] == expected
    assert result.adaptive["domains"]["noisy"]["stopped"] == "target"
    # ... and its S and SE are group_influence's on exactly the drawn batches
    ref = group_influence(model, {"noisy": noisy[:expected]}, tasks, show_progress=False)
    np.testing.assert_allclose(result.scores, ref.scores, rtol=1e-10)
    np.testing.assert_allclose(result.stderr, ref.stderr, rtol=1e-8)
    # exhausted source and token cap
    short = adaptive_group_influence(model, {"n": noisy[:4]}, tasks, target_rse=1e-9, max_batches=10)
    assert short.adaptive["domains"]["n"]["stopped"] == "exhausted" and short.adaptive["domains"]["n"]["batches"] == 4
    capped = adaptive_group_influence(model, {"n": noisy}, tasks, target_rse=1e-9, max_batches=10, max_tokens=40)
    capped_n = capped.adaptive["domains"]["n"]
    assert capped_n["stopped"] == "max_tokens" and capped_n["tokens"] >= 40
    with pytest.raises(ValueError, match="diag_fisher"):
        adaptive_group_influence(model, {"n": noisy}, tasks, target_rse=0.1, max_batches=4,
                                 preconditioner="diag_fisher")


# --------------------------------------------------------------------------------------------
# Shrinkage and the decision
# --------------------------------------------------------------------------------------------


def test_shrink_influence_soft_threshold():
    S = np.array([[3.0, -3.0, 0.5, -0.5, 1.0]])
    se = np.array([[1.0, 1.0, 1.0, 1.0, np.nan]])
    np.testing.assert_array_equal(shrink_influence(S, se, 1.0), [[2.0, -2.0, 0.0, 0.0, 0.0]])
    out = shrink_influence(S, None, 0.0)
    assert out is not S and np.array_equal(out, S)  # z = 0: an exact copy, stderr never read
    with pytest.raises(ValueError):
        shrink_influence(S, se, -1.0)


def stage_inputs(model, config, *, stage=0, seed=1, prior=None, n_batches=4):
    domains = named_batches(DOMAINS, n_batches, seed=seed)
    tasks = named_batches(TASKS, 2, seed=2)
    prior = np.array([0.2, 0.3, 0.5]) if prior is None else prior
    return StageInputs(stage=stage, step=10 * stage, domains=list(DOMAINS), prior=prior, model=model, optimizer=None,
                       domain_batches=domains, validation_batches=tasks, config=config)


def test_switches_off_reproduce_plain_tikmix_d_bitwise():
    model = exact_llama(seed=0)
    plain_cfg = TiKMiXConfig(tikmix_show_progress=False, tikmix_objective="paper")
    assert plain_cfg.tikmix_shrink_z == 0 and plain_cfg.smoothing() == 0 and plain_cfg.tikmix_target_rse is None
    mixer = TiKMiXDirect()
    prior = None
    for stage in range(2):
        inputs = stage_inputs(model, plain_cfg, stage=stage, seed=stage + 1, prior=prior)
        decision = mixer.decide(inputs)
        # the behaviour before this feature: solve_direct on group_influence's scores
        result = group_influence(model, inputs.domain_batches, inputs.validation_batches, show_progress=False)
        plain = solve_direct(result.scores, inputs.prior, **solver_kwargs(inputs, result.task_names))
        assert np.array_equal(decision.weights, plain.weights) and decision.status == plain.status
        assert decision.extra == {} and mixer.state_dict() == {}
        prior = decision.weights
    # shrinkage on: the same solver on the shrunk matrix
    cfg = TiKMiXConfig(tikmix_show_progress=False, tikmix_shrink_z=1.0, tikmix_objective="paper")
    inputs = stage_inputs(model, cfg)
    decision = TiKMiXDirect().decide(inputs)
    S = shrink_influence(decision.influence.scores, decision.influence.stderr, 1.0)
    expected = solve_direct(S, inputs.prior, **solver_kwargs(inputs, list(TASKS)))
    assert np.array_equal(decision.weights, expected.weights)
    assert decision.extra["uncertainty"]["scores_used"] == S.tolist()


def noise_result(rng, n_batches=16, n=2, m=4):
    """An InfluenceResult whose S is pure noise: per-batch contributions with mean exactly zero."""
    stats = BatchStats(n, m, torch.device("cpu"))
    for j in range(m):
        for k in range(n_batches):
            tokens = int(rng.integers(20, 40))
            stats.add(j, k, tokens, torch.as_tensor(rng.normal(0.0, 1.0, n) * tokens))
    stderr, split, note = stats.finish([f"t{i}" for i in range(n)], [f"d{j}" for j in range(m)])
    T = {f"d{j}": stats.tokens(j) for j in range(m)}
    return InfluenceResult(
        scores=stats.scores(), task_names=[f"t{i}" for i in range(n)], domain_names=[f"d{j}" for j in range(m)],
        preconditioner="identity", requested_preconditioner="identity", preconditioner_fallback=None, damping=None,
        projection_dim=None, seed=0, num_parameters=0, domain_tokens=T, task_tokens={}, domain_losses={},
        task_losses={}, seconds=0.0, peak_memory_bytes=0, buffer_bytes=0, buffer_dtype="float64",
        memory_measure="none", world_size=1, parameter_names=[], stderr=stderr, split_half=split,
    )


def test_all_noise_influence_keeps_the_prior_with_shrinkage(monkeypatch):
    import tikmix_hf.mixers.tikmix as mixers

    rng = np.random.default_rng(0)
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    moved_plain, kept_shrunk = 0, 0
    trials = 20
    for _ in range(trials):
        result = noise_result(rng)
        monkeypatch.setattr(mixers, "measure_influence", lambda inputs, **kw: (result, ""))
        for z, cfg in ((0.0, TiKMiXConfig(tikmix_show_progress=False, tikmix_objective="paper")),
                       (3.0, TiKMiXConfig(tikmix_show_progress=False, tikmix_shrink_z=3.0, tikmix_objective="paper"))):
            inputs = StageInputs(stage=0, step=0, domains=result.domain_names, prior=prior, model=None, optimizer=None,
                                 domain_batches={}, validation_batches={}, config=cfg)
            weights = TiKMiXDirect().decide(inputs).weights
            if z == 0:
                moved_plain += np.abs(weights - prior).sum() > 0.05
            else:
                S = shrink_influence(result.scores, result.stderr, 3.0)
                if not S.any():  # everything insignificant: exactly the prior
                    assert np.array_equal(weights, prior)
                kept_shrunk += np.array_equal(weights, prior)
    # plain TiKMiX-D moves weight on pure noise nearly always; shrinkage at z=3 keeps the prior
    assert moved_plain >= 0.9 * trials
    assert kept_shrunk >= 0.85 * trials, kept_shrunk


# --------------------------------------------------------------------------------------------
# Smoothing across stages
# --------------------------------------------------------------------------------------------


def test_precision_smoother_matches_the_closed_form():
    rng = np.random.default_rng(1)
    lam = 0.6
    S = [rng.normal(size=(2, 3)) for _ in range(4)]
    se = [rng.uniform(0.1, 1.0, size=(2, 3)) for _ in range(4)]
    smoother = PrecisionSmoother(lam)
    for k in range(4):
        got, got_se = smoother.update(S[k], se[k], TASKS, DOMAINS)
        a = [lam ** (k - q) / se[q] ** 2 for q in range(k + 1)]
        np.testing.assert_allclose(got, sum(w * s for w, s in zip(a, S)) / sum(a), rtol=1e-12)
        np.testing.assert_allclose(got_se, np.sqrt(sum(w**2 * e**2 for w, e in zip(a, se))) / sum(a), rtol=1e-12)
    assert PrecisionSmoother(0.0).update(S[0], se[0], TASKS, DOMAINS)[0].tolist() == S[0].tolist()


def test_smoothing_state_round_trips_through_json_and_resume_is_identical():
    model = exact_llama(seed=0)
    cfg = TiKMiXConfig(tikmix_show_progress=False, tikmix_shrink_z=1.0, tikmix_smoothing=0.5)
    stages = [stage_inputs(model, cfg, stage=s, seed=s + 1) for s in range(3)]
    full = TiKMiXDirect()
    full_decisions = [full.decide(x) for x in stages]
    first = TiKMiXDirect()
    first.decide(stages[0])
    saved = json.dumps(first.state_dict(), allow_nan=False)
    resumed = TiKMiXDirect()
    resumed.load_state_dict(json.loads(saved))
    assert resumed.state_dict() == first.state_dict()
    for x, ref in zip(stages[1:], full_decisions[1:]):
        got = resumed.decide(x)
        assert np.array_equal(got.weights, ref.weights)
        assert got.extra["uncertainty"]["smoothed_scores"] == ref.extra["uncertainty"]["smoothed_scores"]
    assert full_decisions[2].extra["uncertainty"]["smoothed_stages"] == 3
    assert resumed.state_dict() == full.state_dict()
    with pytest.raises(ValueError, match="unknown mixer state"):
        TiKMiXDirect().load_state_dict({"bogus": 1})


def test_smoothed_evidence_does_not_look_consistent_when_every_stage_measures_noise(monkeypatch):
    """The radius controller's consistency compares each stage's own S with the evidence before it.

    Two smoothed averages share their past, so over stages of pure noise their directions agree
    with a cosine of about the decay (0.5 here), at the controller's threshold for growing. The
    mixer compares the new stage's raw direction with the accumulated one instead, which averages 0.
    """
    import dataclasses

    import tikmix_hf.mixers.tikmix as mixers
    from tikmix_hf.solvers.trust_radius import gain_direction

    rng = np.random.default_rng(3)
    cfg = TiKMiXConfig(tikmix_show_progress=False, tikmix_smoothing=0.5)
    mixer, prior = TiKMiXDirect(), np.full(4, 0.25)
    seen, smoothed_pairs, last_smoothed = [], [], None
    for stage in range(60):
        result = dataclasses.replace(noise_result(rng, m=4), task_losses={"t0": 3.0 - 0.01 * stage, "t1": 3.0})
        monkeypatch.setattr(mixers, "measure_influence", lambda inputs, result=result, **kw: (result, ""))
        inputs = StageInputs(stage=stage, step=stage, domains=result.domain_names, prior=prior, model=None,
                             optimizer=None, domain_batches={}, validation_batches={}, config=cfg)
        decision = mixer.decide(inputs)
        smoothed = gain_direction(np.asarray(decision.extra["uncertainty"]["smoothed_scores"]), prior)
        if stage > 0:
            consistency = decision.extra["trust_region"]["consistency"]
            expected = float(last_smoothed @ gain_direction(result.scores, prior))
            assert consistency == pytest.approx(expected, abs=1e-12)  # own S against the accumulated S
            seen.append(consistency)
            smoothed_pairs.append(float(last_smoothed @ smoothed))
        last_smoothed = smoothed
    assert abs(np.mean(seen)) < 0.2, np.mean(seen)
    assert np.mean(smoothed_pairs) > 0.3  # what comparing two smoothed directions would have seen


def test_adaptive_budget_in_the_mixer():
    model = exact_llama(seed=0)
    cfg = TiKMiXConfig(tikmix_show_progress=False, tikmix_target_rse=1e-9, tikmix_min_probe_batches=2)
    decision = TiKMiXDirect().decide(stage_inputs(model, cfg, n_batches=5))
    budget = decision.extra["uncertainty"]["adaptive_budget"]
    assert budget["total_batches"] == 15 and {d["stopped"] for d in budget["domains"].values()} == {"max_batches"}
    assert decision.influence.adaptive == budget


# --------------------------------------------------------------------------------------------
# In a real Trainer: the early first decision with the uncertainty switched on
# --------------------------------------------------------------------------------------------


def test_warmup_decision_with_uncertainty_in_a_trainer_run(tmp_path):
    from transformers import Trainer, TrainingArguments

    from tikmix_hf import DomainMixture, TiKMiXCallback
    from tikmix_hf.history import load_history
    from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation

    mixture = DomainMixture(toy_domains(), weights={"pattern": 0.2, "echo": 0.2, "noise": 0.6}, seed=3)
    collator = RecordingCollator()
    config = TiKMiXConfig(tikmix_stage_steps=10, tikmix_warmup_steps=3, tikmix_show_progress=False,
                          tikmix_probe_sequences=16, tikmix_probe_batch_size=4, tikmix_shrink_z=1.0,
                          tikmix_smoothing=0.5, tikmix_influence_source="probes")  # 4 probe batches per domain
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=collator)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0,
        remove_unused_columns=False, dataloader_num_workers=0, lr_scheduler_type="constant",
    )
    trainer = Trainer(model=toy_model(0), args=args, train_dataset=mixture, data_collator=collator)
    callback.bind(trainer)
    trainer.train()
    stages = load_history(tmp_path / "tikmix" / "history.json")["stages"]
    assert [s["step"] for s in stages] == [3, 10]
    for s in stages:
        influence = s["influence"]
        assert np.array(influence["stderr"]).shape == np.array(influence["scores"]).shape
        assert influence["probe_batches"] == {"pattern": 4, "echo": 4, "noise": 4}
        assert s["mixer"]["uncertainty"]["shrink_z"] == 1.0
    assert stages[1]["mixer"]["uncertainty"]["smoothed_stages"] == 2


@pytest.mark.parametrize("target, per_domain", [(1e-12, 6), (1e12, 2)])
def test_adaptive_budget_draws_past_the_stage_draw_in_a_trainer_run(tmp_path, target, per_domain):
    """tikmix_probe_max_sequences: an unreachable target takes every domain to the cap (24 sequences =
    6 micro-batches, three times the stage draw of 8); a target met at once stops at min_probe_batches."""
    from transformers import Trainer, TrainingArguments

    from tikmix_hf import DomainMixture, TiKMiXCallback
    from tikmix_hf.history import load_history
    from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation

    mixture = DomainMixture(toy_domains(), weights="uniform", seed=3)
    config = TiKMiXConfig(tikmix_stage_steps=4, tikmix_show_progress=False, tikmix_probe_sequences=8,
                          tikmix_probe_batch_size=4, tikmix_target_rse=target, tikmix_min_probe_batches=2,
                          tikmix_probe_max_sequences=24)
    collator = RecordingCollator()
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=collator)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=8, learning_rate=3e-3, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0,
        remove_unused_columns=False, dataloader_num_workers=0,
    )
    trainer = Trainer(model=toy_model(0), args=args, train_dataset=mixture, data_collator=collator)
    callback.bind(trainer)
    trainer.train()
    (stage,) = load_history(tmp_path / "tikmix" / "history.json")["stages"]
    assert stage["influence"]["probe_batches"] == {"pattern": per_domain, "echo": per_domain, "noise": per_domain}
    budget = stage["mixer"]["uncertainty"]["adaptive_budget"]
    assert {d["stopped"] for d in budget["domains"].values()} == {"max_batches" if per_domain == 6 else "target"}
    assert budget["total_batches"] == 3 * per_domain


# --------------------------------------------------------------------------------------------
# Two ranks (torchrun, gloo): the all-reduced sums give the one-process standard errors
# --------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_two_ranks_give_the_single_process_stderr(tmp_path):
    from helpers.launch import load_script, torchrun

    dist_uncertainty = load_script("dist_uncertainty")
    torchrun("dist_uncertainty.py", str(tmp_path), timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["world_size"] == 2
    single = dist_uncertainty.measure()
    for key in ("scores", "stderr", "kept_stderr", "adaptive_stderr"):
        np.testing.assert_allclose(np.asarray(ranks[0][key]), np.asarray(single[key]), rtol=1e-6)
    assert ranks[0]["probe_batches"] == single["probe_batches"]
    assert ranks[0]["adaptive_batches"] == single["adaptive_batches"]
    for task, value in single["split_half"].items():
        assert ranks[0]["split_half"][task] == pytest.approx(value, abs=1e-9)

