"""The training set-ups people run, with a real Trainer: each feature x (probes, training window).

Every cell asserts one of two outcomes (``docs/influence.md``, "Training set-ups"):

- **works**: the stage's ``S`` equals a reference measured without the feature (the plain run's ``S``, or the
  probe engine on exactly the sequences the window read), within the precision the feature allows;
- **falls back / refused**: a warning (``auto``) or an error (``tikmix_influence_source="training"``) that names
  the feature and the fix, when training starts where the setting is visible then, else at the first step.

The runs are the toy set-up at learning rate 0 (so that every measurement sees the same parameters), in
float64 where the feature allows it: 9 steps of 4 sequences, a window over steps 5-8, the boundary at 8.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.modeling_outputs import CausalLMOutputWithPast

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig, group_influence
from tikmix_hf._loss import shifted_targets
from tikmix_hf.influence import TrainingWindow
from tikmix_hf.influence.window import covered_parameters
from tikmix_hf.stage_record import StageRecord, StageSeconds, stage_notes
from tikmix_hf.testing import RecordingCollator, named_batches, tiny_llama, toy_domains, toy_model, toy_validation

pytestmark = pytest.mark.usefixtures("one_thread")
START = {"pattern": 0.2, "echo": 0.2, "noise": 0.6}
TIGHT = dict(rtol=1e-9, atol=1e-12)


def token_mean_loss(logits, labels, vocab_size, num_items_in_batch=None, **kwargs):
    """Hugging Face's causal-LM loss at the logits' own precision (it upcasts float64 to float32)."""
    targets = shifted_targets(labels).reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, vocab_size).float() if logits.dtype.itemsize < 4 else
                            logits.reshape(-1, vocab_size), targets, ignore_index=-100, reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())


def exact(model):
    model.loss_function = token_mean_loss
    return model


def config(source="training", **kw):
    # every window sequence read, from the mixture's own weights: the measurement compared with its reference
    kw = {"tikmix_window_sequences": 0, "tikmix_initial_weights": "keep", **kw}
    return TiKMiXConfig(tikmix_stage_steps=8, tikmix_influence_source=source, tikmix_window_steps=4,
                        tikmix_probe_sequences=8, tikmix_validation_sequences=32, tikmix_show_progress=False, **kw)


def run(out, model, source="training", *, domains=None, collator=None, probe_collator=None, max_steps=9,
        mixture_kw=None, trainer_kw=None, **args_kw):
    mixture = DomainMixture(domains or toy_domains(), weights=START, seed=3, **(mixture_kw or {}))
    if probe_collator is None:
        probe_collator = RecordingCollator()
        probe_collator.recording = False
    callback = TiKMiXCallback(mixture, toy_validation(), config(source), collator=probe_collator)
    args = dict(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=0.0,
                use_cpu=True, report_to="none", save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0,
                remove_unused_columns=False, dataloader_num_workers=0, lr_scheduler_type="constant")
    args.update(args_kw)
    collator = collator or RecordingCollator()
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=mixture, data_collator=collator,
                      callbacks=[callback], **(trainer_kw or {}))
    callback.bind(trainer)
    trainer.train()
    return callback, collator, mixture


def scores(callback) -> np.ndarray:
    return np.array(callback.history[0]["influence"]["scores"])


def window_of(callback):
    return callback.history[0]["influence"]["window"]


def reference(model, mixture, collate, domains, lo, hi, *, names=None):
    """The probe engine on exactly the sequences the window read (stream samples ``[lo, hi)``, each its own batch)
    plus the window's top-up probes, on the parameters the hooks cover."""
    rows = {d: [collate([domains[d][i]]) for dd, i in mixture.example_ids(lo, hi) if dd == d] for d in mixture.domains}
    for d in mixture.domains:
        need = 8 - len(rows[d])
        if need > 0:
            probes = mixture.probe(d, need, round=0)
            rows[d] += [collate(probes[k:k + 4]) for k in range(0, need, 4)]
    names = names or {n for n, _ in covered_parameters(model)}
    tasks = {t: [collate(v)] for t, v in toy_validation().items()}
    return group_influence(model, rows, tasks, param_filter=lambda n, p: n in names, show_progress=False)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The plain runs every "works" cell is compared with: float64, no feature, window and probes."""
    out = tmp_path_factory.mktemp("plain")
    return {source: scores(run(out / source, exact(toy_model(0, torch.float64)), source)[0])
            for source in ("training", "probes")}


def quiet_run(*args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(*args, **kw)
    return result, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------- works
@pytest.mark.parametrize("feature", ["accumulation", "checkpointing"])
def test_accumulation_and_checkpointing_measure_what_the_plain_run_measures(tmp_path, plain, feature):
    kw = (dict(per_device_train_batch_size=2, gradient_accumulation_steps=2) if feature == "accumulation"
          else dict(activation_checkpointing=True))  # non-reentrant, the transformers default
    callback, *_ = run(tmp_path, exact(toy_model(0, torch.float64)), **kw)
    assert sum(window_of(callback)["sequences"].values()) == 16
    np.testing.assert_allclose(scores(callback), plain["training"], **TIGHT)


def test_bf16_autocast_measures_within_bf16_precision(tmp_path, plain):
    callback, *_ = run(tmp_path, toy_model(0), bf16=True)
    assert sum(window_of(callback)["sequences"].values()) == 16
    got, want = scores(callback), plain["training"]
    assert np.abs(got - want).max() < 0.03 * np.abs(want).max()


def test_measuring_in_the_window_leaves_training_unchanged(tmp_path):
    """The window's hooks change no gradient: a checkpointed run that measures in the window ends its first stage
    with the parameters of one that measures on probes, bit for bit."""
    params = {}
    for source in ("training", "probes"):
        model = toy_model(0)
        run(tmp_path / source, model, source, learning_rate=1e-2, max_steps=8, activation_checkpointing=True)
        params[source] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(params["training"], params["probes"]))


def ragged(domains):
    """The toy domains with examples of 8 to 16 tokens."""
    out = {}
    for d, examples in domains.items():
        out[d] = [{k: (v[:8 + (3 * i) % 9] if isinstance(v, list) else v) for k, v in e.items()}
                  for i, e in enumerate(examples)]
    return out


class PadCollator(RecordingCollator):
    """Pads on the right: attention mask 0 and label -100 on the padding."""

    def __call__(self, examples):
        if self.recording:
            self.seen.extend(e["sid"] for e in examples)
        width = max(len(e["input_ids"]) for e in examples)
        pad = [width - len(e["input_ids"]) for e in examples]
        return {"input_ids": torch.tensor([e["input_ids"] + [0] * p for e, p in zip(examples, pad)]),
                "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * p for e, p in zip(examples, pad)]),
                "labels": torch.tensor([e["labels"] + [-100] * p for e, p in zip(examples, pad)])}


def test_a_padding_collator_measures_each_sequence_as_if_alone(tmp_path):
    domains = ragged(toy_domains())
    collate = PadCollator()
    collate.recording = False
    model = exact(toy_model(0, torch.float64))
    callback, _, mixture = run(tmp_path, model, domains=domains, collator=PadCollator(), probe_collator=collate)
    ref = reference(model, mixture, collate, domains, 16, 32)
    np.testing.assert_allclose(scores(callback), ref.scores, **TIGHT)
    assert callback.history[0]["influence"]["domain_tokens"] == ref.domain_tokens


def test_several_epochs_over_map_style_domains_read_the_sequences_trained(tmp_path):
    """12 samples an epoch: the window (steps 5-8) spans the second and third epochs."""
    collate = RecordingCollator()
    collate.recording = False
    model = exact(toy_model(0, torch.float64))
    callback, seen, mixture = run(tmp_path, model, probe_collator=collate, max_steps=-1, num_train_epochs=3,
                                  mixture_kw=dict(num_samples=12))
    assert [f"{d}:{i}" for d, i in mixture.example_ids(0, 36)] == seen.seen  # the stream the hooks attribute
    ref = reference(model, mixture, collate, toy_domains(), 16, 32)
    np.testing.assert_allclose(scores(callback), ref.scores, **TIGHT)


def test_a_lora_model_is_measured_on_its_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    base = exact(toy_model(0, torch.float64))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    collate = RecordingCollator()
    collate.recording = False
    callback, _, mixture = run(tmp_path, model, probe_collator=collate)
    names = {n for n, _ in covered_parameters(model)}
    assert names and all("lora_" in n for n in names)  # the adapters, nothing frozen
    ref = reference(model, mixture, collate, toy_domains(), 16, 32, names=names)
    np.testing.assert_allclose(scores(callback), ref.scores, **TIGHT)


def test_gpt2_is_measured_whole_and_its_tied_embeddings_against_the_probe_engine(tmp_path):
    """GPT-2's Conv1D layers are covered: every parameter but the LayerNorms', the tied wte/lm_head included."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    settings = dict(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # the probes measure without dropout
    gpt2 = GPT2LMHeadModel(GPT2Config(**settings)).double()
    exact(gpt2)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    names = {n for n, _ in covered_parameters(gpt2)}
    assert {n for n, _ in gpt2.named_parameters()} - names == {n for n, _ in gpt2.named_parameters() if ".ln_" in n
                                                               or "ln_f" in n}
    collate = RecordingCollator()
    collate.recording = False
    callback, _, mixture = run(tmp_path, gpt2, probe_collator=collate)
    ref = reference(gpt2, mixture, collate, toy_domains(), 16, 32, names=names)
    np.testing.assert_allclose(scores(callback), ref.scores, **TIGHT)


