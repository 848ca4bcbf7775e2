"""What the callback checks when training starts, so that a run fails now and not hours in.

- :func:`check_trainer`: the callback is bound to the Trainer that trains, and the Trainer will not
  rebuild it from a checkpoint;
- :func:`check_first_batches`: one validation batch per task and one probe batch per domain collate
  into batches the influence engine accepts, and the model gives the logits the measurement reads.

What the training window needs of the set-up (compilation, checkpointing, a fused loss...) is checked
by :mod:`tikmix_hf.setup_checks`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._distributed import rank_and_world, unwrap
from ._loss import measurement_mode, summed_token_loss
from .batching import Batcher
from .influence.checks import check_batch

__all__ = ["check_first_batches", "check_trainer"]

#: Why a DeepSpeed ZeRO-3 model is refused when training starts.
ZERO3 = (
    "DeepSpeed ZeRO-3 partitions every parameter over the ranks (they carry ds_id) and gathers them in its own "
    "hooks, which the measurement cannot differentiate through: train with ZeRO stage 1 or 2 (measured like DDP), "
    "with FSDP (measured on its shards), or mix without measuring (tikmix_solver static or replay)"
)


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
    world = rank_and_world()[1]
    if world > 1 and getattr(args, "world_size", world) == 1:
        raise RuntimeError(
            f"{world} processes were launched, but the Trainer trains each as a copy of its own "
            "(TrainingArguments.world_size is 1): without a GPU the Trainer joins the processes only with "
            "use_cpu=True; pass --use_cpu (use_cpu=True), or launch a single process"
        )
    if getattr(args, "restore_callback_states_from_checkpoint", False):
        raise ValueError(
            "restore_callback_states_from_checkpoint=True would rebuild TiKMiXCallback without its mixture and "
            "validation sets; set it to False: TiKMiXCallback restores its own state from the checkpoint"
        )


def check_first_batches(batcher: Batcher, validation: Mapping[str, list], mixture: Any, *, batch_size: int,
                        probe_sequences: int, model: torch.nn.Module | None, measures: bool = True,
                        device: Any = None) -> None:
    """Collate one validation batch per task and one probe batch per domain and check them.

    The checks are the influence engine's own, so a batch that passes here passes at the boundary; the
    engine compares the batches' device with the parameters' (``device`` where there is no ``model``).
    Where the mixer ``measures``, the first validation batch also goes through the measurement's own
    forward (no gradient, dropout off, every mode and random stream restored), so that a model the
    measurement cannot read (ZeRO-3, a forward that returns only the loss, logits of part of the
    sequence) fails now rather than at the first boundary.
    """
    device = next(model.parameters()).device if model is not None else device
    first: dict | None = None  # the first task's (validation is never empty: check_validation)
    for name, examples in validation.items():
        batch = batcher.batch(examples[:batch_size])
        check_batch(batch, f"validation task {name!r} batch 0", device)
        first = batch if first is None else first
    for domain in mixture.domains:
        examples = mixture.probe(domain, min(batch_size, probe_sequences), round=0)
        check_batch(batcher.batch(examples), f"probe batch of domain {domain!r}", device)
    if model is not None and measures and first is not None:
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ValueError(ZERO3)
        module = unwrap(model, sharded=True)
        with torch.no_grad(), measurement_mode(module):
            summed_token_loss(module, first)
