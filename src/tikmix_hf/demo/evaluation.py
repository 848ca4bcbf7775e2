"""How the demo scores a model: held-out losses, and the choice task's accuracy metric."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def held_out_losses(model: torch.nn.Module, sets: Mapping[str, Sequence[Mapping]],
                    batch_size: int = 32) -> dict[str, float]:
    """Mean token cross-entropy of each set over all its labelled tokens (forward passes only).

    The loss is the shared next-token loss (:func:`tikmix_hf._loss.summed_token_loss`) summed over
    batches and divided by the set's labelled targets, so it is a mean over tokens.
    """
    import torch

    from .._loss import forward_extras, labelled_targets, measurement_mode, summed_token_loss

    device = next(model.parameters()).device
    extras = forward_extras(model)
    out = {}
    with torch.no_grad(), measurement_mode(model):
        for name, examples in sets.items():
            total, count = 0.0, 0
            for lo in range(0, len(examples), batch_size):
                chunk = examples[lo : lo + batch_size]
                batch = {k: torch.tensor([e[k] for e in chunk], device=device)
                         for k in ("input_ids", "attention_mask", "labels")}
                total += float(summed_token_loss(model, batch, extras))
                count += int(labelled_targets(batch["labels"]))
            out[name] = total / max(count, 1)
    return out


def accuracy_metric():
    """The shipped ``choice_accuracy`` evaluate module, or ``None`` when ``evaluate`` is not installed."""
    try:
        from .corpora import load_metric

        return load_metric()
    except ImportError:
        logger.info("evaluate is not installed: accuracy is computed with numpy")
        return None