# ---------------------------------------------------------------------------------------------- falls back, refused
def test_torch_compile_falls_back_to_probes_when_training_starts(tmp_path, plain):
    model = exact(toy_model(0, torch.float64))
    compiled = dict(torch_compile=True, torch_compile_backend="eager")  # dynamo without a C++ compiler
    with pytest.raises(ValueError, match=r"torch_compile=True .* set torch_compile=False"):
        run(tmp_path / "strict", model, **compiled)
    (callback, *_), messages = quiet_run(tmp_path / "auto", model, "auto", **compiled)
    assert any("torch_compile=True" in m and "measures with probes" in m for m in messages)
    assert window_of(callback) is None
    np.testing.assert_allclose(scores(callback), plain["probes"], **TIGHT)  # probes run the eager module


def test_reentrant_checkpointing_falls_back_when_training_starts_and_probes_measure_through_it(tmp_path, plain):
    reentrant = dict(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match=r"reentrant activation checkpointing .*'use_reentrant': False"):
        run(tmp_path / "strict", exact(toy_model(0, torch.float64)), **reentrant)
    (callback, *_), messages = quiet_run(tmp_path / "auto", exact(toy_model(0, torch.float64)), "auto", **reentrant)
    assert any("reentrant activation checkpointing" in m for m in messages)
    np.testing.assert_allclose(scores(callback), plain["probes"], **TIGHT)


