"""Baseline mixers (static, ODM, DoReMi, DoGE): their update rules against hand-computed examples
from the papers' equations, their measurements against brute force, and each one in a real Trainer
run that resumes exactly and moves the toy's mixture the way its method says it should."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig
from tikmix_hf.history import load_history
from tikmix_hf.mixers import (
    MIXERS,
    DoGEMixer,
    DoReMiMixer,
    ODMMixer,
    StageInputs,
    StaticMixer,
    build_mixer,
    probe_losses,
)
from tikmix_hf.solvers import (
    doge_update,
    doremi_update,
    odm_exploration_rate,
    odm_policy,
    odm_update_rewards,
    running_average,
    temperature_weights,
)
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation

# DoReMi and DoGE collapse the toy's mixture onto pattern within a few stages, as they should here.
pytestmark = [pytest.mark.filterwarnings("ignore:TiKMiX stage .* collapsing:UserWarning"),
              pytest.mark.usefixtures("one_thread")]

DOMAINS = ["pattern", "echo", "noise"]
START = {"pattern": 0.2, "echo": 0.2, "noise": 0.6}
STAGE, STEPS, CKPT = 2, 8, 3  # decisions at steps 2, 4, 6; the split run stops at step 3 (between stages)



# ============================================================================================
# Update rules, against the papers' equations worked out by hand


def test_static_rules():
    # the natural mixture (T = 1) and equal sizes (any T) are the two static mixtures the config names
    np.testing.assert_allclose(temperature_weights([100, 300], 1.0), [0.25, 0.75], rtol=1e-15)
    np.testing.assert_allclose(temperature_weights([5, 5, 5, 5], 3.0), [0.25] * 4, rtol=1e-15)
    # w ∝ n^(1/T): T=2 on sizes 100, 400 -> sqrt -> 10, 20 -> 1/3, 2/3
    np.testing.assert_allclose(temperature_weights([100, 400], 2.0), [1 / 3, 2 / 3], rtol=1e-14)
    # T=3 on 1, 8, 27 -> cube roots 1, 2, 3 -> 1/6, 2/6, 3/6
    np.testing.assert_allclose(temperature_weights([1, 8, 27], 3.0), [1 / 6, 2 / 6, 3 / 6], rtol=1e-14)
    # T=1 is the natural mixture; sizes or natural weights give the same answer
    np.testing.assert_allclose(temperature_weights([1, 3], 1.0), [0.25, 0.75], rtol=1e-15)
    np.testing.assert_allclose(temperature_weights([0.25, 0.75], 4.0), temperature_weights([100, 300], 4.0), rtol=1e-14)
    with pytest.raises(ValueError, match="temperature=0"):
        temperature_weights([1, 2], 0)
    with pytest.raises(ValueError, match="negative"):
        temperature_weights([1, -2], 1.0)


def test_odm_exploration_rate_is_min_of_one_over_k_and_sqrt_schedule():
    # eps_t = min(1/K, sqrt(ln K / (K t))); K = 3: ln 3 / 3 = 0.366204 -> t <= 3 is capped at 1/3
    assert odm_exploration_rate(1, 3) == pytest.approx(1 / 3, rel=1e-15)
    assert odm_exploration_rate(3, 3) == pytest.approx(1 / 3, rel=1e-15)
    assert odm_exploration_rate(4, 3) == pytest.approx(math.sqrt(math.log(3) / 12), rel=1e-15)  # 0.302574
    assert odm_exploration_rate(10, 3) == pytest.approx(0.19136459866514058, rel=1e-12)  # sqrt(1.098612 / 30)
    # K = 2, t = 8: sqrt(ln 2 / 16) = sqrt(0.0433217) = 0.208139
    assert odm_exploration_rate(8, 2) == pytest.approx(0.20813865278942442, rel=1e-12)
    # a smaller initial rate caps the schedule; one above 1/K is refused
    assert odm_exploration_rate(1, 3, initial=0.1) == 0.1
    with pytest.raises(ValueError, match="exceeds 1/K"):
        odm_exploration_rate(1, 3, initial=0.5)
    with pytest.raises(ValueError, match="t=0"):
        odm_exploration_rate(0, 3)


def test_odm_smoothed_reward_and_policy_by_hand():
    # Full information (every domain's loss measured): R <- 0.9 R + 0.1 L
    #   R = [1, 2], L = [3, 1]  ->  R = [0.9 + 0.3, 1.8 + 0.1] = [1.2, 1.9]
    R = odm_update_rewards([1.0, 2.0], [3.0, 1.0], alpha=0.9)
    np.testing.assert_allclose(R, [1.2, 1.9], rtol=1e-15)
    # Policy, K = 2, eps_prev = 1/2 (the initial rate), eps_t = 0.208139 (t = 8):
    #   softmax(0.5 * [1.2, 1.9]) = softmax([0.6, 0.95]) = [1, e^0.35] / (1 + e^0.35) = [0.413382, 0.586618]
    #   pi = (1 - 2 * 0.208139) * softmax + 0.208139 = [0.449439, 0.550561]
    pi = odm_policy(R, eps=0.20813865278942442, eps_prev=0.5)
    np.testing.assert_allclose(pi, [0.44943935345013936, 0.5505606465498606], rtol=1e-12)
    assert pi.sum() == pytest.approx(1.0, abs=1e-15)
    # At eps_t = 1/K the policy is uniform whatever the rewards (1 - K eps = 0)
    np.testing.assert_allclose(odm_policy([5.0, -3.0, 0.0], eps=1 / 3, eps_prev=1 / 3), [1 / 3] * 3, rtol=1e-14)
    # Bandit feedback as in ODM: only domain 0 was sampled (pi = 0.25) with loss 2 -> reward 2 / 0.25 = 8
    #   R = 0.9 * [0.5, 0.5] + 0.1 * [8, 0] = [1.25, 0.45]
    R_iw = odm_update_rewards([0.5, 0.5], [2.0, 0.0], alpha=0.9, policy=[0.25, 0.75])
    np.testing.assert_allclose(R_iw, [1.25, 0.45], rtol=1e-15)
    with pytest.raises(ValueError, match="alpha=1"):
        odm_update_rewards([0.0], [1.0], alpha=1)


def test_doremi_step_by_hand():
    # excess loss: max(proxy - ref, 0) = max([2, 3, 1] - [1.5, 3.5, 1], 0) = [0.5, 0, 0]
    lam = np.maximum(np.array([2.0, 3.0, 1.0]) - np.array([1.5, 3.5, 1.0]), 0.0)  # as DoReMiMixer measures it
    np.testing.assert_array_equal(lam, [0.5, 0.0, 0.0])
    # alpha' = alpha * exp(eta * lambda) = [0.5 e^0.5, 0.25, 0.25] = [0.824361, 0.25, 0.25]
    #   normalised: / 1.324361 -> [0.622459, 0.188770, 0.188770]
    #   smoothed with c = 0.1: 0.9 * alpha' + 0.1 / 3 -> [0.593547, 0.203227, 0.203227]
    w = doremi_update([0.5, 0.25, 0.25], lam, eta=1.0, smoothing=0.1)
    np.testing.assert_allclose(w, [0.5935467314150025, 0.20322663429249876, 0.20322663429249876], rtol=1e-12)
    # no smoothing, eta = 2: [0.5 e, 0.25, 0.25] / (0.5 e + 0.5) = [e / (e + 1), 1 / (2 (e + 1)) x 2]
    e = math.e
    np.testing.assert_allclose(doremi_update([0.5, 0.25, 0.25], lam, eta=2.0, smoothing=0.0),
                               [e / (e + 1), 0.5 / (e + 1), 0.5 / (e + 1)], rtol=1e-14)
    # DoReMi reports the average of the weights over the updates: (avg * n + w) / (n + 1)
    #   after one update at uniform: ([1/3] * 3 + w) / 2 = [0.463440, 0.268280, 0.268280]
    avg = running_average([1 / 3] * 3, 1, w)
    np.testing.assert_allclose(avg, [0.46344003237416787, 0.26827998381291607, 0.26827998381291607], rtol=1e-12)
    np.testing.assert_array_equal(running_average(None, 0, w), w)
    with pytest.raises(ValueError, match="excess_loss"):
        doremi_update([0.5, 0.5], [-1.0, 0.0])


def test_doge_step_by_hand():
    # W = [2, -1], ||g|| = [1, 3] -> mean norm 2 -> W_hat = [1, -0.5] -> clip [0, 5] -> [1, 0]
    # log w += 1 * W_hat from [0.5, 0.5]: [0.5 e, 0.5] / (0.5 e + 0.5) = [e / (e + 1), 1 / (e + 1)]
    #                                                                  = [0.731059, 0.268941]
    w, scores = doge_update([0.5, 0.5], [2.0, -1.0], [1.0, 3.0], eta=1.0)
    np.testing.assert_allclose(scores, [1.0, 0.0], atol=1e-6)  # the 1e-6 of DoGE's norm epsilon
    np.testing.assert_allclose(w, [math.e / (math.e + 1), 1 / (math.e + 1)], rtol=1e-6)
    # Upper clip: W = [12, 3, -6], ||g|| = [1, 2, 3] (mean 2) -> [6, 1.5, -3] -> clip -> [5, 1.5, 0]
    #   eta = 2: [0.2 e^10, 0.3 e^3, 0.5] normalised = [0.998521, 0.001366, 0.000113]
    w3, s3 = doge_update([0.2, 0.3, 0.5], [12.0, 3.0, -6.0], [1.0, 2.0, 3.0], eta=2.0)
    np.testing.assert_allclose(s3, [5.0, 1.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(w3, [0.9985208703444018, 0.0013657977121482082, 0.00011333194345002771], rtol=1e-5)
    # without the clip a negative alignment pushes the weight down
    w_free, _ = doge_update([0.5, 0.5], [2.0, -1.0], [1.0, 3.0], eta=1.0, clip=None)
    assert w_free[1] < 1 / (math.e + 1)


# ============================================================================================
# Measurements, against brute force


def _collate(examples):
    return RecordingCollator()(examples)


def _probe_batches(n=4, per_batch=2):
    domains = toy_domains(seed=7)
    return {d: [_collate(domains[d][i : i + per_batch]) for i in range(0, n, per_batch)] for d in DOMAINS}


def _inputs(model, batches, validation=None, prior=(0.2, 0.2, 0.6), step=10, **config):
    return StageInputs(stage=0, step=step, domains=list(batches), prior=np.array(prior), model=model, optimizer=None,
                       domain_batches=batches, validation_batches=validation or {},
                       config=TiKMiXConfig(tikmix_show_progress=False, **config))


def test_probe_losses_and_excess_match_brute_force():
    model, reference = toy_model(0), toy_model(1)
    batches = _probe_batches()
    measured = probe_losses(model, batches, reference)
    for j, d in enumerate(DOMAINS):
        tok, ref_tok = [], []
        with torch.no_grad():
            for b in batches[d]:
                for net, out in ((model, tok), (reference, ref_tok)):
                    logits = net(input_ids=b["input_ids"]).logits[:, :-1]
                    out.append(torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1), reduction="none"))
        tok, ref_tok = torch.cat(tok).double(), torch.cat(ref_tok).double()
        assert measured.tokens[j] == tok.numel() == 2 * 2 * 15
        assert measured.losses[j] == pytest.approx(tok.mean().item(), rel=1e-6)
        assert measured.reference[j] == pytest.approx(ref_tok.mean().item(), rel=1e-6)
        # DoReMi clips per token before averaging (not max(mean - mean, 0))
        assert measured.excess[j] == pytest.approx((tok - ref_tok).clamp(min=0).mean().item(), rel=1e-6)
    # one batch per domain: the same as the model's own (mean) loss
    single = probe_losses(model, {"p": batches["pattern"][:1]})
    assert single.losses[0] == pytest.approx(model(**batches["pattern"][0]).loss.item(), rel=1e-6)
    assert model.training  # flags restored


def test_doge_mixer_alignment_and_norms_match_brute_force():
    model = toy_model(0)
    batches = _probe_batches()
    val = {"held_out_pattern": [_collate(toy_validation()["held_out_pattern"][:4])]}

    def grad(batch_list):
        model.zero_grad()
        tokens = sum((b["labels"][:, 1:] != -100).sum().item() for b in batch_list)
        loss = sum(model(**b).loss * (b["labels"][:, 1:] != -100).sum() for b in batch_list) / tokens
        loss.backward()
        out = torch.cat([p.grad.flatten().double() for p in model.parameters()])
        model.zero_grad()
        return out

    g_val = grad(val["held_out_pattern"])
    g = {d: grad(batches[d]) for d in DOMAINS}
    decision = DoGEMixer().decide(_inputs(model, batches, val, prior=(1 / 3, 1 / 3, 1 / 3), tikmix_doge_eta=0.5))
    for d in DOMAINS:
        assert decision.extra["alignment"][d] == pytest.approx(torch.dot(g_val, g[d]).item(), rel=1e-4, abs=1e-7)
        assert decision.extra["gradient_norms"][d] == pytest.approx(g[d].norm().item(), rel=1e-5)
    expected, _ = doge_update([1 / 3] * 3, [decision.extra["alignment"][d] for d in DOMAINS],
                              [decision.extra["gradient_norms"][d] for d in DOMAINS], eta=0.5)
    np.testing.assert_allclose(decision.weights, expected, rtol=1e-12)
    assert decision.influence is not None and decision.influence.domain_gradients is None  # freed


# ============================================================================================
# Mixers: registry, state, direct calls


def test_registry_names_and_build():
    for name, cls in {"static": StaticMixer, "odm": ODMMixer, "doremi": DoReMiMixer, "doge": DoGEMixer}.items():
        assert MIXERS[name] is cls
        mixer = build_mixer(TiKMiXConfig(tikmix_solver=name))
        assert isinstance(mixer, cls) and mixer.name == name


def test_mixer_state_is_json_and_round_trips():
    model, batches = toy_model(0), _probe_batches()
    odm = ODMMixer()
    first = odm.decide(_inputs(model, batches, step=4))
    state = json.loads(json.dumps(odm.state_dict()))
    twin = ODMMixer()
    twin.load_state_dict(state)
    assert twin.state_dict() == odm.state_dict()
    # the same next decision from the restored state
    np.testing.assert_array_equal(twin.decide(_inputs(model, batches, step=6)).weights,
                                  odm.decide(_inputs(model, batches, step=6)).weights)
    assert first.extra["updates"] == 1 and odm.updates == 2
    with pytest.raises(ValueError, match="unknown keys"):
        ODMMixer().load_state_dict({"rewards": [0.0], "bogus": 1})
    other = ODMMixer()
    other.load_state_dict({"rewards": [0.0, 0.0], "eps_prev": 0.5, "updates": 1})
    with pytest.raises(ValueError, match="2 entries but this run has 3 domains"):
        other.decide(_inputs(model, batches))


def test_odm_mixer_first_decision_by_hand():
    # step 4, K = 3: eps_4 = sqrt(ln 3 / 12) = 0.302574, eps_prev = 1/3, R = 0.1 * L (R starts at 0)
    model, batches = toy_model(0), _probe_batches()
    losses = probe_losses(model, batches).losses
    decision = ODMMixer().decide(_inputs(model, batches, step=4, tikmix_odm_alpha=0.9))
    eps = math.sqrt(math.log(3) / 12)
    soft = np.exp(losses / 30) / np.exp(losses / 30).sum()  # exp(eps_prev * 0.1 L) = exp(L / 30)
    np.testing.assert_allclose(decision.weights, (1 - 3 * eps) * soft + eps, rtol=1e-12)
    assert decision.extra["exploration"] == pytest.approx(eps, rel=1e-15)
    with pytest.raises(ValueError, match="tikmix_odm_exploration=0.5 exceeds 1/K"):
        ODMMixer().decide(_inputs(model, batches, tikmix_odm_exploration=0.5))


def test_doremi_mixer_needs_a_reference():
    model, batches = toy_model(0), _probe_batches()
    with pytest.raises(ValueError, match="tikmix_reference_model"):
        DoReMiMixer().decide(_inputs(model, batches))
    with pytest.raises(TypeError, match="reference_model must be a torch.nn.Module"):
        DoReMiMixer(reference_model="path")
    # a model object works, and the step is the DoReMi rule on the per-token clipped excess
    reference = toy_model(1)
    decision = DoReMiMixer(reference_model=reference).decide(_inputs(model, batches, tikmix_doremi_smoothing=0.0))
    excess = probe_losses(model, batches, reference).excess
    np.testing.assert_allclose(decision.weights, doremi_update([0.2, 0.2, 0.6], excess, 1.0, 0.0), rtol=1e-12)


# ============================================================================================
# In a Trainer: exact resume, and the toy's direction


def _reference_dir(tmp_path_factory):
    """A reference model trained on ``pattern`` only (DoReMi's reference), saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("reference")
    ref = toy_model(1)
    data = toy_domains(seed=5)["pattern"]
    opt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    for i in range(40):
        batch = _collate(data[(i * 8) % 256 : (i * 8) % 256 + 8])
        ref(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    ref.save_pretrained(str(folder))
    return str(folder)


CONFIGS = {
    "static": dict(tikmix_temperature=2.0),
    "odm": dict(tikmix_initial_weights="uniform"),
    "doremi": dict(),  # + tikmix_reference_model
    "doge": dict(),
}


def _run(out, solver, reference, *, max_steps=STEPS, resume=None):
    config = TiKMiXConfig(tikmix_solver=solver, tikmix_stage_steps=STAGE, tikmix_show_progress=False,
                          tikmix_probe_sequences=8, tikmix_validation_sequences=8,
                          tikmix_reference_model=reference if solver == "doremi" else None, **CONFIGS[solver])
    mixture = DomainMixture(toy_domains(), weights=START, seed=3)
    collator, probe_collator = RecordingCollator(), RecordingCollator()
    probe_collator.recording = False
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=probe_collator)
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=3e-3, use_cpu=True,
        report_to="none", save_strategy="steps", save_steps=CKPT, logging_steps=100, disable_tqdm=True, seed=0,
        remove_unused_columns=False, dataloader_num_workers=0, lr_scheduler_type="constant", ignore_data_skip=True,
    )
    trainer = Trainer(model=toy_model(0), args=args, train_dataset=mixture, data_collator=collator,
                      callbacks=[callback])
    callback.bind(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return callback, collator, mixture


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Uninterrupted runs, one per solver, made once and shared by the tests below."""
    cache: dict[str, tuple] = {}
    reference = _reference_dir(tmp_path_factory)

    def get(solver):
        if solver not in cache:
            out = tmp_path_factory.mktemp(f"full-{solver}")
            cache[solver] = (out, reference, *_run(out, solver, reference))
        return cache[solver]

    return get


@pytest.mark.parametrize("solver", ["static", "odm", "doremi", "doge"])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, full_run, solver):
    out_full, reference, cb_full, col_full, mix_full = full_run(solver)
    assert [s["step"] for s in cb_full.history] == [2, 4, 6]
    _, col_head, _ = _run(tmp_path, solver, reference, max_steps=CKPT)
    ckpt = tmp_path / f"checkpoint-{CKPT}"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["TiKMiXCallback"]
    mixer_saved = saved["attributes"]["tikmix"]["mixer"]
    assert mixer_saved["name"] == solver and saved["attributes"]["tikmix"]["stage"] == 1
    cb_res, col_res, mix_res = _run(tmp_path, solver, reference, resume=str(ckpt))
    # the mixer's memory and the weight swaps are those of the uninterrupted run, to the bit
    assert cb_res.mixer.state_dict() == cb_full.mixer.state_dict()
    assert mix_res.swaps == mix_full.swaps
    full_hist = load_history(out_full / "tikmix" / "history.json")["stages"]
    res_hist = load_history(tmp_path / "tikmix" / "history.json")["stages"]
    assert [h["weights_after"] for h in res_hist] == [h["weights_after"] for h in full_hist]
    assert [h["mixer"] for h in res_hist] == [h["mixer"] for h in full_hist]
    # the same samples in the same order (the head run's last batch is the DataLoader's look-ahead,
    # drawn but not trained on; the resumed run starts with it)
    assert col_head.seen[: CKPT * 8] + col_res.seen == col_full.seen


def test_static_keeps_the_temperature_weights(full_run):
    *_, cb, _, mixture = full_run("static")
    # START^(1/2) normalised: [sqrt .2, sqrt .2, sqrt .6] / (2 sqrt .2 + sqrt .6)
    #   = [1, 1, sqrt 3] / (2 + sqrt 3) = [2 - sqrt 3, 2 - sqrt 3, 2 sqrt 3 - 3] = [0.267949, 0.267949, 0.464102]
    expected = {"pattern": 2 - math.sqrt(3), "echo": 2 - math.sqrt(3), "noise": 2 * math.sqrt(3) - 3}
    for stage in cb.history:
        assert stage["weights_after"] == pytest.approx(expected, rel=1e-12)
        assert stage["status"] == "converged"
    assert [w for _, w in mixture.swaps[1:]] == [cb.history[0]["weights_after"]] * 3


def test_odm_moves_weight_toward_the_highest_loss_domain(full_run):
    """ODM optimises the training loss: weight goes to the domains the model finds hardest."""
    *_, cb, _, _ = full_run("odm")
    first, *_, last = cb.history
    # t = 2, K = 3: eps_2 = min(1/3, sqrt(ln 3 / 6) = 0.428) = 1/3, so the first policy is exactly uniform
    assert first["weights_after"] == pytest.approx({d: 1 / 3 for d in DOMAINS}, rel=1e-14)
    rewards = last["mixer"]["reward_estimates"]
    weights = last["weights_after"]
    assert sorted(DOMAINS, key=weights.get) == sorted(DOMAINS, key=rewards.get)
    hardest = max(DOMAINS, key=rewards.get)
    assert weights[hardest] > 1 / 3 and hardest != "pattern"
    # the learnable domain has the lowest loss by the end, so ODM gives it the least weight
    assert min(DOMAINS, key=last["mixer"]["losses"].get) == "pattern" == min(DOMAINS, key=weights.get)


def test_doremi_raises_the_weight_of_domains_with_excess_loss(full_run):
    *_, cb, _, _ = full_run("doremi")
    first = cb.history[0]
    excess = first["mixer"]["excess_loss"]
    # the reference was trained on pattern only: the proxy is furthest behind it on pattern
    assert max(DOMAINS, key=excess.get) == "pattern" and excess["pattern"] > 0
    ratio = {d: first["weights_after"][d] / first["weights_before"][d] for d in DOMAINS}
    assert sorted(DOMAINS, key=ratio.get) == sorted(DOMAINS, key=excess.get)  # exp(eta lambda) is monotone
    assert ratio["pattern"] > 1 > ratio[min(DOMAINS, key=excess.get)]
    # the reported average is the mean of the weights over the updates (DoReMi's output)
    mean = {d: np.mean([s["weights_after"][d] for s in cb.history]) for d in DOMAINS}
    assert cb.history[-1]["mixer"]["average_weights"] == pytest.approx(mean, rel=1e-12)


def test_doge_moves_weight_toward_the_validation_domain(full_run):
    *_, cb, _, _ = full_run("doge")
    first, last = cb.history[0], cb.history[-1]
    assert first["mixer"]["alignment"]["pattern"] > first["mixer"]["alignment"]["noise"]
    assert first["influence"]["preconditioner"] == "identity"
    assert last["weights_after"]["pattern"] > START["pattern"] and last["weights_after"]["noise"] < START["noise"]
    assert max(DOMAINS, key=last["weights_after"].get) == "pattern"


# ============================================================================================
# Configuration


def test_a_missing_reference_folder_is_refused_when_training_starts_not_in_the_config(tmp_path):
    # A saved config must rebuild on a machine without the folder; DoReMi checks it when it is used.
    config = TiKMiXConfig(tikmix_solver="doremi", tikmix_reference_model="/no/such/folder", tikmix_stage_steps=STAGE,
                          tikmix_show_progress=False)
    assert TiKMiXConfig(**dataclasses.asdict(config)) == config
    mixture = DomainMixture(toy_domains(), weights=START, seed=3)
    trainer = Trainer(model=toy_model(0), args=TrainingArguments(output_dir=str(tmp_path), max_steps=4, use_cpu=True,
                                                                 report_to="none", save_strategy="no"),
                      train_dataset=mixture, data_collator=RecordingCollator())
    TiKMiXCallback(mixture, toy_validation(), config, trainer=trainer)
    with pytest.raises(ValueError, match="tikmix_reference_model='/no/such/folder': no such folder"):
        trainer.train()
    assert trainer.state.global_step == 0
