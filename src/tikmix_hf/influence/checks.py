"""Argument checks of the influence functions, and the batch sets they work on.

Every check raises an error that names the argument, the offending value and what to pass instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from .._loss import IGNORE_INDEX, labelled_targets
from ..validation import as_float64, off_simplex

Batches = Mapping[str, "Sequence[Mapping[str, torch.Tensor]]"]
ParamFilter = Callable[[str, torch.nn.Parameter], bool] | Sequence[str] | None


def check_projection_dim(projection_dim):
    if projection_dim is None:
        return None
    is_integer = isinstance(projection_dim, (int, np.integer)) and not isinstance(projection_dim, bool)
    if not is_integer or projection_dim <= 0:
        raise ValueError(
            f"projection_dim must be a positive integer (the number of projected dimensions k) or None "
            f"for exact scores, got {projection_dim!r}"
        )
    return int(projection_dim)


def check_damping(damping, preconditioner):
    """Only ``diag_fisher`` is damped: identity needs no damping and adam steps with the optimizer's eps."""
    if damping is None or preconditioner != "diag_fisher":
        return None
    damping = float(damping)
    if not math.isfinite(damping) or damping <= 0:
        raise ValueError(
            f"damping must be a finite positive number (it is added to the Fisher diagonal before "
            f"inverting) or None for 0.1 * mean(F), got {damping!r}"
        )
    return damping


def check_keep(keep):
    if keep is False or keep is None:
        return None
    if keep is True:
        return "params"
    if isinstance(keep, str) and keep == "cpu":
        return torch.device("cpu")
    raise ValueError(f"keep_domain_gradients must be False, True or 'cpu', got {keep!r}")


def check_mixtures(W: ArrayLike, domain_names: Sequence[str]) -> np.ndarray:
    m = len(domain_names)
    W = as_float64(W, f"W must be an (N, {m}) array of mixture weights")
    if W.ndim != 2 or W.shape[1] != m or W.shape[0] == 0:
        raise ValueError(
            f"W must have shape (N, {m}) with one column per domain {domain_names}, got shape {W.shape}; "
            f"a single mixture w goes in as W = w[None, :]"
        )
    bad = off_simplex(W)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"row {k} of W is not on the simplex (weights >= 0 summing to 1): {W[k].tolist()} "
            f"(sum {W[k].sum():.6g}); normalise each row, e.g. W / W.sum(axis=1, keepdims=True)"
        )
    return W


@dataclasses.dataclass
class BatchSet:
    """One domain or task: its batches and the labelled next-token count of each."""

    kind: str
    name: str
    batches: list
    counts: list[int]

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    def local(self, rank, world) -> list[tuple[Mapping, int]]:
        """This rank's slice (batch ``k`` with ``k % world == rank``), skipping batches with no target."""
        pairs = zip(self.batches[rank::world], self.counts[rank::world])
        return [(batch, count) for batch, count in pairs if count > 0]

    def local_indices(self, rank, world) -> list[int]:
        """Global indices ``k`` of :meth:`local`'s batches, in the same order (for the even/odd split)."""
        return [k for k in range(rank, len(self.batches), world) if self.counts[k] > 0]


def batch_sets(batches, argument, kind, device) -> dict[str, BatchSet]:
    """Check ``{name: batches}`` and count labelled targets on every rank from the full lists.

    Counting here, once and with one device sync per set, keeps the passes free of host syncs
    and needs no collective (every rank sees the full lists).
    """
    if not isinstance(batches, Mapping):
        raise TypeError(
            f"{argument} must be a mapping {{{kind} name: list of batches}}, got {type(batches).__name__}"
        )
    if not batches:
        raise ValueError(f"{argument} is empty; give at least one {kind} with at least one batch")
    sets = {}
    for name, value in batches.items():
        name = str(name)
        if isinstance(value, Mapping) or torch.is_tensor(value):
            raise TypeError(
                f"{kind} {name!r}: expected an iterable of batches (dicts of tensors), got a single "
                f"{type(value).__name__}; wrap it in a list"
            )
        items = list(value)
        if not items:
            raise ValueError(
                f"{kind} {name!r} has no batches; give it at least one batch or remove it from {argument}"
            )
        for index, batch in enumerate(items):
            check_batch(batch, f"{kind} {name!r} batch {index}", device)
        counts = torch.stack([labelled_targets(b["labels"]) for b in items]).tolist()
        if sum(counts) == 0:
            raise ValueError(
                f"{kind} {name!r}: every label is {IGNORE_INDEX} (after the next-token shift), so its "
                f"loss is undefined; give it batches with at least one labelled target token"
            )
        sets[name] = BatchSet(kind, name, items, counts)
    return sets


def first_sequences(batches: Batches, n: int | None, argument: str) -> Batches:
    """Each set cut to its first ``n`` sequences (rows of its batches, in order); ``None`` keeps them all.

    A batch's tensors are cut along their first dimension, so a set of batches of 8 cut to 12 keeps the
    first batch and the first 4 rows of the second; the later batches are dropped.
    """
    if n is None:
        return batches
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{argument} must be a positive integer (sequences per set) or None for all, got {n!r}")
    if not isinstance(batches, Mapping):
        return batches  # batch_sets names the error
    cut = {}
    for name, value in batches.items():
        items = None if isinstance(value, Mapping) or torch.is_tensor(value) else list(value)
        if items is None or not all(isinstance(b, Mapping) and torch.is_tensor(b.get("labels")) for b in items):
            cut[name] = value if items is None else items  # not labelled batches: batch_sets names the error
            continue
        kept, left = [], int(n)
        for batch in items:
            rows = batch["labels"].shape[0]
            if left <= 0:
                break
            if rows > left:
                batch = {k: v[:left] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v
                         for k, v in batch.items()}
            kept.append(batch)
            left -= rows
        cut[name] = kept
    return cut


def check_batch(batch: Any, where: str, device: torch.device | str | None) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{where} is a {type(batch).__name__}; a batch must be a dict of tensors")
    if "labels" not in batch or not torch.is_tensor(batch["labels"]):
        raise ValueError(
            f"{where} has no 'labels' tensor (keys: {sorted(batch)}); add labels, e.g. labels = "
            f"input_ids with prompt and padding positions set to {IGNORE_INDEX}"
        )
    for key, value in batch.items():
        if torch.is_tensor(value) and value.device != device:
            raise ValueError(
                f"{where}: tensor {key!r} is on {value.device} but the model's parameters are on "
                f"{device}; move the batches first, e.g. "
                f"{{k: v.to({str(device)!r}) for k, v in batch.items()}}"
            )


def finite_losses(loss_sums, sets, context="") -> dict[str, float]:
    losses = {}
    for (name, bset), total in zip(sets.items(), loss_sums.tolist()):
        loss = total / bset.tokens
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the mean loss of {bset.kind} {name!r} is {loss}{context}; check its batches (token ids "
                f"within the vocabulary) and the model's numerics (fp16 overflow, a diverged checkpoint)"
            )
        losses[name] = loss
    return losses


def check_finite_scores(scores, task_names, domain_names):
    bad = np.argwhere(~np.isfinite(scores))
    if len(bad):
        i, j = bad[0]
        raise FloatingPointError(
            f"S[{task_names[i]!r}, {domain_names[j]!r}] = {scores[i, j]} (non-finite gradient); check the "
            f"batches of domain {domain_names[j]!r} and task {task_names[i]!r} and the model's numerics"
        )
