"""TiKMiXCallback in a real Trainer: stages, logs, history, resume, configuration."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from helpers.launch import torchrun
from transformers import Trainer, TrainerCallback, TrainingArguments

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig
from tikmix_hf.history import load_history
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation

HERE = os.path.dirname(__file__)
START = {"pattern": 0.2, "echo": 0.2, "noise": 0.6}


class LogCatcher(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def make_args(out, **kw):
    base = dict(
        output_dir=str(out), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0,
        remove_unused_columns=False, dataloader_num_workers=0, lr_scheduler_type="constant",
    )
    base.update(kw)
    return TrainingArguments(**base)


def build(out, config=None, *, args_kw=None, model_seed=0, dtype=torch.float32):
    mixture = DomainMixture(toy_domains(), weights=START, seed=3)
    collator = RecordingCollator()
    probe_collator = RecordingCollator()
    probe_collator.recording = False
    config = config or TiKMiXConfig(tikmix_initial_weights="keep",
                                    tikmix_stage_steps=10, tikmix_show_progress=False, tikmix_probe_sequences=16)
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=probe_collator)
    catcher = LogCatcher()
    trainer = Trainer(
        model=toy_model(model_seed, dtype), args=make_args(out, **(args_kw or {})), train_dataset=mixture,
        data_collator=collator, callbacks=[callback, catcher],
    )
    callback.bind(trainer)
    return trainer, callback, collator, catcher, mixture


def test_three_stages_at_configured_steps_with_history_and_logs(tmp_path):
    trainer, callback, collator, catcher, mixture = build(tmp_path)
    trainer.train()
    history = load_history(tmp_path / "tikmix" / "history.json")
    stages = history["stages"]
    assert [s["step"] for s in stages] == [10, 20]  # step 30 is the end of training, not a boundary
    for s in stages:
        assert s["samples_consumed"] == s["step"] * 8
        assert s["effective_index"] == s["samples_consumed"] + mixture.lag_samples()
        assert s["status"] in ("converged", "restarted")
        assert set(s["weights_after"]) == {"pattern", "echo", "noise"}
        assert abs(sum(s["weights_after"].values()) - 1) < 1e-9
        S = np.array(s["influence"]["scores"])
        assert S.shape == (1, 3) and np.all(np.isfinite(S))
    # the weight swaps on the mixture are exactly the history
    assert mixture.swaps[1:] == [(s["effective_index"], s["weights_after"]) for s in stages]
    # what the model was fed follows the swaps sample by sample
    expected = [f"{d}:{i}" for d, i in mixture.example_ids(0, len(collator.seen))]
    assert collator.seen == expected
    # the toy's answer is obvious: pattern helps the validation task, noise does not
    final = stages[-1]["weights_after"]
    assert final["pattern"] > START["pattern"] and final["noise"] < START["noise"]
    S0 = np.array(stages[0]["influence"]["scores"])[0]
    assert S0[0] > S0[2]  # influence(pattern) > influence(noise)
    # logged through Trainer.log, so report_to integrations see the same numbers
    logged = [entry for entry in catcher.logs if "tikmix/stage" in entry]
    assert [entry["tikmix/stage"] for entry in logged] == [1.0, 2.0]
    assert logged[-1]["tikmix/weight/pattern"] == pytest.approx(final["pattern"])
    assert "tikmix/influence/held_out_pattern/noise" in logged[0]
    assert any("tikmix/stage" in entry for entry in trainer.state.log_history)


def _run_to_end(out, ckpt_every, resume=None, ignore_data_skip=False, max_steps=30):
    trainer, callback, collator, catcher, mixture = build(
        out,
        args_kw=dict(save_strategy="steps", save_steps=ckpt_every, max_steps=max_steps,
                     ignore_data_skip=ignore_data_skip),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback, collator, mixture


@pytest.mark.slow
@pytest.mark.parametrize("ignore_data_skip", [True, False])
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path, ignore_data_skip):
    _, cb_full, col_full, mix_full = _run_to_end(tmp_path / "full", 15, ignore_data_skip=ignore_data_skip)
    # a first run that stops at step 15 (its checkpoint), then a fresh process state resumes from it
    _, _, col_head, _ = _run_to_end(tmp_path / "split", 15, max_steps=15, ignore_data_skip=ignore_data_skip)
    ckpt = tmp_path / "split" / "checkpoint-15"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["TiKMiXCallback"]
    assert saved["attributes"]["tikmix"]["stage"] == 1  # JSON state in the checkpoint
    trainer, cb_res, col_res, mix_res = _run_to_end(
        tmp_path / "split", 15, resume=str(ckpt), ignore_data_skip=ignore_data_skip
    )
    assert mix_res.swaps == mix_full.swaps
    full_hist = load_history(tmp_path / "full" / "tikmix" / "history.json")["stages"]
    res_hist = load_history(tmp_path / "split" / "tikmix" / "history.json")["stages"]
    assert [h["weights_after"] for h in res_hist] == [h["weights_after"] for h in full_hist]
    assert [h["influence"]["scores"] for h in res_hist] == [h["influence"]["scores"] for h in full_hist]
    resumed_samples = col_res.seen[-15 * 8:]  # with replay, the skipped batches are collated first
    assert col_head.seen + resumed_samples == col_full.seen


def test_resume_from_checkpoint_without_callback_state_warns(tmp_path):
    mixture = DomainMixture(toy_domains(), weights=START, seed=3)
    collator = RecordingCollator()
    plain = Trainer(model=toy_model(), args=make_args(tmp_path, max_steps=5, save_strategy="steps", save_steps=5),
                    train_dataset=mixture, data_collator=collator)
    plain.train()
    trainer, callback, *_ = build(tmp_path, args_kw=dict(max_steps=25, ignore_data_skip=True))
    with pytest.warns(UserWarning, match="written without TiKMiXCallback"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    steps = [s["step"] for s in load_history(tmp_path / "tikmix" / "history.json")["stages"]]
    assert steps == [10, 20]


def test_history_file_is_written_atomically_on_every_stage(tmp_path):
    trainer, callback, _, catcher, _ = build(tmp_path, args_kw=dict(max_steps=12))
    trainer.train()
    folder = tmp_path / "tikmix"
    assert sorted(os.listdir(folder)) == ["history.json"]  # no temporary file left behind
    mask = os.umask(0o22)
    os.umask(mask)
    assert (folder / "history.json").stat().st_mode & 0o777 == 0o666 & ~mask  # readable as any other output
    doc = json.loads((folder / "history.json").read_text())
    assert doc["format"] == "tikmix_hf.history/1" and doc["domains"] == ["pattern", "echo", "noise"]
    assert doc["initial_weights"] == pytest.approx(START)
    # the integrations get the starting weights too, at step 0
    first = next(log for log in catcher.logs if "tikmix/weight/pattern" in log)
    assert first["tikmix/weight/pattern"] == pytest.approx(0.2) and "tikmix/stage" not in first


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        dict(gradient_accumulation_steps=2),
        dict(dataloader_num_workers=2),
        dict(dataloader_num_workers=2, dataloader_persistent_workers=True),
        dict(bf16=True),
        dict(gradient_checkpointing=True),
    ],
    ids=["grad_accum", "workers", "persistent_workers", "bf16", "grad_checkpointing"],
)
def test_training_features(tmp_path, extra):
    trainer, callback, collator, catcher, mixture = build(tmp_path, args_kw=dict(max_steps=22, **extra))
    trainer.train()
    stages = callback.history
    assert [s["step"] for s in stages] == [10, 20]
    per_step = 8 * extra.get("gradient_accumulation_steps", 1)
    assert [s["samples_consumed"] for s in stages] == [10 * per_step, 20 * per_step]
    assert all(math.isfinite(x) for s in stages for row in s["influence"]["scores"] for x in row)
    assert all(s["influence"]["window"] is not None and not s["warnings"] for s in stages)  # read in the window
    if extra.get("dataloader_num_workers", 0) == 0:
        expected = [f"{d}:{i}" for d, i in mixture.example_ids(0, len(collator.seen))]
        assert collator.seen == expected


def test_training_by_epochs_with_num_samples(tmp_path):
    mixture = DomainMixture(toy_domains(), weights=START, seed=3, num_samples=80)
    callback = TiKMiXCallback(mixture, toy_validation(), TiKMiXConfig(tikmix_stage_fractions=[0.5],
                                                                      tikmix_show_progress=False))
    args = make_args(tmp_path, max_steps=-1, num_train_epochs=2)
    trainer = Trainer(model=toy_model(), args=args, train_dataset=mixture, data_collator=RecordingCollator(),
                      callbacks=[callback])
    callback.bind(trainer)
    trainer.train()
    assert trainer.state.global_step == 20
    assert [s["step"] for s in callback.history] == [10]


def test_surrogate_solver_in_a_run(tmp_path):
    config = TiKMiXConfig(tikmix_solver="surrogate", tikmix_stage_steps=10, tikmix_show_progress=False,
                          tikmix_surrogate_candidates=16)
    trainer, callback, *_ = build(tmp_path, config, args_kw=dict(max_steps=12))
    trainer.train()
    (stage,) = callback.history
    assert stage["solver"] == "surrogate" and stage["solver_result"] is not None
    assert abs(sum(stage["weights_after"].values()) - 1) < 1e-9


@pytest.mark.parametrize("solver", ["direct", "surrogate"])
def test_the_repetition_cap_binds_both_solvers_even_where_the_prior_breaks_it(tmp_path, solver):
    # The validation task wants `pattern`, which has 64 rows (the others 256). At step 5 of 12 (batch 8) 56
    # samples remain, so 0.1 epochs cap it at 0.1 * 64 / 56 = 0.114, below its prior 0.2; TiKMiX-M searches
    # within the cap its anchor was solved under.
    domains = toy_domains()
    domains["pattern"] = domains["pattern"][:64]
    mixture = DomainMixture(domains, weights=START, seed=3)
    config = TiKMiXConfig(tikmix_solver=solver, tikmix_stage_steps=5, tikmix_show_progress=False,
                          tikmix_surrogate_candidates=16, tikmix_max_epochs=0.1, tikmix_probe_sequences=16)
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=RecordingCollator())
    trainer = Trainer(model=toy_model(0), args=make_args(tmp_path, max_steps=12), train_dataset=mixture,
                      data_collator=RecordingCollator(), callbacks=[callback])
    callback.bind(trainer)
    trainer.train()
    first = callback.history[0]
    assert first["mixer"]["trust_region"]["repetition_cap"].startswith("applied")
    assert first["status"] == "converged"
    cap = 0.1 * 64 / 56
    assert first["weights_after"]["pattern"] == pytest.approx(cap, abs=1e-6)  # as far as the cap lets it go


# ---------------------------------------------------------------------------- two ranks
@pytest.mark.distributed
def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    """Probes with accelerate's batch dispatch, the training window with every rank reading its own slice."""
    from helpers.launch import load_script

    dist_callback = load_script("dist_callback")
    refs = {}
    for source in ("probes", "training"):  # the single-process references run here, in this process
        dist_callback.main(str(tmp_path / f"one-{source}"), 8, "default", source)
        refs[source] = load_history(tmp_path / f"one-{source}" / "tikmix" / "history.json")["stages"]
    for dispatch, source in (("default", "probes"), ("off", "training")):
        ref = refs[source]
        out = tmp_path / f"two-{dispatch}"
        torchrun("dist_callback.py", out, 4, dispatch, source)
        got = load_history(out / "tikmix" / "history.json")["stages"]
        assert [s["step"] for s in got] == [s["step"] for s in ref]
        for a, b in zip(got, ref):
            assert a["effective_index"] == b["effective_index"]
            np.testing.assert_allclose(a["influence"]["scores"], b["influence"]["scores"], rtol=1e-7)
            np.testing.assert_allclose(a["influence"]["stderr"], b["influence"]["stderr"], rtol=1e-6)
            assert (a["influence"].get("window") is not None) == (source == "training")
            if source == "training":
                assert a["influence"]["window"]["sequences"] == b["influence"]["window"]["sequences"]
            for d in a["weights_after"]:
                assert a["weights_after"][d] == pytest.approx(b["weights_after"][d], abs=1e-6)
        ranks = [json.loads((out / f"seen-rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["swaps"] == ranks[1]["swaps"]


# ---------------------------------------------------------------------------- configuration


def test_bad_callback_arguments_fail_clearly(tmp_path):
    mixture = DomainMixture(toy_domains(), weights=START)
    with pytest.raises(TypeError, match="must be a tikmix_hf.DomainMixture"):
        TiKMiXCallback(toy_domains(), toy_validation())
    with pytest.raises(ValueError, match="validation is empty"):
        TiKMiXCallback(mixture, {})
    with pytest.raises(ValueError, match="clash"):
        TiKMiXCallback(mixture, {"a/b": toy_validation()["held_out_pattern"],
                                 "a_b": toy_validation()["held_out_pattern"]})
    with pytest.raises(ValueError, match="has no examples"):
        TiKMiXCallback(mixture, {"t": []})
    other = DomainMixture(toy_domains(), weights=START)
    callback = TiKMiXCallback(mixture, toy_validation(), TiKMiXConfig(tikmix_show_progress=False))
    trainer = Trainer(model=toy_model(), args=make_args(tmp_path, max_steps=3), train_dataset=other,
                      data_collator=RecordingCollator(), callbacks=[callback])
    callback.bind(trainer)
    with pytest.raises(ValueError, match="train_dataset is not the DomainMixture"):
        trainer.train()
    restoring = Trainer(model=toy_model(), args=make_args(tmp_path, restore_callback_states_from_checkpoint=True),
                        train_dataset=mixture, data_collator=RecordingCollator())
    TiKMiXCallback(mixture, toy_validation(), trainer=restoring)
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        restoring.train()


def test_schedule_longer_than_training_warns(tmp_path):
    config = TiKMiXConfig(tikmix_stage_steps=50, tikmix_show_progress=False)
    trainer, callback, *_ = build(tmp_path, config, args_kw=dict(max_steps=5))
    with pytest.warns(UserWarning, match="not shorter than training"):
        trainer.train()
    assert callback.history == []


def test_callback_added_after_construction_needs_bind(tmp_path):
    mixture = DomainMixture(toy_domains(), weights=START)
    trainer = Trainer(model=toy_model(), args=make_args(tmp_path, max_steps=12), train_dataset=mixture,
                      data_collator=RecordingCollator())
    callback = TiKMiXCallback(mixture, toy_validation(), TiKMiXConfig(tikmix_stage_steps=10,
                                                                      tikmix_show_progress=False))
    trainer.add_callback(callback)
    with pytest.raises(RuntimeError, match="bind"):
        trainer.train()
    callback.bind(trainer)
    trainer.train()
    assert [s["step"] for s in callback.history] == [10]


# ---------------------------------------------------------------------------- the console and early checks
def test_console_shows_one_line_per_stage_and_integrations_the_whole_matrix(tmp_path, capfd):
    trainer, callback, *_ = build(tmp_path, args_kw=dict(max_steps=12, logging_steps=5))  # tikmix_log_matrix=True
    assert callback.config.tikmix_log_matrix is True
    trainer.train()
    out, err = capfd.readouterr()
    console = out + err
    assert "tikmix/influence/" not in console
    assert "TiKMiX stage 1 at step 10:" in console
    assert "'loss'" in console or "loss" in console  # the Trainer's own log lines still print
    logged = [entry for entry in trainer.state.log_history if "tikmix/stage" in entry]
    assert len(logged) == 1 and "tikmix/influence/held_out_pattern/noise" in logged[0]


def test_validation_without_labels_fails_when_training_starts(tmp_path):
    unlabelled = {"v": [{k: v for k, v in e.items() if k != "labels"} for e in toy_validation()["held_out_pattern"]]}
    mixture = DomainMixture(toy_domains(), weights=START, seed=3)
    from transformers import default_data_collator

    callback = TiKMiXCallback(mixture, unlabelled, TiKMiXConfig(tikmix_stage_steps=15, tikmix_show_progress=False),
                              collator=default_data_collator)
    collator = RecordingCollator()
    trainer = Trainer(model=toy_model(), args=make_args(tmp_path, max_steps=20), train_dataset=mixture,
                      data_collator=collator)
    callback.bind(trainer)
    with pytest.raises(ValueError, match="task 'v' batch 0 has no 'labels' tensor"):
        trainer.train()
    assert trainer.state.global_step == 0 and collator.seen == []  # not one training step was taken


def test_a_callback_bound_to_another_trainer_is_refused_until_rebound(tmp_path):
    trainer, callback, *_ = build(tmp_path / "first", args_kw=dict(max_steps=12))
    trainer.train()
    second = Trainer(model=toy_model(), args=make_args(tmp_path / "second", max_steps=12),
                     train_dataset=callback.mixture, data_collator=RecordingCollator(), callbacks=[callback])
    with pytest.raises(RuntimeError, match=r"bound to another Trainer.*callback\.bind\(trainer\)"):
        second.train()
    assert second.state.global_step == 0
    assert callback.bind(second) is callback
    second.train()
    assert second.state.global_step == 12
