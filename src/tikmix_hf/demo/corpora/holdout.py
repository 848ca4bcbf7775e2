"""Held-out splits: carve validation text out of each domain, so that it is never trained on."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence


def holdout_split(
    corpus: Mapping[str, Sequence[str]], fraction: float, seed: int = 0
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Carve ``fraction`` of each domain's documents out as held-out (validation) text.

    Returns ``(train, holdout)`` with the same domain names. Per domain, ``round(fraction * n)``
    documents (at least one when ``fraction > 0`` and the domain has two or more) are chosen
    with a generator seeded by ``seed`` and the domain name; both sides keep the original
    document order. Training documents whose text equals any held-out document (of any domain)
    are dropped, so held-out text never appears verbatim in training.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    holdout: dict[str, list[str]] = {}
    chosen: dict[str, set[int]] = {}
    for name, docs in corpus.items():
        n = len(docs)
        k = round(fraction * n)
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        picked = set(random.Random(f"{seed}:{name}").sample(range(n), k))
        chosen[name] = picked
        holdout[name] = [doc for i, doc in enumerate(docs) if i in picked]
    held_text = {doc for docs in holdout.values() for doc in docs}
    train = {
        name: [doc for i, doc in enumerate(docs) if i not in chosen[name] and doc not in held_text]
        for name, docs in corpus.items()
    }
    return train, holdout
