"""What the callback checks when training starts, so that a run fails now and not hours in.

- :func:`check_trainer`: the callback is bound to the Trainer that trains, and the Trainer will not
  rebuild it from a checkpoint;
- :func:`check_first_batches`: one validation batch per task and one probe batch per domain collate
  into batches the influence engine accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .batching import Batcher
from .influence.checks import check_batch

__all__ = ["check_first_batches", "check_trainer"]


def check_trainer(callback: Any, trainer: Any, args: Any, optimizer: Any) -> None:
    """Refuse to train when ``callback`` is unbound, bound to another Trainer, or would be rebuilt on resume."""
    if trainer is None:
        raise RuntimeError(
            "TiKMiXCallback is not bound to a Trainer: call callback.bind(trainer) after creating the Trainer "
            "(or pass trainer= to TiKMiXCallback)"
        )
    if callback not in trainer.callback_handler.callbacks or (
        optimizer is not None and optimizer is not trainer.optimizer
    ):
        raise RuntimeError(
            "TiKMiXCallback is bound to another Trainer than the one now training (a callback reused from an "
            "earlier run?); call callback.bind(trainer) with the Trainer you train"
        )
    if getattr(args, "restore_callback_states_from_checkpoint", False):
        raise ValueError(
            "restore_callback_states_from_checkpoint=True would rebuild TiKMiXCallback without its mixture and "
            "validation sets; set it to False: TiKMiXCallback restores its own state from the checkpoint"
        )


def check_first_batches(batcher: Batcher, validation: Mapping[str, list], mixture: Any, *, batch_size: int,
                        probe_sequences: int, device: Any) -> None:
    """Collate one validation batch per task and one probe batch per domain and check them.

    The checks are the influence engine's own, so a batch that passes here passes at the boundary.
    ``device`` is the parameters' device (``"cpu"``), which the engine compares with.
    """
    for name, examples in validation.items():
        check_batch(batcher.batch(examples[:batch_size]), f"validation task {name!r} batch 0", device)
    for domain in mixture.domains:
        examples = mixture.probe(domain, min(batch_size, probe_sequences), round=0)
        check_batch(batcher.batch(examples), f"probe batch of domain {domain!r}", device)