class FusedLinearCE(LlamaForCausalLM):
    """A stand-in for Liger's fused linear cross-entropy: in training with labels the loss comes from the hidden
    states and the output layer's weight, a few tokens at a time, and ``lm_head`` is never called on the logits
    (``keep > 0``: only on the last ``keep`` positions, as ``logits_to_keep`` does). Without labels, a Llama."""

    keep = 0

    def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kwargs):
        if not (self.training and labels is not None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        flat, targets = hidden.reshape(-1, hidden.shape[-1]), shifted_targets(labels).reshape(-1)
        total = sum(F.cross_entropy(F.linear(flat[lo:lo + 8], self.lm_head.weight), targets[lo:lo + 8],
                                    ignore_index=-100, reduction="sum") for lo in range(0, flat.shape[0], 8))
        loss = total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())
        return CausalLMOutputWithPast(loss=loss, logits=self.lm_head(hidden[:, -self.keep:]) if self.keep else None)


class LossOnly(LlamaForCausalLM):
    """A model whose forward returns only its loss, with or without labels."""

    def forward(self, **kwargs):
        return {"loss": super().forward(**kwargs).loss}


def swap_class(model, cls, **attributes):
    model.__class__ = cls
    for k, v in attributes.items():
        setattr(model, k, v)
    return model


def test_fused_cross_entropy_falls_back_at_the_first_step_and_probes_measure_it(tmp_path, plain):
    (callback, *_), messages = quiet_run(tmp_path, swap_class(toy_model(0, torch.float64), FusedLinearCE), "auto")
    assert any("fused linear cross-entropy (Liger's kernels" in m and "measures with probes" in m for m in messages)
    assert window_of(callback) is None
    np.testing.assert_allclose(scores(callback), plain["probes"], **TIGHT)


