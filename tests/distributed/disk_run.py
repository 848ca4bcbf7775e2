"""Disk faults at each of TiKMiX's writes, then a retry once the disk is fixed, all in this one process.

    python disk_run.py ROOT FAULT [FAULT ...]

A FAULT is ``none`` (the uninterrupted run) or ``KIND:WRITE``: KIND ``full`` (a real ``RLIMIT_FSIZE`` limit,
so a write past 1 KiB fails with EFBIG like a full disk) or ``readonly`` (the folder loses its write
permission), WRITE ``history`` (the history write of stage 2, at step 10), ``window`` (the training window's
files of checkpoint 4, taken inside the window) or ``state`` (the ``trainer_state.json`` of checkpoint 8,
which holds the callback's state). Each runs in ``ROOT/<KIND>-<WRITE>``; after the fault, ``fault.json``
records the error and what is on disk; the fault is undone and the run resumes from its latest complete
checkpoint. ``seen.json`` holds the samples of each attempt with the step it started from.
"""

import json
import os
import resource
import signal
import sys

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import TrainerState

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig
from tikmix_hf.history import latest_checkpoint, load_history
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation

MAX_STEPS, SAVE_EVERY, STAGE_EVERY, WINDOW, BATCH = 12, 4, 5, 2, 4
AT = {"history": 10, "window": 4, "state": 8}
LIMIT = 1024
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us


class Fault:
    """Breaks the disk for one write and mends it."""

    def __init__(self, out: str, kind: str, write: str):
        self.out, self.kind, self.write, self.on = out, kind, write, False
        self.folder = os.path.join(out, "tikmix") if write == "history" else os.path.join(out,
                                                                                        f"checkpoint-{AT[write]}")

    def break_(self) -> None:
        self.on = True
        if self.kind == "full":
            resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        else:
            os.makedirs(self.folder, exist_ok=True)
            os.chmod(self.folder, 0o555)

    def mend(self) -> None:
        if self.on:
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
            if os.path.isdir(self.folder):
                os.chmod(self.folder, 0o755)
            self.on = False


class BreakBefore(TrainerCallback):
    """Registered before TiKMiX's callback: breaks the disk just before TiKMiX's history or window write."""

    def __init__(self, fault: Fault | None):
        self.fault = fault

    def on_step_end(self, args, state, control, **kwargs):
        if self.fault and self.fault.write == "history" and state.global_step == AT["history"]:
            self.fault.break_()

    def on_save(self, args, state, control, **kwargs):
        if self.fault and self.fault.write == "window" and state.global_step == AT["window"]:
            self.fault.break_()


def attempt(out: str, fault: Fault | None, seen: list) -> BaseException | None:
    resume = latest_checkpoint(out)
    real_save = TrainerState.save_to_json

    def save_state(state, path):
        if fault and fault.write == "state" and state.global_step == AT["state"]:
            fault.break_()
        return real_save(state, path)

    TrainerState.save_to_json = save_state
    mixture = DomainMixture(toy_domains(), weights={"pattern": 0.2, "echo": 0.2, "noise": 0.6}, seed=3)
    probes = RecordingCollator()
    probes.recording = False
    config = TiKMiXConfig(tikmix_initial_weights="keep", tikmix_window_sequences=0,
                          tikmix_stage_steps=STAGE_EVERY, tikmix_window_steps=WINDOW, tikmix_probe_sequences=8,
                          tikmix_influence_source="training", tikmix_show_progress=False)
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=probes)
    args = TrainingArguments(output_dir=out, max_steps=MAX_STEPS, per_device_train_batch_size=BATCH,
                             learning_rate=3e-3, use_cpu=True, report_to="none", save_strategy="steps",
                             save_steps=SAVE_EVERY, disable_tqdm=True, seed=0, remove_unused_columns=False,
                             lr_scheduler_type="constant", ignore_data_skip=True)
    collator = RecordingCollator()
    trainer = Trainer(model=toy_model(0), args=args, train_dataset=mixture, data_collator=collator,
                      callbacks=[BreakBefore(fault), callback])
    callback.bind(trainer)
    try:
        trainer.train(resume_from_checkpoint=resume)
        return None
    except (OSError, ValueError, RuntimeError) as err:
        return err
    finally:
        TrainerState.save_to_json = real_save
        if fault:
            fault.mend()
        seen.append({"resumed_from": int(resume.rsplit("-", 1)[1]) if resume else 0, "seen": collator.seen})


def temporaries(out: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.startswith(".tmp-")]


def scenario(root: str, spec: str) -> None:
    out = os.path.join(root, spec.replace(":", "-"))
    os.makedirs(out, exist_ok=True)
    fault = None if spec == "none" else Fault(out, *spec.split(":"))
    seen: list = []
    error = attempt(out, fault, seen)
    if fault is not None:
        history = load_history(os.path.join(out, "tikmix", "history.json"))  # parses: never half-written
        record = {"error": f"{type(error).__name__}: {error}" if error else None,
                  "stages": [s["step"] for s in history["stages"]], "latest": latest_checkpoint(out),
                  "temporaries": temporaries(out)}
        with open(os.path.join(out, "fault.json"), "w") as fh:
            json.dump(record, fh)
        error = attempt(out, None, seen)  # the retry, the disk fixed
    if error is not None:
        raise error
    with open(os.path.join(out, "seen.json"), "w") as fh:
        json.dump(seen, fh)


if __name__ == "__main__":
    for spec in sys.argv[2:]:
        scenario(sys.argv[1], spec)
