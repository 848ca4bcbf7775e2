"""Group Influence (paper Eq. 8) and the look-ahead target against brute-force fp64 references.

Every fast path of ``tikmix_hf.influence`` is checked against a plain dense computation: full
flattened gradients per domain and task, dense diagonal preconditioners built by hand, and an
explicitly stepped deep copy of the model for the look-ahead.
"""

from __future__ import annotations

import copy
import json
import random
import re

import numpy as np
import pytest
import torch
from helpers.reference import reference_summed_loss as manual_summed_loss

from tikmix_hf._loss import IGNORE_INDEX
from tikmix_hf.influence import (
    InfluenceResult,
    Lookahead,
    PreconditionerFallbackWarning,
    group_influence,
    lookahead_gain,
)
from tikmix_hf.testing import exact_llama, named_batches, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-10
DOMAINS = ("code", "law", "news")
TASKS = ("arc", "wiki")


# --------------------------------------------------------------------------------------------
# Brute-force references (independent of the implementation: own loss, own flattening)
# --------------------------------------------------------------------------------------------


def dense_mean_loss(model, batches):
    total, count = 0.0, 0
    for batch in batches:
        loss, n = manual_summed_loss(model, batch)
        total, count = total + loss, count + n
    return total / count


def dense_gradient(model, batches, names=None):
    """Flattened gradient of the mean token loss over all ``batches`` (one big autograd call)."""
    params = [p for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)]
    grads = torch.autograd.grad(dense_mean_loss(model, batches), params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def reference_model(model):
    reference = copy.deepcopy(model)
    reference.eval()  # no dropout, like the pass
    return reference


def dense_matrices(model, domains, tasks, names=None):
    reference = reference_model(model)
    V = torch.stack([dense_gradient(reference, b, names) for b in tasks.values()])
    G = torch.stack([dense_gradient(reference, b, names) for b in domains.values()])
    return V, G


def dense_adam_diagonal(model, optimizer, names=None):
    parts = []
    for n, p in model.named_parameters():
        if not p.requires_grad or (names is not None and n not in names):
            continue
        state = optimizer.state[p]
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        beta2, eps = group["betas"][1], group["eps"]
        moment = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        v_hat = moment / (1 - beta2 ** float(state["step"]))
        parts.append((1.0 / (v_hat.sqrt() + eps)).reshape(-1))
    return torch.cat(parts)


def dense_fisher(model, domains):
    """Mean over probe micro-batches of the squared gradient of each micro-batch's mean token loss."""
    reference = reference_model(model)
    squares = [dense_gradient(reference, [b]) ** 2 for bs in domains.values() for b in bs]
    return torch.stack(squares).mean(0)


def assert_close(actual, expected, rtol=RTOL, atol_scale=1e-12):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    atol = atol_scale * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def trained_adamw(model, steps=3, amsgrad=False, seed=7):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=amsgrad)
    for batch in token_batches(steps, seed=seed):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def run(model, domains, tasks, **kwargs):
    return group_influence(model, domains, tasks, show_progress=False, **kwargs)



@pytest.fixture(scope="module")
def data():
    domains = named_batches(DOMAINS, 2, seed=1)
    domains["news"] = domains["news"] + token_batches(1, seed=99)  # uneven batch counts
    tasks = named_batches(TASKS, 2, seed=2)
    return domains, tasks


@pytest.fixture()
def model():
    return exact_llama(seed=0)


@pytest.fixture(scope="module")
def dense(data):
    domains, tasks = data
    return dense_matrices(exact_llama(seed=0), domains, tasks)


# --------------------------------------------------------------------------------------------
# Exactness against the dense references
# --------------------------------------------------------------------------------------------


def test_identity_matches_dense_gradients(model, data, dense):
    domains, tasks = data
    V, G = dense
    result = run(model, domains, tasks)
    assert isinstance(result, InfluenceResult)
    assert result.scores.dtype == np.float64 and result.scores.shape == (2, 3)
    assert result.task_names == list(TASKS) and result.domain_names == list(DOMAINS)
    assert result.preconditioner == "identity" and result.preconditioner_fallback is None
    assert_close(result.scores, (V @ G.T).numpy())
    reference = reference_model(model)
    for name, batches in tasks.items():
        assert result.task_tokens[name] == sum(manual_summed_loss(reference, b)[1] for b in batches)
        expected = dense_mean_loss(reference, batches).item()
        assert result.task_losses[name] == pytest.approx(expected, rel=1e-12)
    for name, batches in domains.items():
        assert result.domain_tokens[name] == sum(manual_summed_loss(reference, b)[1] for b in batches)
    assert result.num_parameters == V.shape[1]


