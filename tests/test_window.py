"""The training window: Group Influence read from the Trainer's own micro-batches, in hooks.

The reference is the probes' engine, :func:`group_influence`, run on exactly the sequences the
Trainer trained on during the window (each as its own batch, so that the standard errors have the
same sampling units) plus the window's top-up probes, at the same parameters (learning rate 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig, group_influence
from tikmix_hf._loss import shifted_targets
from tikmix_hf.influence.window import covered_parameters
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation

pytestmark = pytest.mark.usefixtures("one_thread")
START = {"pattern": 0.2, "echo": 0.2, "noise": 0.6}


def token_mean_loss(logits, labels, vocab_size, num_items_in_batch=None, **kwargs):
    """Hugging Face's causal-LM loss at the logits' own precision (it upcasts to float32 only)."""
    targets = shifted_targets(labels).reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, vocab_size), targets, ignore_index=-100, reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum())


def train(out, config, model, **args_kw):
    mixture = DomainMixture(toy_domains(), weights=START, seed=3)
    collator, probe_collator = RecordingCollator(), RecordingCollator()
    probe_collator.recording = False
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=probe_collator)
    args = dict(output_dir=str(out), max_steps=9, per_device_train_batch_size=4, learning_rate=0.0, use_cpu=True,
                report_to="none", save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0,
                remove_unused_columns=False, dataloader_num_workers=0, lr_scheduler_type="constant")
    args.update(args_kw)
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=mixture, data_collator=collator,
                      callbacks=[callback])
    callback.bind(trainer)
    trainer.train()
    return callback, collator, mixture, probe_collator


def window_config(**kw):
    kw = {"tikmix_window_sequences": 0, "tikmix_initial_weights": "keep", **kw}
    return TiKMiXConfig(tikmix_stage_steps=8, tikmix_influence_source="training", tikmix_window_steps=4,
                        tikmix_probe_sequences=8, tikmix_validation_sequences=32, tikmix_show_progress=False, **kw)


@pytest.mark.parametrize("accumulation,checkpointing,quota", [(1, False, None), (2, False, None), (1, True, None),
                                                               (2, False, 8)])
def test_the_window_equals_the_probe_engine_on_the_sequences_training_saw(tmp_path, accumulation, checkpointing,
                                                                          quota):
    model = toy_model(0, torch.float64)
    model.loss_function = token_mean_loss
    callback, collator, mixture, collate = train(tmp_path, window_config(tikmix_window_sequences=quota or 0), model,
                                                 gradient_accumulation_steps=accumulation,
                                                 activation_checkpointing=checkpointing)
    assert model.is_activation_checkpointing == checkpointing
    stage = callback.history[0]
    influence = stage["influence"]
    # The window opens at the start of step 5 (4 steps before the boundary at 8): stream samples [lo, hi).
    per_step = 4 * accumulation
    lo, hi = 4 * per_step, 8 * per_step
    seen = mixture.example_ids(lo, hi)
    assert [f"{d}:{i}" for d, i in seen] == collator.seen[lo:hi]  # the ids the hooks used are what was trained
    domains, val = toy_domains(), toy_validation()
    # with a quota, the hooks read only the first `quota` sequences of each domain, in stream order
    rows = {d: [collate([domains[d][i]]) for dd, i in seen if dd == d][:quota] for d in mixture.domains}
    window_counts = {d: len(r) for d, r in rows.items()}
    if quota is not None:
        assert max(window_counts.values()) == quota < max(sum(dd == d for dd, _ in seen) for d in mixture.domains)
    assert influence["window"]["sequences"] == window_counts
    if quota is None:
        assert influence["window"]["micro_batches"] == 4 * accumulation
    else:  # the hooks come off once every domain has its quota (here the rare domains never get theirs)
        assert influence["window"]["micro_batches"] <= 4 * accumulation
    for d in mixture.domains:  # a domain seen fewer than 8 times is topped up with that many probes
        need = 8 - window_counts[d]
        if need > 0:
            probes = mixture.probe(d, need, round=0)
            rows[d] += [collate(probes[k:k + 4]) for k in range(0, need, 4)]
    assert any(8 - c > 0 for c in window_counts.values()) and any(c >= 8 for c in window_counts.values())
    names = {n for n, _ in covered_parameters(model)}
    assert not any("norm" in n for n in names) and any("embed_tokens" in n for n in names)
    reference = group_influence(model, rows, {"held_out_pattern": [collate(val["held_out_pattern"])]},
                                param_filter=lambda n, p: n in names, show_progress=False)
    S = np.array(influence["scores"])
    np.testing.assert_allclose(S, reference.scores, rtol=1e-10, atol=1e-12 * np.abs(reference.scores).max())
    np.testing.assert_allclose(np.array(influence["stderr"]), reference.stderr, rtol=1e-8)
    assert influence["domain_tokens"] == reference.domain_tokens
    for d in mixture.domains:
        assert influence["domain_losses"][d] == pytest.approx(reference.domain_losses[d], rel=1e-12)
    assert stage["status"] in ("converged", "restarted")


def z_loss(logits, labels, vocab_size, num_items_in_batch=None, **kwargs):
    """A token cross-entropy plus a z-loss on the log-partition: not the loss the window can read."""
    return token_mean_loss(logits, labels, vocab_size, num_items_in_batch) + torch.logsumexp(logits, -1).pow(2).mean()


@pytest.mark.parametrize("change,match", [
    ("z_loss", r"differs from the next-token cross-entropy's by \d"),
    ("label_smoothing", r"label_smoothing_factor=0.1: the Trainer takes the labels out"),  # when training starts
])
def test_a_loss_the_window_cannot_read_is_refused_not_measured(tmp_path, change, match):
    model = toy_model(0)
    kw = {}
    if change == "z_loss":
        model.loss_function = z_loss
    else:
        kw["label_smoothing_factor"] = 0.1
    with pytest.raises(ValueError, match=match):
        train(tmp_path, window_config(), model, learning_rate=1e-3, **kw)


class StopAt(TrainerCallback):
    """Save a checkpoint at the end of ``step`` and stop there: a run killed inside the window."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = control.should_training_stop = True


