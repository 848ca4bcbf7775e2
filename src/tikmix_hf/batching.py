"""What the callback hands the measurement: the validation tasks' fixed examples and collated batches.

- :func:`check_validation`: the ``validation`` argument, checked once (names, clashes, emptiness);
- :func:`select_validation`: the ``tikmix_validation_sequences`` examples of each task, drawn once with
  the seed, that give the task's gradient at every stage;
- :func:`general_task`: a sample of the natural mixture, the validation task that guards general ability;
- :func:`draw_probes`: each domain's probe examples at a boundary (only top-ups where a training
  window measured the domain already);
- :class:`Batcher`: lists of examples to model batches with the run's collator, on the training device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["GENERAL_TASK", "Batcher", "check_validation", "draw_probes", "general_task", "log_key",
           "select_validation", "with_general_task"]

#: The name of the general-ability task (``tikmix_general_sequences``).
GENERAL_TASK = "general"
#: The probe round the general task is drawn from, apart from the stages' (stage k draws round k), and near
#: enough to the start that a streamed domain reads it without scanning far into its shards.
GENERAL_ROUND = 1000


def log_key(name: str) -> str:
    """``name`` as one segment of a metric name: letters, digits, ``_.-``; anything else becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def check_validation(validation: Any) -> dict[str, Any]:
    """``{task name: dataset}`` from a mapping (or a list of pairs); the error names what is wrong."""
    if isinstance(validation, Mapping):
        items = list(validation.items())
    elif isinstance(validation, (list, tuple)) and all(isinstance(x, tuple) and len(x) == 2 for x in validation):
        items = list(validation)
    else:
        raise TypeError(f"validation must be a mapping task name -> dataset, got {type(validation).__name__}")
    if not items:
        raise ValueError("validation is empty: give at least one task, e.g. {'held_out': dataset}")
    seen: dict[str, str] = {}
    for name, data in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"validation task names must be non-empty strings, got {name!r}")
        key = log_key(name)
        if key in seen:
            raise ValueError(f"validation task names {seen[key]!r} and {name!r} clash (both log as "
                             f"tikmix/influence/{key}); rename one")
        seen[key] = name
        if _size(data) == 0:
            raise ValueError(f"validation task {name!r} has no examples")
    return dict(items)


def select_validation(validation: Mapping[str, Any], sequences: int, seed: int) -> dict[str, list]:
    """Up to ``sequences`` examples of each task: a seeded sample of a sized dataset, else its first ones."""
    out = {}
    for t, (name, data) in enumerate(validation.items()):
        size = _size(data)
        if size is not None and hasattr(data, "__getitem__"):
            rng = np.random.default_rng([seed, 0xA11, t])
            examples = [data[int(i)] for i in rng.permutation(size)[: min(sequences, size)]]
        else:
            examples = _first(data, sequences)
        if not examples:
            raise ValueError(f"validation task {name!r} has no examples")
        out[name] = examples
    return out


def draw_probes(mixture: Any, sequences: int, *, cap: int | None, seen: Mapping[str, Mapping] | None,
                round: int) -> dict[str, list]:
    """``{domain: probe examples}`` for a boundary: ``sequences`` per domain (up to ``cap`` for the adaptive
    budget), less what a training window saw of the domain (``seen[d]["sequences"]``); with a window, only the
    domains that need a top-up are returned."""
    drawn = {}
    for d in mixture.domains:
        wanted = sequences if seen is None else max(sequences - seen[d]["sequences"], 0)
        if wanted or seen is None:
            drawn[d] = mixture.probe(d, max(wanted, cap or 0), round=round) if wanted else []
    return drawn


def general_task(mixture: Any, sequences: int) -> list:
    """``sequences`` examples of the natural mixture: each domain's share of them by its natural weight
    (largest remainders), drawn from its probe stream."""
    natural = mixture.resolve_weights("natural")
    quota = {d: sequences * natural[d] for d in mixture.domains}
    counts = {d: int(q) for d, q in quota.items()}
    for d in sorted(quota, key=lambda d: counts[d] - quota[d])[: sequences - sum(counts.values())]:
        counts[d] += 1
    return [e for d in mixture.domains if counts[d] for e in mixture.probe(d, counts[d], round=GENERAL_ROUND)]


def with_general_task(validation: dict[str, Any], mixture: Any, sequences: int) -> dict[str, Any]:
    """``validation`` with the general-ability task added when ``sequences`` > 0 (``tikmix_general_sequences``)."""
    if not sequences:
        return validation
    if GENERAL_TASK in validation:
        raise ValueError(f"validation has a task named {GENERAL_TASK!r}, the name of the general-ability task that "
                         "tikmix_general_sequences adds; rename yours or set tikmix_general_sequences=0")
    return {**validation, GENERAL_TASK: general_task(mixture, sequences)}


@dataclass
class Batcher:
    """Collates lists of examples into model batches on ``device`` with ``collate``."""

    collate: Callable[[list], Mapping[str, Any]]
    device: Any = None

    def batch(self, examples: list) -> dict:
        batch = self.collate(examples)
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def batches(self, examples: list, batch_size: int) -> list[dict]:
        return [self.batch(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]

    def lazy(self, examples: list, batch_size: int) -> Callable[[int], dict | None]:
        """``k -> batch k`` of ``examples`` (``None`` past the end), collated only when asked for."""

        def batch(k: int) -> dict | None:
            lo = k * batch_size
            return self.batch(examples[lo : lo + batch_size]) if lo < len(examples) else None

        return batch


def _size(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def _first(data: Iterable, n: int) -> list:
    examples = []
    for example in data:
        examples.append(example)
        if len(examples) == n:
            break
    return examples