def test_loss_is_token_mean_as_hugging_face_defines_it(model, data):
    """Our loss equals HF's own causal-LM loss (fp32 inside HF), token-weighted over batches."""
    _, tasks = data
    result = run(model, {"d": tasks["arc"]}, tasks)
    reference = reference_model(model)
    with torch.no_grad():
        total = sum(reference(**b).loss.double() * manual_summed_loss(reference, b)[1] for b in tasks["wiki"])
    assert result.task_losses["wiki"] == pytest.approx(float(total) / result.task_tokens["wiki"], rel=1e-6)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_matches_dense_diagonal(model, data, amsgrad):
    domains, tasks = data
    optimizer = trained_adamw(model, amsgrad=amsgrad)
    V, G = dense_matrices(model, domains, tasks)
    D = dense_adam_diagonal(model, optimizer)
    result = run(model, domains, tasks, preconditioner="adam", optimizer=optimizer)
    assert result.preconditioner == "adam" and result.preconditioner_fallback is None
    assert_close(result.scores, ((V * D) @ G.T).numpy())


def test_adam_through_accelerated_optimizer(model, data):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, GradientState

    domains, tasks = data
    optimizer = trained_adamw(model)
    expected = run(model, domains, tasks, preconditioner="adam", optimizer=optimizer).scores
    try:
        wrapped = Accelerator(cpu=True).prepare_optimizer(optimizer)
        result = run(model, domains, tasks, preconditioner="adam", optimizer=wrapped)
    finally:  # the accelerate singletons must not leak into other tests
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert isinstance(wrapped, AcceleratedOptimizer) and result.preconditioner == "adam"
    np.testing.assert_array_equal(result.scores, expected)


def _adafactor(model):
    from transformers.optimization import Adafactor

    optimizer = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=False)
    for batch in token_batches(1, seed=3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _sgd(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    model(**token_batches(1)[0]).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda m: None, "no optimizer was passed"),
        (lambda m: torch.optim.AdamW(m.parameters()), "has not taken a step"),
        (_sgd, "keeps no 'exp_avg_sq'"),
        (_adafactor, "keeps no 'exp_avg_sq'"),
    ],
    ids=["none", "adamw-step-0", "sgd", "adafactor"],
)
def test_adam_falls_back_to_identity_with_a_warning(model, data, dense, make, reason):
    domains, tasks = data
    optimizer = make(model)
    state_before = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    with pytest.warns(PreconditionerFallbackWarning, match=re.escape(reason)):
        result = run(model, domains, tasks, preconditioner="adam", optimizer=optimizer)
    assert result.preconditioner == "identity" and result.requested_preconditioner == "adam"
    assert reason in result.preconditioner_fallback
    if optimizer is None or isinstance(optimizer, torch.optim.AdamW):
        V, G = dense
        assert_close(result.scores, (V @ G.T).numpy())
    else:
        assert _state_equal(optimizer.state_dict(), state_before)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("damping", [None, 1e-3])
def test_diag_fisher_matches_dense_loop(model, data, dense, keep, damping):
    domains, tasks = data
    V, G = dense
    fisher = dense_fisher(model, domains)
    used = 0.1 * float(fisher.mean()) if damping is None else damping
    result = run(
        model, domains, tasks, preconditioner="diag_fisher", damping=damping, keep_domain_gradients=keep
    )
    assert result.preconditioner == "diag_fisher"
    assert result.damping == pytest.approx(used, rel=1e-12)
    assert_close(result.scores, ((V / (fisher + used)) @ G.T).numpy())


@pytest.mark.parametrize(
    "param_filter",
    [["mlp"], lambda name, p: name.startswith("model.layers.1.") or name == "lm_head.weight"],
    ids=["substrings", "callable"],
)
def test_param_filter_matches_restricted_dense(model, data, param_filter):
    domains, tasks = data
    if callable(param_filter):
        names = {n for n, p in model.named_parameters() if param_filter(n, p)}
    else:
        names = {n for n, _ in model.named_parameters() if any(s in n for s in param_filter)}
    V, G = dense_matrices(model, domains, tasks, names)
    result = run(model, domains, tasks, param_filter=param_filter)
    assert result.num_parameters == V.shape[1] < sum(p.numel() for p in model.parameters())
    assert set(result.parameter_names) == names
    assert_close(result.scores, (V @ G.T).numpy())