@pytest.mark.parametrize("cls,keep,match", [
    (FusedLinearCE, 0, r"never called the model's output layer .* turn the fused loss off"),
    (FusedLinearCE, 1, r"logits for 4 positions where the labels have 64 \(logits_to_keep"),
])
def test_what_the_window_cannot_read_is_refused_at_the_first_step(tmp_path, cls, keep, match):
    model = swap_class(toy_model(0), cls, keep=keep)
    with pytest.raises(ValueError, match=match):
        run(tmp_path, model)
    assert not model._forward_hooks and not model._forward_pre_hooks  # the first step's watch came off


def test_a_model_that_returns_only_its_loss_is_refused_when_training_starts(tmp_path):
    model = swap_class(toy_model(0), LossOnly)
    with pytest.raises(ValueError, match=r"forward without labels returned no logits \(it returned \['loss'\]\)"):
        run(tmp_path, model, "auto")


def test_packed_rows_fall_back_at_the_first_step_and_probes_measure_packed_batches_exactly(tmp_path):
    """DataCollatorWithFlattening: one row per micro-batch, position_ids restarting at every example."""
    domains = ragged(toy_domains())
    model = exact(toy_model(0, torch.float64))
    (callback, *_), messages = quiet_run(tmp_path, model, "auto", domains=domains,
                                         collator=DataCollatorWithFlattening(),
                                         probe_collator=DataCollatorWithFlattening())
    assert any("DataCollatorWithFlattening" in m and "measures with probes" in m for m in messages)
    # the probes were packed too; the reference pads the same probe batches
    pad = PadCollator()
    pad.recording = False
    mixture = DomainMixture(domains, weights=START, seed=3)
    rows = {d: [pad(p[k:k + 4]) for p in [mixture.probe(d, 8, round=0)] for k in (0, 4)] for d in mixture.domains}
    ref = group_influence(model, rows, {t: [pad(v)] for t, v in toy_validation().items()}, show_progress=False)
    np.testing.assert_allclose(scores(callback), ref.scores, **TIGHT)


# ---------------------------------------------------------------------------------------------- fp16, memory
def test_overflowed_gradients_are_left_out_not_summed(monkeypatch):
    """A micro-batch whose gradients overflow (fp16 with a loss scaler, which then skips that step) gives no
    measurement: the window's S is that of the other micro-batches, and the count is reported."""
    def window_scores(overflow):
        model = toy_model(0, torch.float64)
        window = TrainingWindow(model, named_batches(["a"], 1, seed=5), ["x", "y"])
        ids = [np.array([0, 1]), np.array([1, 0]), np.array([0, 1])]
        steps = list(zip(named_batches(["b"], 3, seed=9)["b"], ids, [1.0, 1e300, 1.0]))
        if not overflow:
            del steps[1]
        window.attach(lambda k, rows: (steps[k][1], 0))
        for batch, _, scale in steps:
            out = model(**batch)
            loss = token_mean_loss(out.logits, batch["labels"], out.logits.shape[-1])
            (loss * scale * 1e10).backward()  # 1e310 overflows float64, as a loss scale can float16
        window.close()
        return window

    clean, flooded = window_scores(False), window_scores(True)
    assert flooded.non_finite == 2 and clean.non_finite == 0
    got = flooded.result()
    assert np.isfinite(got.scores).all() and got.window["non_finite_sequences"] == 2
    np.testing.assert_allclose(got.scores, clean.result().scores, rtol=1e-12)


def z_loss_step(model, batch):
    out = model(**batch)
    logits = out.logits
    (token_mean_loss(logits, batch["labels"], logits.shape[-1]) + torch.logsumexp(logits, -1).pow(2).mean()).backward()


