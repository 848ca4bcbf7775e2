"""Long runs: 30 decisions with two persistent DataLoader workers keep shared memory, file descriptors and
worker processes bounded; two Trainers with two callbacks in one process do not interfere
(docs/reliability.md, "Long runs")."""

from __future__ import annotations

import contextlib
import os
import warnings

import pytest
from transformers import Trainer, TrainerCallback, TrainingArguments

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation

pytestmark = pytest.mark.usefixtures("one_thread")
DECISIONS, EVERY = 30, 2


def resources() -> dict[str, int]:
    """This process's open file descriptors (and those on shared memory) and its child processes."""
    fds = os.listdir("/proc/self/fd")
    shared = 0
    for fd in fds:
        with contextlib.suppress(OSError):  # the descriptor of the listing itself, closed by now
            shared += os.readlink(f"/proc/self/fd/{fd}").startswith(("/dev/shm", "/memfd:"))
    children = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                children += int(fh.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
        except (OSError, IndexError, ValueError):
            pass  # a process that ended while we looked
    return {"fds": len(fds), "shared": shared, "children": children,
            "dev_shm": len(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else 0}


class Measure(TrainerCallback):
    """Resources after the first decision and after the last."""

    def __init__(self, callback):
        self.callback, self.seen = callback, {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.callback.stage in (1, DECISIONS) and self.callback.stage not in self.seen:
            self.seen[self.callback.stage] = resources()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors and processes through /proc")
@pytest.mark.slow
def test_thirty_decisions_with_persistent_workers_keep_resources_bounded(tmp_path):
    mixture = DomainMixture(toy_domains(), weights={"pattern": 0.2, "echo": 0.2, "noise": 0.6}, seed=3)
    probes = RecordingCollator()
    probes.recording = False
    config = TiKMiXConfig(tikmix_stage_steps=EVERY, tikmix_probe_sequences=4, tikmix_validation_sequences=4,
                          tikmix_show_progress=False, tikmix_entropy_warning=0.0)
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=probes)
    measure = Measure(callback)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=DECISIONS * EVERY + 1, per_device_train_batch_size=4,
                             dataloader_num_workers=2, dataloader_persistent_workers=True, learning_rate=1e-3,
                             use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False)
    trainer = Trainer(model=toy_model(0), args=args, train_dataset=mixture, data_collator=RecordingCollator(),
                      callbacks=[callback, measure])
    callback.bind(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert callback.stage == DECISIONS and len(mixture.swaps) == DECISIONS + 1
    start, end = measure.seen[1], measure.seen[DECISIONS]
    assert start["children"] >= 2 and end["children"] == start["children"], (start, end)  # the same two workers
    assert end["shared"] <= start["shared"] and end["dev_shm"] <= start["dev_shm"], (start, end)
    assert end["fds"] <= start["fds"] + 2, (start, end)


def _trainer(out, weights, validation_seed):
    mixture = DomainMixture(toy_domains(), weights=weights, seed=3)
    probes = RecordingCollator()
    probes.recording = False
    config = TiKMiXConfig(tikmix_stage_steps=4, tikmix_window_steps=2, tikmix_probe_sequences=8,
                          tikmix_show_progress=False)
    callback = TiKMiXCallback(mixture, toy_validation(seed=validation_seed), config, collator=probes)
    args = TrainingArguments(output_dir=str(out), max_steps=9, per_device_train_batch_size=4, learning_rate=3e-3,
                             use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
                             remove_unused_columns=False, lr_scheduler_type="constant")
    seen = RecordingCollator()
    trainer = Trainer(model=toy_model(0), args=args, train_dataset=mixture, data_collator=seen, callbacks=[callback])
    callback.bind(trainer)
    return trainer, callback, seen


def _record(callback, seen):
    stages = [(s["step"], s["effective_index"], s["weights_after"], s["influence"]["scores"]) for s in callback.history]
    return stages, list(seen.seen)


def test_two_trainers_with_two_callbacks_in_one_process_do_not_interfere(tmp_path):
    """As in a notebook or a sweep: both built before either trains, trained one after the other, then again in
    the other order; each run is the same whatever ran beside it."""
    a, b = {"pattern": 0.2, "echo": 0.2, "noise": 0.6}, {"pattern": 0.6, "echo": 0.3, "noise": 0.1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = {"a": _trainer(tmp_path / "a1", a, 1), "b": _trainer(tmp_path / "b1", b, 2)}
        for name in ("a", "b"):
            first[name][0].train()
        second = {"b": _trainer(tmp_path / "b2", b, 2), "a": _trainer(tmp_path / "a2", a, 1)}
        for name in ("b", "a"):
            second[name][0].train()
    for name in ("a", "b"):
        assert _record(*first[name][1:]) == _record(*second[name][1:])
        assert len(first[name][1].history) == 2
    assert _record(*first["a"][1:]) != _record(*first["b"][1:])  # two different runs, each its own
    assert first["a"][1].mixture is not first["b"][1].mixture