def test_projection_is_an_unbiased_estimate_within_its_bound(model, data, dense):
    domains, tasks = data
    V, G = dense
    exact = (V @ G.T).numpy()
    scale = (V.norm(dim=1)[:, None] * G.norm(dim=1)[None, :]).numpy()  # |grad f_i| |g_j|
    errors = {}
    for k in (128, 2048):
        result = run(model, domains, tasks, projection_dim=k, seed=3)
        assert result.projection_dim == k
        # Rademacher JL: the error of one entry has std <= sqrt(2/k) |v_i||g_j|; 5 sigma with a fixed seed.
        assert np.all(np.abs(result.scores - exact) <= 5 * np.sqrt(2 / k) * scale)
        errors[k] = np.abs(result.scores - exact).mean()
    assert errors[2048] < errors[128]
    # Same seed, same projection; the keep path projects the same way as the streaming path.
    again = run(model, domains, tasks, projection_dim=2048, seed=3, keep_domain_gradients=True)
    assert_close(again.scores, result.scores, rtol=1e-9)
    assert not np.allclose(run(model, domains, tasks, projection_dim=2048, seed=4).scores, result.scores)
    # Unbiased: the mean over seeds approaches the exact value (std of the mean shrinks as 1/sqrt(seeds)).
    seeds = 8
    estimates = [run(model, domains, tasks, projection_dim=512, seed=s).scores for s in range(seeds)]
    mean = np.mean(estimates, axis=0)
    assert np.all(np.abs(mean - exact) <= 4 * np.sqrt(2 / 512 / seeds) * scale)


def test_kept_domain_gradients_are_preconditioned_and_consistent(model, data):
    domains, tasks = data
    optimizer = trained_adamw(model)
    V, G = dense_matrices(model, domains, tasks)
    D = dense_adam_diagonal(model, optimizer)
    streamed = run(model, domains, tasks, preconditioner="adam", optimizer=optimizer)
    for keep in (True, "cpu"):
        kept = run(
            model, domains, tasks, preconditioner="adam", optimizer=optimizer, keep_domain_gradients=keep
        )
        assert kept.domain_gradients.shape == G.shape and kept.domain_gradients.device.type == "cpu"
        assert_close(kept.domain_gradients.numpy(), (G * D).numpy())
        assert_close(kept.scores, streamed.scores)
    assert streamed.domain_gradients is None


def test_cpu_memory_is_the_buffers_it_allocates(model, data):
    """(n + 1) gradient buffers when streaming; m more when the domain gradients are kept."""
    domains, tasks = data
    P = sum(p.numel() for p in model.parameters())
    n, m = len(tasks), len(domains)
    assert run(model, domains, tasks).peak_memory_bytes == (n + 1) * P * 8
    assert run(model, domains, tasks, preconditioner="diag_fisher").peak_memory_bytes <= (n + 2) * P * 8
    kept = run(model, domains, tasks, keep_domain_gradients=True)
    assert kept.peak_memory_bytes == (n + m + 1) * P * 8
    # n projected rows, the domain sum, then either a micro-batch gradient or one generated block of
    # the projection (at most largest-parameter rows x k; here 1024 x 64, which exceeds P on this toy).
    projected = run(model, domains, tasks, projection_dim=64)
    assert projected.peak_memory_bytes == (n * 64 + P + max(P, 1024 * 64)) * 8
    assert kept.seconds > 0 and kept.memory_measure == "cpu_buffers"