def test_a_strict_window_on_several_ranks_fails_on_every_rank_at_close(monkeypatch):
    """A raise inside one rank's backward would leave the others waiting in DDP's all-reduce: with several ranks the
    window stops reading and close() raises, after an all-reduce of the failure that every rank reaches."""
    from tikmix_hf.influence import window as window_module

    monkeypatch.setattr(window_module, "all_reduce", lambda tensor, world: tensor)  # this rank's view of the sum
    model = toy_model(0, torch.float64)
    window = TrainingWindow(model, named_batches(["a"], 1, seed=5), ["x"], strict=True)
    window.world = 2
    window.attach(lambda k, rows: (np.zeros(2 * rows, dtype=np.int64), 0))
    batches = named_batches(["b"], 2, seed=9)["b"]
    z_loss_step(model, batches[0])  # refused in the backward: no raise there
    assert window.failure is not None and window._handles
    model(**batches[1]).loss.backward()  # the next forward takes the hooks off
    assert not window._handles
    with pytest.raises(ValueError, match="differs from the next-token cross-entropy's"):
        window.close()


def test_a_window_fault_in_a_checkpoint_is_kept_not_raised():
    """on_save takes the window's state between steps: a micro-batch it cannot read is refused there as in
    training (auto: the window stops, its state says why, and the restored window reads nothing more)."""
    model = swap_class(toy_model(0, torch.float64), FusedLinearCE)
    model.train()
    tasks = named_batches(["a"], 1, seed=5)
    window = TrainingWindow(model, tasks, ["x"], strict=False)
    window.attach(lambda k, rows: (np.zeros(rows, dtype=np.int64), 0))
    model(**named_batches(["b"], 1, seed=9)["b"][0]).loss.backward()
    meta, tensors = window.state()
    assert "never called the model's output layer" in meta["failure"]
    restored = TrainingWindow.restore(model, tasks, ["x"], meta, tensors, strict=False)
    restored.attach(lambda k, rows: (np.zeros(rows, dtype=np.int64), 0))
    assert not restored._handles and restored.failure == meta["failure"]


def test_mixture_of_experts_layers_are_refused_not_misread():
    """A layer on tokens gathered from several sequences (a mixture-of-experts router or expert) has no row per
    sequence: the window stops (auto falls back to probes at the boundary) rather than attribute rows wrongly."""
    model = toy_model(0, torch.float64)
    mlp = model.model.layers[0].mlp

    def routed(hidden):  # the expert sees the batch's tokens as one list, as a router hands them over
        tokens = hidden.reshape(-1, hidden.shape[-1])
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(tokens)) * mlp.up_proj(tokens)).view_as(hidden)

    mlp.forward = routed
    window = TrainingWindow(model, named_batches(["a"], 1, seed=5), ["x"], strict=False)
    window.attach(lambda k, rows: (np.zeros(rows, dtype=np.int64), 0))
    model(**named_batches(["b"], 1, seed=9)["b"][0]).loss.backward()
    window.close()
    assert "'model.layers.0.mlp.gate_proj' gave 24 rows for a micro-batch of 2 sequences" in window.failure


def test_a_window_that_read_nothing_is_never_a_silent_decision():
    record = StageRecord(stage=1, step=8, samples_consumed=32, tokens_seen=None, effective_index=33,
                         weights_before=START, weights_after=START, entropy=1.0, solver="direct", status="converged",
                         message="", influence={"window": {"sequences": {"pattern": 0, "echo": 0}}},
                         solver_result=None, mixer={}, metrics={}, seconds=StageSeconds(0, 0, 0))
    notes = stage_notes(record, 0.0)
    assert any("read no training sequence" in n for n in notes)


def peak_bytes(step) -> int:
    from helpers.memory import PeakMemory

    with PeakMemory() as memory:
        step()
    return memory.peak


def one_step(model, batch, window=None):
    def step():
        model(**batch).loss.backward()
        if window is not None:
            window.close()
    return step


def windowed(model, tasks):
    window = TrainingWindow(model, tasks, ["x"])
    window.attach(lambda k, rows: (np.zeros(rows, dtype=np.int64), 0))
    return window


