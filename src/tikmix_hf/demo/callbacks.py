"""The Trainer callbacks of one demo arm: held-out evaluation during training and a progress bar.

This module imports transformers; :mod:`tikmix_hf.demo.engine` imports it when an arm trains, so
that ``import tikmix_hf.demo`` stays cheap.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import TrainerCallback

from .corpora import choice_predictions
from .data import DemoData
from .evaluation import held_out_losses


class HeldOutEvaluator(TrainerCallback):
    """Held-out losses and choice accuracy at step 0, every ``every`` steps and at the end."""

    def __init__(self, data: DemoData, every: int, progress=None):
        self.data, self.every, self.progress = data, every, progress
        self.curve: list[dict] = []
        self.seconds = 0.0

    def measure(self, model, step: int) -> None:
        started = time.perf_counter()
        losses = held_out_losses(model, self.data.test)
        labels = np.array([it["label"] for it in self.data.choice_items])
        accuracy = float(np.mean(choice_predictions(model, self.data.choice_items) == labels))
        self.curve.append({"step": step, "losses": losses, "average": float(np.mean(list(losses.values()))),
                           "accuracy": accuracy})
        self.seconds += time.perf_counter() - started
        if self.progress is not None:
            self.progress.note(val=f"{self.curve[-1]['average']:.3f}")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.measure(model, state.global_step)


class ArmProgress(TrainerCallback):
    """One tqdm bar per arm, with the training loss, the last held-out average and the TiKMiX stage."""

    def __init__(self, desc: str, disable: bool):
        self.desc, self.disable = desc, disable
        self.bar: tqdm | None = None
        self.postfix: dict[str, Any] = {}

    def note(self, **values) -> None:
        self.postfix.update(values)
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", disable=self.disable,
                        dynamic_ncols=True, leave=True)
        self.note()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.note(loss=f"{logs['loss']:.3f}")
        if "tikmix/stage" in logs:
            self.note(stage=int(logs["tikmix/stage"]))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
