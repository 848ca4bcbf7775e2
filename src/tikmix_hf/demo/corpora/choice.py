"""A validation task scored by accuracy: pick the true continuation of a prefix.

:func:`continuation_choice_items` builds "which continuation is the real one" items,
:func:`choice_predictions` / :func:`choice_accuracy` score a causal LM on them, and
:func:`load_metric` loads the same accuracy as an ``evaluate`` module shipped inside this
package (never a hub name).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import evaluate


def continuation_choice_items(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    n_items: int,
    n_choices: int = 4,
    prefix_tokens: int = 32,
    cont_tokens: int = 8,
    seed: int = 0,
    distractor_texts: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Multiple-choice items "which of these continues the prefix?" built from ``texts``.

    Each item takes a random window of a random document: its first ``prefix_tokens`` tokens
    are the prefix and the next ``cont_tokens`` the true continuation. The ``n_choices - 1``
    distractors are windows of ``cont_tokens`` tokens from ``distractor_texts`` (other domains)
    or, when it is None, from other places of ``texts`` (another document, or the same one at
    least ``cont_tokens`` away). Choices within an item are distinct token sequences.

    Returns dicts ``{"prefix_ids": [...], "choice_ids": [[...], ...], "label": int}`` where
    ``label`` indexes the true continuation; deterministic for a given ``seed``.
    """
    from ...testing import encode

    if n_choices < 2:
        raise ValueError(f"n_choices must be >= 2, got {n_choices}")
    if prefix_tokens < 1 or cont_tokens < 1:
        raise ValueError(f"prefix_tokens and cont_tokens must be >= 1, got {prefix_tokens}, {cont_tokens}")
    window = prefix_tokens + cont_tokens
    docs = [ids for ids in encode(texts, tokenizer) if len(ids) >= window]
    if not docs:
        raise ValueError(f"no document of texts has the {window} tokens an item needs")
    if distractor_texts is None:
        pool = docs
    else:
        pool = [ids for ids in encode(distractor_texts, tokenizer) if len(ids) >= cont_tokens]
    same_pool = distractor_texts is None
    if not pool:
        raise ValueError(f"no document of distractor_texts has {cont_tokens} tokens")
    rng = np.random.default_rng(seed)
    items: list[dict[str, Any]] = []
    for _ in range(20 * n_items):
        if len(items) == n_items:
            break
        d = int(rng.integers(len(docs)))
        start = int(rng.integers(len(docs[d]) - window + 1))
        cont_start = start + prefix_tokens
        choices = [docs[d][cont_start : cont_start + cont_tokens]]
        for _ in range(50 * n_choices):
            if len(choices) == n_choices:
                break
            p = int(rng.integers(len(pool)))
            s = int(rng.integers(len(pool[p]) - cont_tokens + 1))
            if same_pool and p == d and abs(s - cont_start) < cont_tokens:
                continue
            candidate = pool[p][s : s + cont_tokens]
            if candidate not in choices:
                choices.append(candidate)
        if len(choices) < n_choices:
            continue
        label = int(rng.integers(n_choices))
        choices[0], choices[label] = choices[label], choices[0]
        items.append({
            "prefix_ids": list(docs[d][start:cont_start]),
            "choice_ids": [list(c) for c in choices],
            "label": label,
        })
    if len(items) < n_items:
        raise ValueError(
            f"built only {len(items)} of {n_items} items with {n_choices} distinct choices; "
            "give more or longer texts, or fewer choices"
        )
    return items


def choice_predictions(model: Any, items: Sequence[Mapping[str, Any]], *, batch_size: int = 32) -> np.ndarray:
    """Index of the choice with the highest mean log-likelihood of its tokens given the prefix.

    Forward passes only, under ``torch.no_grad()`` and in :func:`~tikmix_hf._loss.measurement_mode`
    (mode flags restored afterwards). Choices may differ in length (right padding). A choice's
    score is minus the mean of its tokens' next-token losses (:func:`~tikmix_hf._loss.token_losses`).
    """
    import torch

    from ..._loss import IGNORE_INDEX, forward_extras, measurement_mode, token_losses

    sequences, prefixes = [], []
    for item in items:
        prefix = list(item["prefix_ids"])
        for choice in item["choice_ids"]:
            sequences.append(prefix + list(choice))
            prefixes.append(len(prefix))
    device = next(model.parameters()).device
    extras = forward_extras(model)
    scores = np.empty(len(sequences))
    with torch.no_grad(), measurement_mode(model):
        for lo in range(0, len(sequences), batch_size):
            batch = sequences[lo : lo + batch_size]
            width = max(map(len, batch))
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
                a = prefixes[lo + row]
                labels[row, a : len(seq)] = ids[row, a : len(seq)]  # only the choice's tokens are scored
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
            losses = token_losses(model, inputs, extras).cpu()
            # token_losses is flat in row order; each row holds len(choice) labelled targets.
            counts = [len(seq) - prefixes[lo + row] for row, seq in enumerate(batch)]
            for row, chunk in enumerate(torch.split(losses, counts)):
                scores[lo + row] = -chunk.float().mean().item()
    predictions = np.empty(len(items), dtype=np.int64)
    pos = 0
    for i, item in enumerate(items):
        n = len(item["choice_ids"])
        predictions[i] = int(np.argmax(scores[pos : pos + n]))
        pos += n
    return predictions


def choice_accuracy(model: Any, items: Sequence[Mapping[str, Any]], *, batch_size: int = 32) -> float:
    """Fraction of items whose true continuation the model scores highest (see
    :func:`choice_predictions`); chance is ``1 / n_choices``."""
    if not items:
        raise ValueError("choice_accuracy needs at least one item")
    predictions = choice_predictions(model, items, batch_size=batch_size)
    labels = np.array([item["label"] for item in items])
    return float(np.mean(predictions == labels))


def load_metric(name: str = "choice_accuracy", **kwargs: Any) -> evaluate.EvaluationModule:
    """Load an ``evaluate`` metric module shipped in ``tikmix_hf/demo/metrics/<name>/`` (offline).

    ``evaluate`` is imported here, on first use (it takes seconds). Example::

        metric = load_metric()
        metric.compute(predictions=choice_predictions(model, items),
                       references=[it["label"] for it in items])["accuracy"]
    """
    from importlib import resources

    import evaluate

    folder = resources.files("tikmix_hf.demo") / "metrics" / name
    if not (folder / f"{name}.py").is_file():
        raise ValueError(f"no metric module {name!r} shipped in tikmix_hf/demo/metrics/")
    with resources.as_file(folder) as path:
        return evaluate.load(str(path), **kwargs)
