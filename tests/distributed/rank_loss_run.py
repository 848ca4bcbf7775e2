"""A two-rank TiKMiX run in which one rank dies (SIGKILL) or freezes (SIGSTOP) at a chosen moment.

    python rank_loss_run.py JOB [JOB ...]        (on each of two torchrun "nodes", one rank each)

A JOB is ``OUT`` (train to the end, resuming from the latest complete checkpoint in OUT) or ``OUT@POINT``:

- ``window:N``: rank 1 dies at the start of step N + 1, inside a training window, after the checkpoint
  of step N was written (with its window files);
- ``probe:S``: rank 1 dies in stage S's probe pass (the training window's top-up probes), as its first probe
  batch goes in;
- ``decision:S``: rank 0 dies as stage S's decision is broadcast (rank 1 waits for it);
- ``freeze:S``: rank 0 stops (SIGSTOP) as stage S's decision is broadcast: it neither answers nor closes its
  connections, so rank 1 waits out tikmix_collective_timeout (``FREEZE_TIMEOUT`` seconds here).

Jobs run one after another in the same two processes. The rank that dies first writes ``OUT/lost.json``
(which rank, its pid, the time). Every rank appends the ids of the samples it trains on to
``OUT/seen-rank<r>-<attempt>.jsonl``, whose first line is the step the attempt resumed from.
"""

import json
import os
import signal
import sys
import time

from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers.launch import exit_rank  # noqa: E402

import tikmix_hf.callback  # noqa: E402
import tikmix_hf.mixers.tikmix  # noqa: E402
from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig  # noqa: E402
from tikmix_hf.history import latest_checkpoint  # noqa: E402
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation  # noqa: E402

MAX_STEPS, SAVE_EVERY, STAGE_EVERY, WINDOW, BATCH = 16, 4, 5, 2, 4  # BATCH per rank
FREEZE_STEPS, FREEZE_TIMEOUT = 6, 8.0
RANK = int(os.environ.get("RANK", "0"))


def lose(out: str, point: str, sig: int) -> None:
    with open(os.path.join(out, "lost.json"), "w") as fh:
        json.dump({"rank": RANK, "pid": os.getpid(), "point": point, "time": time.time()}, fh)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), sig)


class DieInWindow(TrainerCallback):
    def __init__(self, out, step):
        self.out, self.step = out, step

    def on_step_begin(self, args, state, control, **kwargs):
        if RANK == 1 and state.global_step == self.step:
            lose(self.out, f"window:{self.step}", signal.SIGKILL)


def arm(out: str, point: str | None, callback: TiKMiXCallback, model) -> list:
    """Install the moment of loss; returns the extra Trainer callbacks it needs."""
    if point is None:
        return []
    what, n = point.split(":")
    n = int(n)
    if what == "window":
        return [DieInWindow(out, n)]
    if what == "probe":
        real = tikmix_hf.mixers.tikmix.measure_influence

        def measure(inputs, **kwargs):
            if RANK == 1 and callback.stage + 1 == n:  # the top-up pass's first probe batch, on its way in
                model.register_forward_pre_hook(lambda *_: lose(out, point, signal.SIGKILL))
            return real(inputs, **kwargs)

        tikmix_hf.mixers.tikmix.measure_influence = measure
    elif what in ("decision", "freeze"):
        real_agree = tikmix_hf.callback.agree

        def agree(values):
            if RANK == 0 and callback.stage + 1 == n:
                lose(out, point, signal.SIGKILL if what == "decision" else signal.SIGSTOP)
            return real_agree(values)

        tikmix_hf.callback.agree = agree
    else:
        raise SystemExit(f"unknown moment {point!r}")
    return []


class Recorder(RecordingCollator):
    """Appends the ids of every training batch this rank collates to a file, after the step it resumed from."""

    def __init__(self, path: str, start: int):
        super().__init__()
        self.fh = open(path, "w")  # noqa: SIM115 (open for the whole run: every batch appends a line)
        self.fh.write(json.dumps({"resumed_from": start}) + "\n")
        self.fh.flush()

    def __call__(self, examples):
        self.fh.write(json.dumps([e["sid"] for e in examples]) + "\n")
        self.fh.flush()
        return super().__call__(examples)


def job(out: str, point: str | None) -> None:
    os.makedirs(out, exist_ok=True)
    freeze = point is not None and point.startswith("freeze")
    resume = latest_checkpoint(out)
    start = int(resume.rsplit("-", 1)[1]) if resume else 0
    attempt = len([f for f in os.listdir(out) if f.startswith(f"seen-rank{RANK}-")])
    mixture = DomainMixture(toy_domains(), weights={"pattern": 0.2, "echo": 0.2, "noise": 0.6}, seed=3)
    probe_collator = RecordingCollator()
    probe_collator.recording = False
    config = TiKMiXConfig(tikmix_initial_weights="keep", tikmix_window_sequences=0,
                          tikmix_stage_steps=STAGE_EVERY, tikmix_window_steps=WINDOW, tikmix_probe_sequences=8,
                          tikmix_probe_batch_size=4, tikmix_influence_source="training", tikmix_show_progress=False,
                          tikmix_collective_timeout=FREEZE_TIMEOUT if freeze else 600.0)
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=probe_collator)
    args = TrainingArguments(
        output_dir=out, max_steps=FREEZE_STEPS if freeze else MAX_STEPS, per_device_train_batch_size=BATCH,
        learning_rate=3e-3, use_cpu=True, report_to="none", save_strategy="steps", save_steps=SAVE_EVERY,
        logging_steps=1000, disable_tqdm=True, seed=0, remove_unused_columns=False, lr_scheduler_type="constant",
        ignore_data_skip=True, ddp_backend="gloo", ddp_find_unused_parameters=False,
        accelerator_config={"dispatch_batches": False},
    )
    model = toy_model(0)
    extra = arm(out, point, callback, model)
    trainer = Trainer(model=model, args=args, train_dataset=mixture,
                      data_collator=Recorder(os.path.join(out, f"seen-rank{RANK}-{attempt}.jsonl"), start),
                      callbacks=extra + [callback])
    callback.bind(trainer)
    trainer.train(resume_from_checkpoint=resume)


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        out, _, point = spec.partition("@")
        job(out, point or None)
    exit_rank()
