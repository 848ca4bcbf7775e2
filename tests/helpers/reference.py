"""Brute-force references the fast paths are checked against, independent of tikmix_hf's own code."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # written out, not imported: the reference must not share the code it checks


def reference_summed_loss(model, batch):
    """Summed next-token cross-entropy in fp64 with an explicit shift and mask.

    Returns ``(summed loss, labelled token count)``.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    mask = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return -(picked * mask).sum(), int(mask.sum())