def test_peak_memory_under_checkpointing_stays_that_of_checkpointing():
    """The hooks save each layer's input as autograd saves activations: checkpointing frees them too."""
    def model():
        m = tiny_llama(64, hidden_size=32, layers=4, heads=2, block_size=256, intermediate_size=64)
        m.train()
        return m

    batch = named_batches(["a"], 1, seq_len=256, batch_size=4, pad=False)["a"][0]
    tasks = named_batches(["t"], 1, seq_len=16, seed=2)
    plain, full = model(), model()
    plain.activation_checkpointing_enable()
    full_peak = peak_bytes(one_step(full, batch, windowed(full, tasks)))
    checkpointed = model()
    checkpointed.activation_checkpointing_enable()
    plain_peak = peak_bytes(one_step(plain, batch))
    window_peak = peak_bytes(one_step(checkpointed, batch, windowed(checkpointed, tasks)))
    assert window_peak < 1.3 * plain_peak < full_peak


def test_a_large_vocabulary_output_layer_stays_within_a_training_steps_memory(monkeypatch):
    """An output layer too large to form per sequence is scored task by task in the activations' size, and the
    loss's scale is fitted a few tokens at a time: beyond the training step's own memory, the window holds only
    the micro-batch's logits until its backward (the model's own tensor; one logits' size), whatever the number
    of tasks. (Before, it built float32 copies of the logits' size for the fit and for every task.)"""
    from tikmix_hf.influence import window as window_module

    monkeypatch.setattr(window_module, "_CHUNK_VALUES", 1 << 15)  # the 4096 x 16 output layer is "too large"

    def model():
        m = tiny_llama(4096, hidden_size=16, layers=1, heads=2, block_size=64, intermediate_size=32,
                       dtype=torch.bfloat16)
        m.train()
        return m

    batch = named_batches(["a"], 1, seq_len=64, batch_size=4, vocab_size=4096, pad=False)["a"][0]
    tasks = named_batches(["t", "u", "v"], 1, seq_len=16, vocab_size=4096, seed=2)
    plain, measured = model(), model()
    plain_peak = peak_bytes(one_step(plain, batch))
    window = windowed(measured, tasks)
    window_peak = peak_bytes(one_step(measured, batch, window))
    logits = 4 * 64 * 4096 * 2  # bfloat16
    assert plain_peak > 4 * logits  # the training step's own: logits, their float32 log-softmax and gradient
    assert window_peak - plain_peak < 1.25 * logits
    assert np.isfinite(window.result().scores).all()


# ---------------------------------------------------------------------------------------------- the launch
def test_ranks_that_train_independent_copies_are_told_how_to_join(monkeypatch):
    from tikmix_hf.run_checks import check_trainer

    class Args:
        world_size = 1
        restore_callback_states_from_checkpoint = False

    class Handler:
        callbacks = []

    class FakeTrainer:
        callback_handler = Handler()
        optimizer = None

    callback = object()
    FakeTrainer.callback_handler.callbacks = [callback]
    monkeypatch.setattr("tikmix_hf.run_checks.rank_and_world", lambda: (1, 2))
    with pytest.raises(RuntimeError, match=r"2 processes were launched, .* pass --use_cpu"):
        check_trainer(callback, FakeTrainer(), Args(), None)


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_zero_1_and_2_measure_as_one_process_and_zero_3_is_refused_when_training_starts(tmp_path,
                                                                                                  monkeypatch):
    """Through ``Trainer(deepspeed=...)`` on two CPU ranks (gloo; deepspeed built with DS_BUILD_OPS=0, which
    ``make test`` does not install: the test runs where deepspeed is importable)."""
    pytest.importorskip("deepspeed")
    from helpers.launch import load_script, torchrun

    from tikmix_hf.history import load_history

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    script = load_script("dist_deepspeed")
    for source in ("probes", "training"):
        script.main(str(tmp_path / f"one-{source}"), 0, source)
        want = load_history(tmp_path / f"one-{source}" / "tikmix" / "history.json")["stages"][0]["influence"]
        for stage in (1, 2):
            out = tmp_path / f"zero{stage}-{source}"
            torchrun("dist_deepspeed.py", out, stage, source)
            got = load_history(out / "tikmix" / "history.json")["stages"][0]["influence"]
            assert (got["window"] is not None) == (source == "training")
            np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5)
    with pytest.raises(AssertionError, match=r"DeepSpeed ZeRO-3 partitions every parameter .* ZeRO stage 1 or 2"):
        torchrun("dist_deepspeed.py", tmp_path / "zero3", 3, "probes")
