"""Replayed schedules (``tikmix_solver="replay"``): a run's own history reproduces its sample stream,
positions are fractions of training unless the file says steps or tokens, bad schedules fail before
the first step, resume is exact, and the CLI exports and plots a replayed run."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from transformers import Trainer, TrainerCallback, TrainingArguments

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig
from tikmix_hf.cli import main as tikmix
from tikmix_hf.history import load_history
from tikmix_hf.schedule import load_schedule
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_validation
from tikmix_hf.testing import toy_model as tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

DOMAINS = ["pattern", "echo", "noise"]
START = {"pattern": 0.2, "echo": 0.2, "noise": 0.6}
BATCH, STEPS, CKPT = 8, 8, 3


class CountingCollator(RecordingCollator):
    """The probe/validation collator: counts its calls, so a test can see whether an influence pass ran."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, examples):
        self.calls += 1
        return super().__call__(examples)


class StopAt(TrainerCallback):
    """Ends training after ``step`` (an interrupted run) while ``max_steps``, and so every fraction, stay put."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _run(out, *, max_steps=STEPS, resume=None, save_steps=None, stop_at=None, **fields):
    fields.setdefault("tikmix_solver", "replay")
    fields.setdefault("tikmix_initial_weights", "keep")
    config = TiKMiXConfig(tikmix_show_progress=False, tikmix_probe_sequences=8, tikmix_validation_sequences=8,
                          **fields)
    mixture = DomainMixture(toy_domains(), weights=START, seed=3)
    collator, probe_collator = RecordingCollator(), CountingCollator()
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=probe_collator)
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=BATCH, learning_rate=3e-3,
        use_cpu=True, report_to="none", save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        logging_steps=100, disable_tqdm=True, seed=0, remove_unused_columns=False, dataloader_num_workers=0,
        lr_scheduler_type="constant", ignore_data_skip=True,
    )
    trainer = Trainer(model=tiny_model(0), args=args, train_dataset=mixture, data_collator=collator,
                      callbacks=[StopAt(stop_at)] if stop_at else None)
    callback.bind(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return callback, collator, probe_collator, mixture


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A TiKMiX-D run (the default mixer) deciding at steps 2, 4, 6: the schedule to replay."""
    out = tmp_path_factory.mktemp("source")
    cb, col, probes, mix = _run(out, tikmix_solver="direct", tikmix_stage_steps=2)
    return out / "tikmix" / "history.json", cb, col, probes, mix


def _first_batch_checks():
    return len(toy_validation()) + len(DOMAINS)  # on_train_begin collates one batch per task and domain


def test_replaying_its_own_history_reproduces_the_sample_stream(tmp_path, source):
    history, cb_src, col_src, probes_src, mix_src = source
    assert [s["step"] for s in cb_src.history] == [2, 4, 6]
    assert len({json.dumps(s["weights_after"]) for s in cb_src.history}) > 1  # the schedule really changes
    cb, col, probes, mix = _run(tmp_path, tikmix_schedule=str(history))
    # sample for sample what the collator saw, and the weight swaps at the same declared indices
    assert col.seen == col_src.seen
    assert [at for at, _ in mix.swaps] == [at for at, _ in mix_src.swaps]
    for (_, w), (_, w_src) in zip(mix.swaps, mix_src.swaps):
        np.testing.assert_allclose([w[d] for d in DOMAINS], [w_src[d] for d in DOMAINS], rtol=0, atol=1e-15)
    # no influence pass: nothing collated past the start-up checks, no matrix, no influence seconds
    assert probes.calls == _first_batch_checks() < probes_src.calls
    stages = load_history(tmp_path / "tikmix" / "history.json")["stages"]
    assert [s["step"] for s in stages] == [2, 4, 6]
    for k, s in enumerate(stages, start=1):
        assert s["status"] == "replayed" and s["solver"] == "replay" and s["influence"] is None
        assert s["seconds"]["influence"] == 0.0
        assert s["mixer"] == {"source": str(history), "entry": k, "at": pytest.approx(2 * k / STEPS),
                              "planned": 2 * k}
        assert str(history) in s["message"]


def test_twice_as_long_puts_each_change_at_the_same_fraction(tmp_path, source):
    history, cb_src, *_ = source
    cb, _, probes, mix = _run(tmp_path, max_steps=2 * STEPS, tikmix_schedule=str(history))
    assert [s["step"] / (2 * STEPS) for s in cb.history] == [s["step"] / STEPS for s in cb_src.history]
    assert [s["weights_after"] for s in cb.history] == [pytest.approx(s["weights_after"]) for s in cb_src.history]
    lag = mix.lag_samples()
    assert [at for at, _ in mix.swaps] == [0] + [s["step"] * BATCH + lag for s in cb.history]
    assert probes.calls == _first_batch_checks()


def _write(path, text):
    path.write_text(text)
    return str(path)