def test_bfloat16_model_uses_gradient_sized_buffers(data, dense):
    """bf16 buffers by default ((n + 1) x parameter bytes); scores within bf16 precision of fp64."""
    domains, tasks = data
    V, G = dense
    exact = (V @ G.T).numpy()
    model = exact_llama(seed=0, dtype=torch.float32).to(torch.bfloat16)
    P, n = sum(p.numel() for p in model.parameters()), len(tasks)
    result = run(model, domains, tasks)
    assert result.buffer_dtype == "bfloat16" and result.peak_memory_bytes == (n + 1) * P * 2
    assert np.linalg.norm(result.scores - exact) / np.linalg.norm(exact) < 0.03
    wide = run(model, domains, tasks, buffer_dtype=torch.float32)
    assert wide.buffer_dtype == "float32"
    assert np.linalg.norm(wide.scores - exact) / np.linalg.norm(exact) < 0.03
    half = exact_llama(seed=0, dtype=torch.float32).to(torch.float16)
    assert run(half, domains, tasks).buffer_dtype == "float32"  # fp16 cannot hold summed squared gradients
    with pytest.raises(ValueError, match=r"buffer_dtype must be a floating torch.dtype.*torch.int32"):
        run(model, domains, tasks, buffer_dtype=torch.int32)


def test_result_to_dict_is_json_ready(model, data):
    domains, tasks = data
    result = run(model, domains, tasks, keep_domain_gradients=True)
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["scores"] == result.scores.tolist()
    assert payload["domain_tokens"] == result.domain_tokens and payload["has_domain_gradients"] is True
    assert set(payload) >= {"task_losses", "task_tokens", "seconds", "peak_memory_bytes", "preconditioner"}


def test_progress_bar_can_be_shown_and_hidden(model, data, capsys):
    domains, tasks = data
    group_influence(model, domains, tasks, show_progress=True)
    assert "group influence" in capsys.readouterr().err
    group_influence(model, domains, tasks, show_progress=False)
    assert "group influence" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Look-ahead target (TiKMiX-M)
# --------------------------------------------------------------------------------------------


def test_lookahead_matches_a_hand_stepped_copy(model, data):
    domains, tasks = data
    optimizer = trained_adamw(model)
    V, G = dense_matrices(model, domains, tasks)
    directions = G * dense_adam_diagonal(model, optimizer)  # P^{-1} g_j
    result = run(
        model, domains, tasks, preconditioner="adam", optimizer=optimizer, keep_domain_gradients=True
    )
    W = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.2, 0.5, 0.3]])
    step = 0.05
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gains = lookahead_gain(model, result, tasks, W, step_size=step, show_progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored bitwise"
    assert gains.shape == (3, 2) and gains.dtype == np.float64

    expected = np.empty_like(gains)
    base = reference_model(model)
    with torch.no_grad():
        base_losses = [float(dense_mean_loss(base, b)) for b in tasks.values()]
        for k, w in enumerate(W):
            stepped = reference_model(model)
            flat = torch.cat([p.reshape(-1) for p in stepped.parameters()])
            flat -= step * (torch.as_tensor(w) @ directions)
            torch.nn.utils.vector_to_parameters(flat, stepped.parameters())
            stepped_losses = [float(dense_mean_loss(stepped, b)) for b in tasks.values()]
            expected[k] = np.array(base_losses) - np.array(stepped_losses)
    assert_close(gains, expected, rtol=1e-9)



def test_lookahead_on_the_first_sequences_scores_exactly_those_rows(model, data):
    domains, tasks = data  # 2 batches of 2 rows per task
    result = run(model, domains, tasks, keep_domain_gradients=True)
    W = np.array([[1 / 3, 1 / 3, 1 / 3], [0.2, 0.5, 0.3]])
    by_hand = {name: [bs[0], {k: v[:1] for k, v in bs[1].items()}] for name, bs in tasks.items()}
    cut = lookahead_gain(model, result, tasks, W, step_size=0.5, max_sequences=3, show_progress=False)
    np.testing.assert_array_equal(cut, lookahead_gain(model, result, by_hand, W, step_size=0.5, show_progress=False))
    full = lookahead_gain(model, result, tasks, W, step_size=0.5, show_progress=False)
    np.testing.assert_array_equal(
        lookahead_gain(model, result, tasks, W, step_size=0.5, max_sequences=4, show_progress=False), full)
    assert np.abs(cut - full).max() > 1e-6  # the fourth row was left out
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match=rf"max_sequences must be a positive integer.*got {bad!r}"):
            lookahead_gain(model, result, tasks, W, step_size=0.5, max_sequences=bad, show_progress=False)


