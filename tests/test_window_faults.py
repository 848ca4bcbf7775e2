"""Faults inside the training window: a non-finite micro-batch, a domain that runs out, a validation task
without a labelled token, a damaged window file on resume. Each is left out or falls back with the reason
recorded, or stops cleanly with a clear error; the weights never become NaN (docs/reliability.md)."""

from __future__ import annotations

import json
import math
import warnings

import datasets
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig
from tikmix_hf.history import load_history
from tikmix_hf.influence.window_lifecycle import WINDOW_FILE, WINDOW_GRADIENTS
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation

pytestmark = pytest.mark.usefixtures("one_thread")
START = {"pattern": 0.2, "echo": 0.2, "noise": 0.6}
STAGE, WINDOW, BATCH = 8, 4, 4  # the window opens at the start of step 5 and closes at the boundary after step 8


class Overflow(Trainer):
    """A loss that overflows on the training micro-batches of one step, as a mixed-precision step can."""

    overflow_step: int | None = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * float("inf") if self.state.global_step == self.overflow_step else loss


class SkipNonFinite(TrainerCallback):
    """Skip an optimizer step whose gradients are not finite, as a loss scaler does."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if any(not torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
            model.zero_grad(set_to_none=False)


def train(out, *, domains=None, validation=None, exhausted="cycle", max_steps=STAGE + 1, overflow=None,
          stop_at=None, resume=None):
    mixture = DomainMixture(domains or toy_domains(), weights=START, seed=3, exhausted=exhausted,
                            sizes={"pattern": 14, "echo": 14, "noise": 14} if domains else None)
    probes = RecordingCollator()
    probes.recording = False
    config = TiKMiXConfig(tikmix_initial_weights="keep", tikmix_window_sequences=0,
                          tikmix_stage_steps=STAGE, tikmix_window_steps=WINDOW, tikmix_probe_sequences=8,
                          tikmix_influence_source="training", tikmix_show_progress=False)
    callback = TiKMiXCallback(mixture, validation or toy_validation(), config, collator=probes)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=BATCH,
                             learning_rate=3e-3, use_cpu=True, report_to="none", disable_tqdm=True, seed=0,
                             remove_unused_columns=False, lr_scheduler_type="constant", max_grad_norm=0.0,
                             save_strategy="steps" if stop_at else "no", save_steps=stop_at or 500)
    extra = [SkipNonFinite()] if overflow is not None else []
    if stop_at:
        extra.append(Stop(stop_at))
    trainer = Overflow(model=toy_model(0), args=args, train_dataset=mixture, data_collator=RecordingCollator(),
                       callbacks=[callback, *extra])
    trainer.overflow_step = overflow
    callback.bind(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback, mixture


class Stop(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_a_non_finite_micro_batch_is_left_out_of_the_window_and_said(tmp_path):
    _, clean, mixture = train(tmp_path / "clean")
    with pytest.warns(UserWarning, match="left out 4 sequences whose loss or gradient was not finite"):
        trainer, callback, _ = train(tmp_path / "overflow", overflow=6)  # step 7's micro-batch, inside the window
    (stage,) = callback.history
    window = stage["influence"]["window"]
    assert window["non_finite_sequences"] == 4 and stage["status"] == "converged"
    assert any("not finite" in note for note in stage["warnings"])
    left_out = [d for d, _ in mixture.example_ids(6 * BATCH, 7 * BATCH)]
    expected = {d: n - left_out.count(d) for d, n in clean.history[0]["influence"]["window"]["sequences"].items()}
    assert window["sequences"] == expected
    assert all(math.isfinite(w) for w in stage["weights_after"].values())
    assert all(math.isfinite(v) for row in stage["influence"]["scores"] for v in row)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("kind", ["map", "stream"])
def test_a_domain_running_out_inside_the_window_stops_training_cleanly(tmp_path, kind):
    small = {name: rows[:14] for name, rows in toy_domains().items()}  # noise runs out in step 7
    if kind == "stream":  # its end is only known when it comes: the stream records it and training stops there
        small = {name: datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=1)
                 for name, rows in small.items()}
    with pytest.warns(UserWarning, match=r"domains \['noise'\] run out of examples within the next step .* "
                                         r"training stops at step"):
        trainer, callback, _ = train(tmp_path, domains=small, exhausted="stop", max_steps=30)
    assert STAGE - WINDOW <= trainer.state.global_step < STAGE  # inside the window, before its boundary
    assert not trainer.model._forward_pre_hooks and callback._windows.window is None  # the hooks came off
    assert load_history(tmp_path / "tikmix" / "history.json")["stages"] == []


def test_a_validation_task_without_a_labelled_token_is_refused_before_the_first_step(tmp_path):
    unlabelled = {"t": [dict(e, labels=[-100] * 16) for e in toy_validation()["held_out_pattern"]]}
    with pytest.raises(ValueError, match=r"task 't': every label is -100"):
        trainer, *_ = train(tmp_path, validation=unlabelled)
    assert not (tmp_path / "tikmix" / "history.json").exists() or not json.loads(
        (tmp_path / "tikmix" / "history.json").read_text())["stages"]


def _truncate(folder):
    path = folder / WINDOW_FILE.format(rank=0)
    path.write_bytes(path.read_bytes()[:100])


def _foreign_metadata(folder):
    path = folder / WINDOW_FILE.format(rank=0)
    meta = json.loads(json.loads(json.dumps(_metadata(path)))["tikmix"])
    meta["domains"] = ["x", "y", "z"]
    save_file(load_file(path), path, metadata={**_metadata(path), "tikmix": json.dumps(meta)})


def _not_json(folder):
    path = folder / WINDOW_FILE.format(rank=0)
    save_file(load_file(path), path, metadata={**_metadata(path), "tikmix": "{not json"})


def _wrong_shape(folder):
    path = folder / WINDOW_GRADIENTS
    save_file({"rows": torch.zeros(2, 3)}, path, metadata=_metadata(path))


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata())


@pytest.mark.parametrize("damage,reason", [
    (_truncate, "damaged or belongs to another run"),
    (_foreign_metadata, "does not belong to this run"),
    (_not_json, "damaged or belongs to another run (Expecting property name"),
    (_wrong_shape, "damaged or belongs to another run"),
    (lambda folder: (folder / WINDOW_GRADIENTS).unlink(), "its window state is not at"),
], ids=["truncated", "foreign", "not-json", "wrong-shape", "missing"])
def test_a_damaged_window_file_measures_that_stage_with_probes_and_says_why(tmp_path, damage, reason):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(tmp_path, stop_at=6)  # a checkpoint inside the window
    damage(tmp_path / "checkpoint-6")
    with pytest.warns(UserWarning, match="measured with probes"):
        _, callback, _ = train(tmp_path, resume=str(tmp_path / "checkpoint-6"))
    (stage,) = callback.history
    assert stage["influence"]["window"] is None and stage["status"] == "converged"
    assert any(reason in note and "measured with probes" in note for note in stage["warnings"]), stage["warnings"]
