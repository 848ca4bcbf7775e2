"""The aligned starting mixture: EM against its optimality conditions and brute force, the bigram models
against a plain loop, a planted mixture recovered, and the start of a real Trainer run."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import Trainer, TrainingArguments

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig, load_history
from tikmix_hf.aligned_start import ALIGNMENT_ROUND, aligned_start, token_ids
from tikmix_hf.solvers.alignment import aligned_mixture, em_mixture_weights, task_matches
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation


def _log_likelihood(L, n, u):
    return float(n @ np.log(L @ u))


def test_em_reaches_the_maximum_likelihood_mixture():
    rng = np.random.default_rng(0)
    L = rng.gamma(1.0, size=(300, 5)) * np.array([1.0, 3.0, 0.2, 1.0, 0.5])
    n = rng.integers(1, 4, size=300).astype(float)
    u, iterations = em_mixture_weights(L, n)
    assert u.sum() == pytest.approx(1.0) and (u >= 0).all() and iterations < 5000
    # KKT of max sum n log(L u) on the simplex: the gradient is 1 where u > 0 and at most 1 elsewhere
    grad = ((n / n.sum()) / (L @ u)) @ L
    assert np.all(np.abs(grad[u > 1e-6] - 1) < 1e-6) and np.all(grad[u <= 1e-6] <= 1 + 1e-6)
    best = max(_log_likelihood(L, n, w) for w in rng.dirichlet(np.ones(5), size=5000))
    assert _log_likelihood(L, n, u) >= best - 1e-12


def test_em_refuses_what_has_no_likelihood():
    with pytest.raises(ValueError, match="finite and positive"):
        em_mixture_weights(np.array([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="one count per event"):
        em_mixture_weights(np.ones((3, 2)), np.ones(2))


def _brute_likelihoods(domains, task, smoothing, backoff):
    """Each event of ``task`` (first tokens, then consecutive pairs) under each domain's model, by plain loops."""
    V = 1 + max(max(map(max, g)) for g in (*domains, task))
    events = [(None, s[0]) for s in task] + [(s[t - 1], s[t]) for s in task for t in range(1, len(s))]
    rows = []
    for a, b in events:
        row = []
        for group in domains:
            tokens = [x for s in group for x in s]
            uni = (tokens.count(b) + smoothing) / (len(tokens) + smoothing * V)
            if a is None:
                row.append(uni)
                continue
            pair = sum(1 for s in group for t in range(1, len(s)) if (s[t - 1], s[t]) == (a, b))
            context = sum(1 for s in group for t in range(1, len(s)) if s[t - 1] == a)
            row.append((pair + backoff * uni) / (context + backoff))
        rows.append(row)
    return np.array(rows)


def test_the_bigram_models_match_a_plain_loop():
    rng = np.random.default_rng(1)
    domains = [[rng.integers(0, 6, size=rng.integers(2, 9)).tolist() for _ in range(5)] for _ in range(3)]
    task = [rng.integers(0, 7, size=rng.integers(1, 8)).tolist() for _ in range(6)]  # token 6 unseen in domains
    matches, _ = task_matches(domains, [task], smoothing=0.3, backoff=2.0)
    expected, _ = em_mixture_weights(_brute_likelihoods(domains, task, 0.3, 2.0))
    np.testing.assert_allclose(matches[0], expected, rtol=1e-9, atol=1e-12)


def test_a_planted_mixture_of_two_generators_is_recovered():
    rng = np.random.default_rng(2)

    def counting(n):  # t, t+1, ... mod 20
        return [((rng.integers(20) + np.arange(32)) % 20).tolist() for _ in range(n)]

    def backwards(n):  # t, t-1, ... mod 20: the same tokens, equally often
        return [((rng.integers(20) - np.arange(32)) % 20).tolist() for _ in range(n)]

    domains = [counting(64), backwards(64)]
    task = counting(30) + backwards(70)
    (u,), _ = task_matches(domains, [task])
    np.testing.assert_allclose(u, [0.3, 0.7], atol=0.02)  # a unigram model could not: the tokens are the same


def test_the_start_blends_the_base_with_the_tasks_mean_match():
    rng = np.random.default_rng(3)
    domains = [[rng.integers(0, 5, size=10) for _ in range(4)], [rng.integers(5, 10, size=10) for _ in range(4)]]
    tasks = [[rng.integers(0, 5, size=10)], [rng.integers(0, 10, size=10)]]
    result = aligned_mixture(domains, tasks, [0.9, 0.1], share=0.4)
    np.testing.assert_allclose(result.weights, 0.6 * np.array([0.9, 0.1]) + 0.4 * result.matches.mean(axis=0))
    assert result.matches[0, 0] > 0.99  # the first task's tokens exist only in the first domain
    np.testing.assert_allclose(aligned_mixture(domains, tasks, [0.9, 0.1], share=0.0).weights, [0.9, 0.1])
    with pytest.raises(ValueError, match="share must lie in"):
        aligned_mixture(domains, tasks, [0.9, 0.1], share=1.5)
    with pytest.raises(ValueError, match="base must be a mixture"):
        aligned_mixture(domains, tasks, [0.9, 0.3])
    with pytest.raises(ValueError, match="tasks at positions \\[1\\] have no tokens"):
        task_matches(domains, [tasks[0], [np.zeros(0, int)]])


def test_a_run_starts_from_the_aligned_mixture_and_records_how(tmp_path):
    start = {"pattern": 0.2, "echo": 0.2, "noise": 0.6}
    mixture = DomainMixture(toy_domains(), weights=start, seed=3)
    config = TiKMiXConfig(tikmix_initial_weights="aligned", tikmix_alignment_sequences=32, tikmix_stage_steps=4,
                          tikmix_show_progress=False)
    callback = TiKMiXCallback(mixture, toy_validation(), config)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, use_cpu=True,
                             report_to="none", save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=toy_model(0), args=args, train_dataset=mixture, data_collator=RecordingCollator())
    callback.bind(trainer)
    trainer.train()
    history = load_history(tmp_path / "tikmix" / "history.json")
    # the same sample by hand: the mixture's probe round for the start, the first 32 validation examples
    by_hand = DomainMixture(toy_domains(), weights=start, seed=3)
    expected, _ = aligned_start(by_hand, {"held_out_pattern": toy_validation()["held_out_pattern"][:32]},
                                sequences=32, share=0.5)
    assert history["initial_weights"] == pytest.approx(expected, abs=1e-12)
    assert history["stages"][0]["weights_before"] == pytest.approx(expected, abs=1e-12)
    # the counting task is explained by the counting domain, not by its same-token echoes, nor by noise
    matches = history["alignment"]["task_matches"]["held_out_pattern"]
    assert matches["pattern"] > 0.9 and matches["noise"] < 0.01
    assert expected["pattern"] > start["pattern"] and expected["noise"] < start["noise"]
    assert history["alignment"]["sequences_per_domain"] == 32 and history["alignment"]["seconds"] > 0
    probes = by_hand.probe("pattern", 32, round=ALIGNMENT_ROUND)
    assert history["alignment"]["domain_tokens"]["pattern"] == sum(token_ids(e).size for e in probes)

