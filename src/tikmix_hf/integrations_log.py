"""Log a large dict to the Trainer's ``report_to`` integrations without flooding the console.

``Trainer.log`` hands its dict to every callback, the console printers included, and clears the
Trainer's ``should_log`` flag. A stage's metrics hold tasks x domains entries, so the printers sit
that call out (the console gets one line instead), and the flag is restored so that the Trainer's
own loss, grad-norm and learning-rate log of the same step is not lost.
"""

from __future__ import annotations

from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback

__all__ = ["log_to_integrations"]


def log_to_integrations(trainer: Any, logs: dict[str, float]) -> bool:
    """``trainer.log(logs)`` for every callback but the console printers; whether the run has a printer."""
    handler = trainer.callback_handler
    everyone = handler.callbacks
    printers = [cb for cb in everyone if isinstance(cb, (ProgressCallback, PrinterCallback))]
    handler.callbacks = [cb for cb in everyone if cb not in printers]
    should_log = trainer.control.should_log
    try:
        trainer.log(logs)
    finally:
        handler.callbacks = everyone
        trainer.control.should_log = should_log
    return bool(printers)
