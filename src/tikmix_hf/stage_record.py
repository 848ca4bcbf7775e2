"""One stage boundary as the run records it: the ``history.json`` entry and the metrics it logs.

:class:`StageRecord` is what the callback writes for each decision; :func:`stage_metrics` turns one
into the ``tikmix/*`` values that ``Trainer.log`` sends to every ``report_to`` integration, and
:func:`stage_notes` says what a user should be warned about. Pure functions of the record, so they
are tested without training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .batching import log_key

__all__ = ["STATUS_CODES", "StageRecord", "StageSeconds", "entropy", "measurement_passes", "measurement_tokens",
           "stage_metrics", "stage_notes", "start_metrics"]

#: ``tikmix/status`` as a number, for the integrations that plot only numbers.
STATUS_CODES = {"converged": 0, "restarted": 1, "fallback": 2, "skipped": 3, "replayed": 4}


@dataclass
class StageSeconds:
    """Wall time of a decision: measuring (a training window's validation pass and hooks included), solving,
    and everything the stage took."""

    influence: float
    solve: float
    total: float


@dataclass
class StageRecord:
    """One decision: when it happened, the weights before and after, and the mixer's account of it."""

    stage: int  # 1 for the first decision
    step: int
    samples_consumed: int
    tokens_seen: int | None
    effective_index: int  # the first stream sample drawn with ``weights_after``
    weights_before: dict[str, float]
    weights_after: dict[str, float]
    entropy: float
    solver: str
    status: str
    message: str
    influence: dict | None  # InfluenceResult.to_dict(), when the mixer measured one
    solver_result: dict | None  # SolverResult.to_dict(), when a solver ran
    mixer: dict  # the mixer's own JSON-ready account (Decision.extra)
    metrics: dict[str, Any]  # the mixer's diagnostics (Decision.metrics): numbers, or {task: number}
    seconds: StageSeconds
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what this stage could not record, and why

    def to_dict(self) -> dict:
        """The ``history.json`` entry."""
        return dataclasses.asdict(self)


def entropy(weights: Mapping[str, float]) -> float:
    """``H(w) = -sum_j w_j log w_j`` in nats."""
    return -sum(w * math.log(w) for w in weights.values() if w > 0)


def stage_notes(record: StageRecord, entropy_warning: float) -> list[str]:
    """What a user should be warned about: a mixture collapsing onto few domains, a skipped decision, a
    training window that read no sequence (its hooks never ran). (Sequences a window left out because they
    overflowed are said by the window itself.)"""
    notes = []
    window = (record.influence or {}).get("window")
    if window and not any(window["sequences"].values()):
        notes.append("the training window read no training sequence (its hooks never ran on the training forward: a "
                     "compiled model, or a forward that bypasses the model's layers), so this decision rests on the "
                     "top-up probes alone; set tikmix_influence_source='probes' to measure on the full probe budget")
    m = len(record.weights_after)
    if m > 1 and record.entropy < entropy_warning * math.log(m):
        notes.append(f"the weights' entropy {record.entropy:.3f} is below {entropy_warning} x log({m}): the mixture "
                     "is collapsing onto few domains (consider tikmix_floor or tikmix_max_change)")
    if record.status == "skipped":
        notes.append(record.message)
    return notes


def start_metrics(weights: Mapping[str, float]) -> dict[str, float]:
    """``tikmix/weight/<domain>`` of the mixture training starts from (logged at step 0)."""
    return {f"tikmix/weight/{log_key(d)}": float(w) for d, w in weights.items()}


def stage_metrics(record: StageRecord | Mapping[str, Any], *, log_matrix: bool = True) -> dict[str, float]:
    """``tikmix/*`` metrics of one stage (a record or its ``history.json`` entry)."""
    entry = record.to_dict() if isinstance(record, StageRecord) else record
    logs: dict[str, float] = {"tikmix/stage": float(entry["stage"])}
    for d, w in entry["weights_after"].items():
        logs[f"tikmix/weight/{log_key(d)}"] = float(w)
    logs["tikmix/entropy"] = float(entry["entropy"])
    logs["tikmix/status"] = float(STATUS_CODES.get(entry["status"], -1))
    logs["tikmix/seconds"] = float(entry["seconds"]["total"])
    logs["tikmix/seconds_influence"] = float(entry["seconds"]["influence"])
    for name, value in (entry.get("metrics") or {}).items():
        if isinstance(value, Mapping):  # one value per task (or domain): tikmix/<name>/<key>
            logs.update({f"tikmix/{log_key(name)}/{log_key(k)}": float(v) for k, v in value.items() if v is not None})
        elif value is not None:
            logs[f"tikmix/{log_key(name)}"] = float(value)
    influence = entry["influence"]
    if log_matrix and influence is not None:
        for t, row in zip(influence["task_names"], influence["scores"]):
            for d, s in zip(influence["domain_names"], row):
                logs[f"tikmix/influence/{log_key(t)}/{log_key(d)}"] = float(s)
    return logs


def measurement_passes(influence: Mapping[str, Any]) -> dict[str, int]:
    """Labelled tokens a stage's measurement forwarded and differentiated beyond training, per domain and task.

    Its probes and its validation sequences (an ``InfluenceResult.to_dict()``); a training window's domain
    sequences are training's own, so of the domains only its top-up probes count.
    """
    window = influence.get("window")
    domain = window["probe_tokens"] if window else influence["domain_tokens"]
    return {**domain, **influence["task_tokens"]}


def measurement_tokens(influence: Mapping[str, Any]) -> int:
    """Tokens a stage's measurement forwarded beyond training (:func:`measurement_passes`, summed)."""
    return int(sum(measurement_passes(influence).values()))