TWO_PHASE = """\
# a two-phase mix: noise-heavy first, then pattern-heavy from step 3 on
- at: 0
  weights: {pattern: 0.1, echo: 0.1, noise: 0.8}
- at: {steps: 3}
  weights: {pattern: 8, echo: 1, noise: 1}    # any scale: weights are normalised
"""


def test_a_hand_written_two_phase_yaml_is_followed_at_the_declared_points(tmp_path):
    path = _write(tmp_path / "two_phase.yaml", TWO_PHASE)
    cb, col, _, mix = _run(tmp_path / "run", tikmix_schedule=path)
    lag = mix.lag_samples()
    first, second = {"pattern": 0.1, "echo": 0.1, "noise": 0.8}, {"pattern": 0.8, "echo": 0.1, "noise": 0.1}
    assert [at for at, _ in mix.swaps] == [0, 3 * BATCH + lag]
    assert [w for _, w in mix.swaps] == [pytest.approx(first), pytest.approx(second)]
    assert [s["step"] for s in cb.history] == [3]
    # the stream is the one a mixture promises for that schedule, built by hand
    reference = DomainMixture(toy_domains(), weights=first, seed=3)
    reference.set_weights(second, at=3 * BATCH + lag)
    assert col.seen[: STEPS * BATCH] == [f"{d}:{i}" for d, i in reference.example_ids(0, STEPS * BATCH)]


@pytest.mark.filterwarnings("ignore:TiKMiX stage .* collapsing:UserWarning")  # a one-domain phase, on purpose
def test_token_positions_are_honoured(tmp_path):
    # 8 sequences of 16 tokens per step: 300 tokens are reached at the end of step 3 (384 > 300 > 256)
    path = _write(tmp_path / "tokens.json", json.dumps([
        {"at": {"tokens": 300}, "weights": {"pattern": 1, "echo": 0, "noise": 0}},
        {"at": {"tokens": 700}, "weights": {"pattern": 0, "echo": 1, "noise": 1}},
    ]))
    cb, _, _, mix = _run(tmp_path / "run", tikmix_schedule=path)
    assert [(s["step"], s["tokens_seen"]) for s in cb.history] == [(3, 384), (6, 768)]
    assert [w for _, w in mix.swaps][1:] == [{"pattern": 1.0, "echo": 0.0, "noise": 0.0},
                                                {"pattern": 0.0, "echo": 0.5, "noise": 0.5}]


def test_domain_map_renames_the_schedule(tmp_path):
    path = _write(tmp_path / "s.json", json.dumps([
        {"at": 0.5, "weights": {"counting": 0.5, "echo": 0.25, "noise": 0.25}},
    ]))
    cb, *_ = _run(tmp_path / "run", tikmix_schedule=path, tikmix_schedule_domains='{"counting": "pattern"}')
    assert cb.history[0]["step"] == STEPS // 2
    assert cb.history[0]["weights_after"] == {"pattern": 0.5, "echo": 0.25, "noise": 0.25}