def test_one_lookahead_scores_like_separate_calls_and_runs_each_forward_once(model, data):
    domains, tasks = data
    result = run(model, domains, tasks, keep_domain_gradients=True)
    W = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.2, 0.5, 0.3]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stepper = Lookahead(model, result, tasks, show_progress=False)
    first = stepper.gains(W[:1], step_size=0.5)
    assert stepper.forwards == 2  # the unmoved model, then the step
    other_step = stepper.gains(W[:1], step_size=0.25)
    assert stepper.forwards == 3  # the unmoved model is not scored again
    rows = stepper.gains(np.vstack([W, W[1:2]]), step_size=0.5)  # row 0 scored before, the last one twice
    assert stepper.forwards == 5
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored bitwise"
    np.testing.assert_array_equal(
        first, lookahead_gain(model, result, tasks, W[:1], step_size=0.5, show_progress=False))
    np.testing.assert_array_equal(
        other_step, lookahead_gain(model, result, tasks, W[:1], step_size=0.25, show_progress=False))
    np.testing.assert_array_equal(rows[:3], lookahead_gain(model, result, tasks, W, step_size=0.5, show_progress=False))
    np.testing.assert_array_equal(rows[3], rows[1])
    with pytest.raises(ValueError, match="step_size must be a finite positive number, got 0.0"):
        stepper.gains(W, step_size=0.0)


def test_lookahead_is_first_order_s_w_for_small_steps_and_nonlinear_for_large(model, data):
    domains, tasks = data
    result = run(model, domains, tasks, keep_domain_gradients=True)
    W = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.2, 0.5, 0.3]])
    tiny_step = 1e-4
    small = lookahead_gain(model, result, tasks, W, step_size=tiny_step, show_progress=False)
    np.testing.assert_allclose(small / tiny_step, W @ result.scores.T, rtol=1e-2)
    big = lookahead_gain(model, result, tasks, W[:2], step_size=50.0, show_progress=False)
    middle = W[:2].mean(0, keepdims=True)
    mid = lookahead_gain(model, result, tasks, middle, step_size=50.0, show_progress=False)
    linear = W[:2].mean(0) @ result.scores.T * 50.0
    assert np.abs(mid[0] - big.mean(0)).max() > 0.01 * np.abs(linear).max()


# --------------------------------------------------------------------------------------------
# No side effects
# --------------------------------------------------------------------------------------------


