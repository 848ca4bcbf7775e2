"""The starting mixture tilted toward the validation tasks before step 0 (``tikmix_initial_weights="aligned"``).

Draws a sample of every domain from the mixture's probe stream and of every task's examples,
counts their tokens, and hands the counts to :func:`tikmix_hf.solvers.alignment.aligned_mixture`:
half the mixture's own weights, half spread over the domains whose token statistics best explain
each task's text (the share is ``tikmix_alignment_share``). No forward pass: reading and counting
tokens is all it costs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._distributed import agree
from .batching import select_validation
from .solvers.alignment import aligned_mixture

__all__ = ["ALIGNMENT_ROUND", "aligned_start", "starting_weights", "token_counts"]

#: The probe round the starting sample is drawn from, apart from every stage's (stage k draws round k).
ALIGNMENT_ROUND = 1 << 30


def _ids(example: Mapping[str, Any]) -> np.ndarray:
    ids = np.asarray(example["input_ids"]).reshape(-1)
    mask = example.get("attention_mask")
    if mask is not None:
        ids = ids[np.asarray(mask).reshape(-1) != 0]
    return ids.astype(np.int64)


def token_counts(groups: Sequence[Sequence[Mapping[str, Any]]], vocab_size: int | None = None) -> np.ndarray:
    """``(len(groups), V)`` counts of the (unmasked) ``input_ids`` of each group of examples."""
    ids = [np.concatenate([_ids(e) for e in group]) if len(group) else np.zeros(0, np.int64) for group in groups]
    if any((x < 0).any() for x in ids):
        raise ValueError("input_ids must be non-negative token ids")
    V = vocab_size or 1 + max((int(x.max()) for x in ids if x.size), default=0)
    return np.stack([np.bincount(x, minlength=V)[:V] for x in ids]).astype(np.float64)


def aligned_start(mixture: Any, task_examples: Mapping[str, Sequence[Mapping[str, Any]]], *, sequences: int,
                  share: float) -> tuple[dict[str, float], dict]:
    """The aligned starting weights of ``mixture`` for ``task_examples``, and a JSON account of them."""
    started = time.perf_counter()
    domains = list(mixture.domains)
    samples = [mixture.probe(d, sequences, round=ALIGNMENT_ROUND) for d in domains]
    counts = token_counts([*samples, *task_examples.values()])
    base = mixture.weights
    result = aligned_mixture(counts[: len(domains)], counts[len(domains):], [base[d] for d in domains], share=share)
    weights = dict(zip(domains, result.weights.tolist()))
    info = {
        "share": share,
        "base": base,
        "sequences_per_domain": sequences,
        "domain_tokens": dict(zip(domains, counts[: len(domains)].sum(axis=1).astype(int).tolist())),
        "task_tokens": dict(zip(task_examples, counts[len(domains):].sum(axis=1).astype(int).tolist())),
        "task_matches": {t: dict(zip(domains, row.tolist())) for t, row in zip(task_examples, result.matches)},
        "seconds": time.perf_counter() - started,
    }
    return weights, info


def starting_weights(initial: Any, mixture: Any, validation: Mapping[str, Any], *, sequences: int, share: float,
                     seed: int) -> tuple[Any, dict | None]:
    """``initial`` (``"keep"``, a keyword or a mapping) with ``"aligned"`` computed: ``(weights, account)``.

    Every rank gets rank 0's aligned weights, to the bit.
    """
    if initial != "aligned":
        return initial, None
    tasks = select_validation(validation, sequences, seed)
    weights, info = aligned_start(mixture, tasks, sequences=sequences, share=share)
    return dict(zip(weights, agree(list(weights.values())))), info
