"""The starting mixture tilted toward the validation tasks before step 0 (``tikmix_initial_weights="aligned"``).

Draws a sample of every domain from the mixture's probe stream and of every task's examples and
hands their tokens to :func:`tikmix_hf.solvers.alignment.aligned_mixture`: part of the mixture's own
weights, the rest (``tikmix_alignment_share``) spread over the domains whose token statistics best
explain each task's text. No forward pass: reading and counting tokens is all it costs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._distributed import agree
from .batching import select_validation
from .solvers.alignment import aligned_mixture

__all__ = ["ALIGNMENT_ROUND", "aligned_start", "starting_weights", "token_ids"]

#: The probe round the starting sample is drawn from: the first stage's (counting its tokens trains nothing, and
#: a streamed domain reads a later round's rows further into its shards).
ALIGNMENT_ROUND = 0


def token_ids(example: Mapping[str, Any]) -> np.ndarray:
    """An example's token ids, without the positions its attention mask leaves out (padding)."""
    ids = np.asarray(example["input_ids"]).reshape(-1)
    mask = example.get("attention_mask")
    if mask is not None:
        ids = ids[np.asarray(mask).reshape(-1) != 0]
    return ids.astype(np.int64)


def aligned_start(mixture: Any, task_examples: Mapping[str, Sequence[Mapping[str, Any]]], *, sequences: int,
                  share: float) -> tuple[dict[str, float], dict]:
    """The aligned starting weights of ``mixture`` for ``task_examples``, and a JSON account of them."""
    started = time.perf_counter()
    domains = list(mixture.domains)
    samples = [[token_ids(e) for e in mixture.probe(d, sequences, round=ALIGNMENT_ROUND)] for d in domains]
    tasks = [[token_ids(e) for e in examples] for examples in task_examples.values()]
    base = mixture.weights
    result = aligned_mixture(samples, tasks, [base[d] for d in domains], share=share)
    info = {
        "share": share,
        "base": base,
        "sequences_per_domain": sequences,
        "domain_tokens": {d: int(sum(s.size for s in group)) for d, group in zip(domains, samples)},
        "task_tokens": {t: int(sum(s.size for s in group)) for t, group in zip(task_examples, tasks)},
        "task_matches": {t: dict(zip(domains, row.tolist())) for t, row in zip(task_examples, result.matches)},
        "seconds": time.perf_counter() - started,
    }
    return dict(zip(domains, result.weights.tolist())), info


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