BAD = {
    "neither format": ("bad.json", "this is not a schedule", "not valid JSON"),
    "a mapping that is no history": ("bad.json", '{"format": "something/1", "stages": []}', "neither a schedule"),
    "missing domain": ("s.yaml", "- {at: 0.5, weights: {pattern: 1, echo: 1}}",
                       r"no weight to this run's domains \['noise'\]"),
    "unknown domain": ("s.yaml", "- {at: 0.5, weights: {pattern: 1, echo: 1, noise: 1, law: 1}}",
                       r"names domains \['law'\] that this run does not have"),
    "negative weight": ("s.yaml", "- {at: 0.5, weights: {pattern: -1, echo: 1, noise: 1}}",
                        r"weights\['pattern'\] = -1; weights must be finite and >= 0"),
    "NaN weight": ("s.yaml", "- {at: 0.5, weights: {pattern: .nan, echo: 1, noise: 1}}",
                   r"weights\['pattern'\] = nan"),
    "NaN weight in JSON": ("s.json", '[{"at": 0.5, "weights": {"pattern": NaN, "echo": 1, "noise": 1}}]',
                           r"weights\['pattern'\] = nan"),
    "out of order": ("s.yaml", "- {at: 0.6, weights: {pattern: 1, echo: 1, noise: 1}}\n"
                               "- {at: 0.3, weights: {pattern: 1, echo: 1, noise: 1}}",
                     "entry 1 .* is not after entry 0"),
    "steps out of order with fractions": (
        "s.yaml", "- {at: 0.5, weights: {pattern: 1, echo: 1, noise: 1}}\n"
                  "- {at: {steps: 2}, weights: {pattern: 1, echo: 1, noise: 1}}", "falls on step 2, not after entry 0"),
    "fraction outside the run": ("s.yaml", "- {at: 1.5, weights: {pattern: 1, echo: 1, noise: 1}}",
                                 r"at = 1.5 is outside the run"),
    "steps outside the run": ("s.yaml", "- {at: {steps: 8}, weights: {pattern: 1, echo: 1, noise: 1}}",
                              "step 8, outside this run of max_steps=8"),
    "no file": (None, None, "no such file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_schedules_fail_before_training(tmp_path, case):
    name, text, match = BAD[case]
    path = str(tmp_path / "absent.yaml") if name is None else _write(tmp_path / name, text)
    mixture = DomainMixture(toy_domains(), weights=START, seed=3)
    collator = RecordingCollator()
    callback = TiKMiXCallback(mixture, toy_validation(), TiKMiXConfig(tikmix_solver="replay", tikmix_schedule=path),
                              collator=RecordingCollator())
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=STEPS, per_device_train_batch_size=BATCH,
                             use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = Trainer(model=tiny_model(0), args=args, train_dataset=mixture, data_collator=collator)
    callback.bind(trainer)
    with pytest.raises(ValueError, match=match) as err:
        trainer.train()
    assert path in str(err.value) and "tikmix_schedule" in str(err.value)
    assert collator.seen == [] and trainer.state.global_step == 0  # not one training batch


def test_yaml_without_pyyaml_says_what_to_install(tmp_path, monkeypatch):
    path = _write(tmp_path / "two_phase.yaml", TWO_PHASE)
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` now fails as if it were not installed
    with pytest.raises(ImportError, match="pip install pyyaml"):
        load_schedule(path)


def test_resume_in_the_middle_of_a_replay_equals_an_uninterrupted_one(tmp_path, source):
    history, *_ = source
    cb_full, col_full, _, mix_full = _run(tmp_path / "full", tikmix_schedule=str(history))
    out = tmp_path / "split"
    _, col_head, _, _ = _run(out, stop_at=CKPT, save_steps=CKPT, tikmix_schedule=str(history))
    ckpt = out / f"checkpoint-{CKPT}"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["TiKMiXCallback"]
    assert saved["attributes"]["tikmix"]["mixer"]["name"] == "replay"
    cb_res, col_res, _, mix_res = _run(out, resume=str(ckpt), save_steps=CKPT, tikmix_schedule=str(history))
    assert mix_res.swaps == mix_full.swaps
    assert [s["weights_after"] for s in cb_res.history] == [s["weights_after"] for s in cb_full.history]
    # the head run's last batch is the DataLoader's look-ahead, drawn but not trained on
    assert col_head.seen[: CKPT * BATCH] + col_res.seen == col_full.seen
    # the checkpoint remembers the schedule it replayed: another file is refused
    other = _write(tmp_path / "other.yaml", TWO_PHASE)
    with pytest.raises(ValueError, match="replayed another schedule"):
        _run(out, resume=str(ckpt), tikmix_schedule=other)


def test_export_and_plot_a_replayed_run(tmp_path, source):
    history, *_ = source
    out = tmp_path / "schedule.yaml"
    assert tikmix(["schedule", "export", str(history), "-o", str(out)]) == 0
    exported = load_schedule(out)
    assert exported.to_list() == load_schedule(history).to_list()
    assert [p.at for p in exported.phases] == [0.0, 0.25, 0.5, 0.75]
    assert tikmix(["schedule", "export", str(history), "-o", str(tmp_path / "s.json")]) == 0
    assert load_schedule(tmp_path / "s.json").to_list() == exported.to_list()
    assert tikmix(["schedule", "export", str(tmp_path / "nothing.json")]) == 2
    # the exported file replays, and its run plots like any other
    cb, *_ = _run(tmp_path / "run", tikmix_schedule=str(out))
    assert [s["step"] for s in cb.history] == [2, 4, 6]
    assert tikmix(["plot", str(tmp_path / "run"), "--output-dir", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "weights.png").stat().st_size > 0


def test_exporting_the_final_mixture_replays_as_that_static_mixture(tmp_path, source):
    """``--final``: one entry, the run's last weights from the first sample, which draws what a static run
    started at those weights draws."""
    history, cb_src, *_ = source
    out = tmp_path / "final.json"
    assert tikmix(["schedule", "export", str(history), "--final", "-o", str(out)]) == 0
    final = cb_src.history[-1]["weights_after"]
    assert json.loads(out.read_text()) == [{"at": 0.0, "weights": final}]
    assert final != START and not list(tmp_path.glob(".tmp-*"))  # the run moved; no temporary file left
    cb, col, probes, mix = _run(tmp_path / "replay", tikmix_schedule=str(out))
    _, col_static, _, mix_static = _run(tmp_path / "static", tikmix_solver="static",
                                        tikmix_initial_weights=json.dumps(final))
    assert col.seen == col_static.seen
    assert mix.weights == pytest.approx(mix_static.weights, abs=1e-15)
    assert probes.calls == _first_batch_checks()  # no influence pass
    assert tikmix(["schedule", "export", str(history), "--final", "-o", str(tmp_path / "f.yaml")]) == 0
    assert load_schedule(tmp_path / "f.yaml").to_list() == load_schedule(out).to_list()

