"""A TiKMiX training run that can kill itself (SIGKILL) at a chosen moment, and resume.

    python crash_run.py OUT [KILL]

KILL is one of ``step:N`` (at the end of optimizer step N, before anything else sees it),
``influence:K`` (inside the K-th measurement of S, probes or the training window's),
``checkpoint:N`` (half-way through writing checkpoint N: model and optimizer written, trainer state
not) or ``history:K`` (the K-th history write, after its temporary file is written and before it
replaces history.json). Without KILL the
run goes to the end. The run resumes from the latest complete checkpoint in OUT if there is one.
Every batch the model sees is appended to OUT/seen-<attempt>.jsonl with the step it resumed from.
"""

import json
import os
import signal
import sys

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import tikmix_hf._io
import tikmix_hf.mixers.tikmix
from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig
from tikmix_hf.history import latest_checkpoint
from tikmix_hf.testing import toy_domains, toy_model, toy_validation

MAX_STEPS, SAVE_EVERY, STAGE_EVERY, BATCH = 24, 4, 5, 8


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Killer(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            die()


def arm(kill: str | None):
    if not kill:
        return []
    what, n = kill.split(":")
    n = int(n)
    if what == "step":
        return [Killer(n)]
    if what == "influence":
        real, calls = tikmix_hf.mixers.tikmix.measure_influence, [0]

        def influence(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                die()
            return real(*args, **kwargs)

        tikmix_hf.mixers.tikmix.measure_influence = influence
    elif what == "checkpoint":
        real_rng = Trainer._save_rng_state

        def save_rng(self, output_dir):
            if self.state.global_step == n:
                die()
            return real_rng(self, output_dir)

        Trainer._save_rng_state = save_rng
    elif what == "history":
        real_replace, calls = os.replace, [0]

        def replace(src, dst):
            if str(dst).endswith("history.json"):
                calls[0] += 1
                if calls[0] == n:
                    die()
            return real_replace(src, dst)

        tikmix_hf._io.os.replace = replace
    else:
        raise SystemExit(f"unknown kill point {kill!r}")
    return []


class Recorder:
    def __init__(self, path, start_step):
        self.fh = open(path, "w")  # noqa: SIM115 (open for the whole run: every batch appends a line)
        self.fh.write(json.dumps({"resumed_from": start_step}) + "\n")

    def __call__(self, examples):
        self.fh.write(json.dumps([e["sid"] for e in examples]) + "\n")
        self.fh.flush()
        return {k: torch.tensor([e[k] for e in examples]) for k in ("input_ids", "attention_mask", "labels")}


def main(out: str, kill: str | None) -> None:
    os.makedirs(out, exist_ok=True)
    resume = latest_checkpoint(out)
    start = int(resume.rsplit("-", 1)[1]) if resume else 0
    attempt = len([f for f in os.listdir(out) if f.startswith("seen-")])
    callbacks = arm(kill)
    mixture = DomainMixture(toy_domains(), weights={"pattern": 0.2, "echo": 0.2, "noise": 0.6}, seed=3)
    probe_collate = Recorder(os.devnull, 0)
    config = TiKMiXConfig(tikmix_initial_weights="keep", tikmix_window_sequences=0, tikmix_stage_steps=STAGE_EVERY,
                          tikmix_show_progress=False)
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=probe_collate)
    args = TrainingArguments(
        output_dir=out, max_steps=MAX_STEPS, per_device_train_batch_size=BATCH, learning_rate=3e-3, use_cpu=True,
        report_to="none", save_strategy="steps", save_steps=SAVE_EVERY, logging_steps=1000, disable_tqdm=True,
        seed=0, remove_unused_columns=False, lr_scheduler_type="constant", ignore_data_skip=True,
    )
    trainer = Trainer(model=toy_model(), args=args, train_dataset=mixture,
                      data_collator=Recorder(os.path.join(out, f"seen-{attempt}.jsonl"), start),
                      callbacks=callbacks + [callback])
    callback.bind(trainer)
    trainer.train(resume_from_checkpoint=resume)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