def _state_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _snapshot(model, optimizer):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "grad_objects": {n: id(p.grad) for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "checkpointing": {n: getattr(m, "gradient_checkpointing", None) for n, m in model.named_modules()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "autocast": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
        "grad_enabled": torch.is_grad_enabled(),
    }


def test_no_side_effects_on_model_grads_modes_optimizer_and_rng(data):
    domains, tasks = data
    model = exact_llama(seed=0, attention_dropout=0.3)
    optimizer = trained_adamw(model)
    model.activation_checkpointing_enable()
    model.train()
    model.model.layers[1].mlp.eval()  # a mixed-mode model: restored per submodule
    model.model.norm.weight.requires_grad_(False)
    model(**token_batches(1, seed=11)[0]).loss.backward()  # mid-accumulation .grad ...
    model.model.layers[0].mlp.up_proj.weight.grad = None  # ... with a None ...
    model.lm_head.weight.grad.zero_()  # ... and zeros
    before = _snapshot(model, optimizer)
    with torch.autocast("cpu", enabled=False):
        for preconditioner in ("adam", "diag_fisher"):
            result = run(model, domains, tasks, preconditioner=preconditioner, optimizer=optimizer,
                         projection_dim=32, keep_domain_gradients=True)
        lookahead_gain(model, result, tasks, np.full((2, 3), 1 / 3), step_size=0.1, show_progress=False)
    after = _snapshot(model, optimizer)
    for key in before:
        if key == "numpy_rng":
            assert all(np.array_equal(a, b) for a, b in zip(after[key], before[key])), key
        else:
            assert _state_equal(after[key], before[key]), key


def test_dropout_off_and_checkpointing_kept_during_the_pass(data):
    """Attention dropout is switched off, and checkpointed layers stay in train mode (recompute happens)."""
    domains, tasks = data
    model = exact_llama(seed=0, attention_dropout=0.5)
    model.train()
    plain = run(model, domains, tasks).scores
    model.activation_checkpointing_enable()
    calls, modes = [], []
    attention = model.model.layers[0].self_attn
    def record(module, args, output):
        calls.append(1)
        modes.append(module.training)

    handle = attention.register_forward_hook(record)
    try:
        checkpointed = run(model, {"d": domains["code"][:1]}, {"t": tasks["arc"][:1]})
        assert len(calls) == 4  # 2 micro-batches, each forward + recompute in backward
        assert not any(modes)
        assert model.model.layers[0].training and attention.training
        assert_close(run(model, domains, tasks).scores, plain, rtol=1e-12)
    finally:
        handle.remove()
    assert checkpointed.scores.shape == (1, 1)


def _training_run(measure_at):
    """A few AdamW steps with attention dropout; optionally measuring influence mid-way."""
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    model = exact_llama(seed=5, dtype=torch.float32, attention_dropout=0.2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    domains = named_batches(DOMAINS, 1, seed=8)
    tasks = named_batches(TASKS, 1, seed=9)
    for step, batch in enumerate(token_batches(6, seed=5)):
        model(**batch).loss.backward()
        if step in measure_at:  # mid-accumulation: .grad is live
            result = group_influence(model, domains, tasks, preconditioner="adam", optimizer=optimizer,
                                     keep_domain_gradients=True, show_progress=False)
            lookahead_gain(model, result, tasks, np.eye(3), step_size=0.5, show_progress=False)
        optimizer.step()
        optimizer.zero_grad()
        if step + 100 in measure_at:  # at a step boundary: .grad is None
            group_influence(model, domains, tasks, preconditioner="diag_fisher", show_progress=False)
    return [p.detach().clone() for p in model.parameters()], torch.rand(3), random.random(), np.random.rand()


def test_training_continues_bitwise_identically_after_measuring():
    params, *streams = _training_run(measure_at=())
    params_measured, *streams_measured = _training_run(measure_at=(1, 103))
    assert all(torch.equal(a, b) for a, b in zip(params, params_measured))
    assert torch.equal(streams[0], streams_measured[0]) and streams[1:] == streams_measured[1:]


# --------------------------------------------------------------------------------------------
# Bad input: clear errors that name the culprit
# --------------------------------------------------------------------------------------------


def _without_labels(domains, tasks):
    bad = dict(domains)
    bad["law"] = [{k: v for k, v in b.items() if k != "labels"} for b in domains["law"]]
    return bad, tasks


def _all_ignored(domains, tasks):
    bad = dict(tasks)
    bad["wiki"] = [{**b, "labels": torch.full_like(b["labels"], IGNORE_INDEX)} for b in tasks["wiki"]]
    return domains, bad


def _wrong_device(domains, tasks):
    bad = dict(domains)
    bad["news"] = [{k: v.to("meta") for k, v in b.items()} for b in domains["news"]]
    return bad, tasks


@pytest.mark.parametrize(
    "corrupt, error, pattern",
    [
        (lambda d, t: ({**d, "law": []}, t), ValueError, r"domain 'law' has no batches"),
        (lambda d, t: (d, {**t, "arc": []}), ValueError, r"task 'arc' has no batches"),
        (lambda d, t: ({}, t), ValueError, r"domain_batches is empty"),
        (lambda d, t: (d, [t["arc"]]), TypeError, r"validation_batches must be a mapping"),
        (lambda d, t: ({**d, "law": d["law"][0]}, t), TypeError, r"domain 'law'.*single dict; wrap it"),
        (_without_labels, ValueError, r"domain 'law' batch 0 has no 'labels'"),
        (_all_ignored, ValueError, r"task 'wiki': every label is -100"),
        (_wrong_device, ValueError, r"domain 'news' batch 0: tensor 'input_ids' is on meta.*are on cpu"),
    ],
    ids=["empty-domain", "empty-task", "no-domains", "not-a-mapping", "single-batch", "no-labels",
         "all-ignored", "device"],
)
def test_bad_batches_are_named(model, data, corrupt, error, pattern):
    domains, tasks = corrupt(*data)
    with pytest.raises(error, match=pattern):
        run(model, domains, tasks)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"preconditioner": "ekfac"}, r"preconditioner='ekfac' is not known; choose one of 'identity'"),
        ({"projection_dim": 0}, r"projection_dim must be a positive integer.*got 0"),
        ({"projection_dim": -3}, r"got -3"),
        ({"projection_dim": 2.5}, r"got 2.5"),
        ({"preconditioner": "diag_fisher", "damping": -1.0}, r"damping must be a finite positive.*-1.0"),
        ({"keep_domain_gradients": "gpu"}, r"keep_domain_gradients must be False, True or 'cpu', got 'gpu'"),
        ({"param_filter": ["no_such_module"]}, r"param_filter=\['no_such_module'\] kept none"),
    ],
)
def test_bad_arguments_are_named(model, data, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        run(model, *data, **kwargs)


def test_frozen_model_is_refused(model, data):
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no parameter with requires_grad=True"):
        run(model, *data)


@pytest.mark.parametrize("where", ["domain", "task"])
def test_non_finite_loss_names_the_culprit(model, where):
    # Token ids 56..63 are used only by the poisoned set; their embeddings become NaN.
    clean = named_batches(["a", "b"], 1, seed=4, vocab_size=56)
    poisoned = {"bad": token_batches(1, seed=5, low=56, high=64)}
    with torch.no_grad():
        model.model.embed_tokens.weight[56:] = float("nan")
    domains, tasks = ({**clean, **poisoned}, clean) if where == "domain" else (clean, {**clean, **poisoned})
    with pytest.raises(FloatingPointError, match=rf"{where} 'bad' is nan"):
        run(model, domains, tasks)


def test_reentrant_checkpointing_is_measured_as_without_checkpointing(model, data, dense):
    """torch.autograd.grad cannot go through a reentrant checkpoint: the pass checkpoints non-reentrantly."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    V, G = dense
    assert_close(run(model, *data).scores, (V @ G.T).numpy())
    assert model.model.layers[0]._gradient_checkpointing_func.keywords["use_reentrant"] is True  # left as it was


def test_deepspeed_engine_is_refused(model, data):
    class DeepSpeedEngine(torch.nn.Module):  # stands in for deepspeed's engine, matched by name
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(ValueError, match=r"DeepSpeed engines are not supported"):
        run(DeepSpeedEngine(model), *data)


@pytest.fixture(scope="module")
def kept_result(data):
    domains, tasks = data
    model = exact_llama(seed=0)
    return model, run(model, domains, tasks, keep_domain_gradients=True)


@pytest.mark.parametrize(
    "W, step, pattern",
    [
        (np.ones((2, 2)) / 2, 0.1, r"W must have shape \(N, 3\).*got shape \(2, 2\)"),
        (np.ones(3) / 3, 0.1, r"got shape \(3,\); a single mixture w goes in as W = w\[None, :\]"),
        ([[0.5, 0.6, -0.1]], 0.1, r"row 0 of W is not on the simplex"),
        ([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.5]], 0.1, r"row 1 of W is not on the simplex.*sum 1.5"),
        ([[np.nan, 0.5, 0.5]], 0.1, r"row 0 of W is not on the simplex"),
        ([[1.0, 0.0, 0.0]], 0.0, r"step_size must be a finite positive number, got 0.0"),
    ],
)
def test_bad_mixtures_are_named(kept_result, data, W, step, pattern):
    model, result = kept_result
    with pytest.raises(ValueError, match=pattern):
        lookahead_gain(model, result, data[1], W, step_size=step, show_progress=False)


def test_lookahead_needs_kept_gradients(model, data):
    result = run(model, *data)
    with pytest.raises(ValueError, match=r"keep_domain_gradients=True"):
        lookahead_gain(model, result, data[1], np.eye(3), step_size=0.1, show_progress=False)


# --------------------------------------------------------------------------------------------
# Two ranks
# --------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_two_ranks_agree_with_one_process(tmp_path):
    from helpers.launch import load_script, torchrun

    dist_influence = load_script("dist_influence")
    torchrun("dist_influence.py", tmp_path, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["world_size"] == 2 and ranks[0]["ddp_step_ok"] is True
    assert "FSDP is not supported with flat parameters" in ranks[0]["fsdp"]

    single = dist_influence.measure()
    for key in ("identity", "diag_fisher", "projected", "lookahead"):
        expected = np.asarray(single[key])
        atol = 1e-9 * np.abs(expected).max()
        np.testing.assert_allclose(np.asarray(ranks[0][key]), expected, rtol=1e-6, atol=atol)
    assert ranks[0]["task_losses"] == pytest.approx(single["task_losses"], rel=1e-10)
    assert ranks[0]["domain_tokens"] == single["domain_tokens"]
