"""What the callback hands the measurement: the validation tasks' fixed examples and collated batches.

- :func:`check_validation`: the ``validation`` argument, checked once (names, clashes, emptiness);
- :func:`select_validation`: the ``tikmix_validation_sequences`` examples of each task, drawn once with
  the seed, that give the task's gradient at every stage;
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

__all__ = ["Batcher", "check_validation", "draw_probes", "log_key", "select_validation"]


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