def test_a_checkpoint_inside_the_window_resumes_exactly(tmp_path):
    def run(out, resume=None, stop=None):
        model = toy_model(0, torch.float64)
        model.loss_function = token_mean_loss
        mixture = DomainMixture(toy_domains(), weights=START, seed=3)
        collate = RecordingCollator()
        collate.recording = False
        callback = TiKMiXCallback(mixture, toy_validation(), window_config(), collator=collate)
        args = TrainingArguments(output_dir=str(out), max_steps=9, per_device_train_batch_size=4, learning_rate=3e-3,
                                 use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                                 remove_unused_columns=False, lr_scheduler_type="constant")
        trainer = Trainer(model=model, args=args, train_dataset=mixture, data_collator=RecordingCollator(),
                          callbacks=[callback] + ([StopAt(stop)] if stop else []))
        callback.bind(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return callback, model

    full, _ = run(tmp_path / "full")
    run(tmp_path / "split", stop=6)  # the window opened at step 4; the checkpoint at 6 is inside it
    checkpoint = tmp_path / "split" / "checkpoint-6"
    assert (checkpoint / "tikmix_window-rank0.safetensors").is_file()
    resumed, model = run(tmp_path / "split", resume=str(checkpoint))
    assert not model._forward_pre_hooks  # the window unhooked itself at its boundary
    a, b = full.history[0]["influence"], resumed.history[0]["influence"]
    assert a["window"]["sequences"] == b["window"]["sequences"] and a["window"]["micro_batches"] == 4
    np.testing.assert_allclose(b["scores"], a["scores"], rtol=1e-12)
    np.testing.assert_allclose(b["stderr"], a["stderr"], rtol=1e-10)
    assert b["task_losses"] == a["task_losses"]
    assert resumed.history[0]["weights_after"] == pytest.approx(full.history[0]["weights_after"], abs=1e-12)
    # a checkpoint copied without its window file resumes too, that stage measured on probes
    (checkpoint / "tikmix_window-rank0.safetensors").unlink()
    with pytest.warns(UserWarning) as caught:
        bare, _ = run(tmp_path / "split", resume=str(checkpoint))
    assert any("window state is not at" in str(w.message) for w in caught)
    assert bare.history[0]["influence"]["window"] is None
    assert any("measured with probes" in w for w in bare.history[0]["warnings"])


@pytest.mark.filterwarnings("ignore:.*collapsing onto few domains")
def test_windows_cover_at_most_the_second_half_of_their_stage(tmp_path):
    config = TiKMiXConfig(tikmix_initial_weights="keep", tikmix_window_sequences=0,
                          tikmix_stage_fractions=[0.05, 0.5, 0.75], tikmix_influence_source="training",
                          tikmix_window_steps=32, tikmix_probe_sequences=4, tikmix_show_progress=False)
    model = toy_model(0)
    callback, *_ = train(tmp_path, config, model, max_steps=100, learning_rate=1e-3)
    # boundaries 5, 50, 75: windows of 5 // 2 = 2, min(32, 45 // 2) = 22 and 25 // 2 = 12 steps
    assert [s["step"] for s in callback.history] == [5, 50, 75]
    assert [s["influence"]["window"]["micro_batches"] for s in callback.history] == [2, 22, 12]


def test_auto_falls_back_to_probes_where_the_window_cannot_read_the_run(tmp_path):
    model = toy_model(0)
    model.loss_function = z_loss
    config = TiKMiXConfig(tikmix_initial_weights="keep", tikmix_window_sequences=0,
                          tikmix_stage_steps=8, tikmix_influence_source="auto", tikmix_window_steps=4,
                          tikmix_probe_sequences=8, tikmix_show_progress=False)
    with pytest.warns(UserWarning, match=r"training window cannot measure this run \(the training loss"):
        callback, *_ = train(tmp_path, config, model, learning_rate=1e-3, max_steps=17)
    first, second = callback.history
    assert first["influence"]["window"] is None and first["influence"]["domain_tokens"]["noise"] > 0
    assert any("measures with probes instead" in w for w in first["warnings"])
    assert second["influence"]["window"] is None and not second["warnings"]  # probes from then on, said once
    # where the config rules the window out, auto is probes from the start, without a word
    assert TiKMiXConfig(tikmix_solver="surrogate").influence_source() == "probes"
    assert TiKMiXConfig(tikmix_influence_source="auto").influence_source() == "training"
    assert TiKMiXConfig(tikmix_objective="paper").influence_source() == "probes"  # the paper's method, as it was


class DropLast(RecordingCollator):
    """A collator that returns one row fewer than it was given examples (as a packing collator may)."""

    def __call__(self, examples):
        return super().__call__(examples[:-1])


@pytest.mark.parametrize("source", ["training", "auto"])
def test_rows_that_are_not_one_example_each_are_refused_or_measured_on_probes(tmp_path, source):
    mixture = DomainMixture(toy_domains(), weights=START, seed=3)
    collate = RecordingCollator()
    collate.recording = False
    config = TiKMiXConfig(tikmix_initial_weights="keep", tikmix_window_sequences=0,
                          tikmix_stage_steps=8, tikmix_influence_source=source, tikmix_window_steps=4,
                          tikmix_probe_sequences=8, tikmix_show_progress=False)
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=collate)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=9, per_device_train_batch_size=4, use_cpu=True,
                             report_to="none", save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=toy_model(0), args=args, train_dataset=mixture, data_collator=DropLast(),
                      callbacks=[callback])
    callback.bind(trainer)
    if source == "training":
        with pytest.raises(ValueError, match="micro-batch has 3 rows where the stream gives each rank 4"):
            trainer.train()
    else:
        with pytest.warns(UserWarning, match="a collator that packs or splits examples"):
            trainer.train()
        assert callback.history[0]["influence"]["window"] is None


def test_a_layer_too_large_to_form_per_sequence_is_scored_task_by_task_to_the_same_value(monkeypatch):
    from tikmix_hf.influence import TrainingWindow
    from tikmix_hf.influence import window as window_module
    from tikmix_hf.testing import named_batches, token_batches

    def scores():
        model = toy_model(0, torch.float64)
        window = TrainingWindow(model, named_batches(["a", "b"], 2, seed=5), ["x", "y"])
        ids = [np.array([0, 1, 0]), np.array([1, 1, 0]), np.array([0, 0, 1])]
        window.attach(lambda k, rows: (ids[k], 0))
        for batch in token_batches(3, batch_size=3, seed=9):
            out = model(**batch)
            token_mean_loss(out.logits, batch["labels"], out.logits.shape[-1]).backward()
        window.close()
        return window.result().scores

    per_sequence = scores()
    monkeypatch.setattr(window_module, "_CHUNK_VALUES", 1)  # every layer is "too large" now
    np.testing.assert_allclose(scores(), per_sequence, rtol=1e-12, atol=1e-14)
