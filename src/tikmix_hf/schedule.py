"""Mixture schedules that leave the run that found them: read, check, resolve and write them.

A schedule is a list of phases, each the weights to use from one position of training on::

    - at: 0.0                      # a fraction of training (the default kind)
      weights: {code: 0.2, web: 0.8}
    - at: {steps: 5000}            # an optimizer step, honoured exactly
      weights: {code: 0.5, web: 0.5}
    - at: {tokens: 2000000000}     # training tokens seen, all ranks together
      weights: {code: 0.7, web: 0.3}

Fractions make a schedule travel: a run ten times longer gets the same phases at the same share
of its training. A phase at position 0 gives the weights from the first sample on. The file may
be YAML or JSON; the ``history.json`` of a TiKMiX run is read as the schedule that run followed
(its starting weights at 0, then every stage's weights at the stage's fraction of training).

Pure Python and numpy: no torch, no transformers. YAML needs ``pyyaml``, imported only when a
YAML file is read or written.

Example::

    schedule = load_schedule("runs/proxy/tikmix/history.json")
    schedule.check_domains(["code", "web"])            # names the missing and unknown domains
    steps = schedule.resolve_steps(max_steps=20000)   # the step of every phase in a 20k-step run
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._io import FileReadError, read_structured, save_text_atomic, yaml_module
from .history import HISTORY_FORMAT
from .validation import check_weights

__all__ = ["KINDS", "Phase", "Schedule", "export_schedule", "load_schedule", "parse_domain_map",
           "schedule_from_history", "schedule_from_list"]

#: How a phase's position is given: a fraction of training, an optimizer step, or training tokens.
KINDS = ("fraction", "steps", "tokens")

_FORMAT_HELP = (
    "a schedule is a YAML or JSON list of entries {at: <fraction in [0, 1) | {steps: N} | {tokens: N}>, "
    "weights: {domain: weight}}, or the history.json a TiKMiX run writes to <output_dir>/tikmix/"
)


@dataclasses.dataclass(frozen=True)
class Phase:
    """The weights to use from one position of training on (``kind`` is one of :data:`KINDS`)."""

    kind: str
    at: float | int
    weights: dict[str, float]

    def position(self) -> dict | float:
        """The position as a schedule file writes it."""
        return float(self.at) if self.kind == "fraction" else {self.kind: int(self.at)}

    def describe(self) -> str:
        return f"{self.at:g} of training" if self.kind == "fraction" else f"{self.kind} {int(self.at):,}"


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Phases in order, and where they came from (``source``: a path or a description)."""

    phases: tuple[Phase, ...]
    source: str

    def to_list(self) -> list[dict]:
        """The schedule as a file holds it (JSON-ready)."""
        return [{"at": p.position(), "weights": dict(p.weights)} for p in self.phases]

    @property
    def kinds(self) -> set[str]:
        return {p.kind for p in self.phases}

    def renamed(self, mapping: Mapping[str, str]) -> Schedule:
        """The schedule with its domains renamed by ``mapping`` (schedule name -> run name); others keep theirs."""
        unknown = sorted(set(mapping) - {d for p in self.phases for d in p.weights})
        if unknown:
            raise ValueError(
                f"tikmix_schedule_domains renames {unknown}, which the schedule {self.source} does not name; "
                f"its domains are {sorted({d for p in self.phases for d in p.weights})}"
            )
        phases = []
        for p in self.phases:
            weights: dict[str, float] = {}
            for name, w in p.weights.items():
                new = mapping.get(name, name)
                if new in weights:
                    raise ValueError(
                        f"tikmix_schedule_domains maps two domains of {self.source} onto {new!r}; map each onto its own"
                    )
                weights[new] = w
            phases.append(dataclasses.replace(p, weights=weights))
        return dataclasses.replace(self, phases=tuple(phases))

    def check_domains(self, domains: Sequence[str]) -> None:
        """Raise unless every phase gives a weight to exactly ``domains``, naming the difference."""
        run = list(domains)
        for k, p in enumerate(self.phases):
            missing = [d for d in run if d not in p.weights]
            unknown = sorted(set(p.weights) - set(run))
            if missing or unknown:
                parts = []
                if missing:
                    parts.append(f"it gives no weight to this run's domains {missing} (write 0.0 to drop one)")
                if unknown:
                    parts.append(f"it names domains {unknown} that this run does not have")
                raise ValueError(
                    f"tikmix_schedule={self.source!r}: entry {k} (at {p.describe()}): " + "; ".join(parts)
                    + f". This run's domains are {run}; rename the schedule's domains with tikmix_schedule_domains, "
                    "e.g. '{\"old_name\": \"new_name\"}'"
                )

    def resolve_steps(self, max_steps: int) -> list[int]:
        """The optimizer step at which every phase starts in a run of ``max_steps`` (fractions or steps).

        A fraction ``f`` starts at ``round(f * max_steps)``, the rule of ``tikmix_stage_fractions``. The
        steps must increase strictly and lie inside the run: ``0`` (from the first sample) up to
        ``max_steps - 1`` (the last step whose end can still change what is drawn).
        """
        if "tokens" in self.kinds:
            raise ValueError(f"tikmix_schedule={self.source!r}: token positions have no step before training")
        steps = [int(p.at) if p.kind == "steps" else round(p.at * max_steps) for p in self.phases]
        for k, (p, s) in enumerate(zip(self.phases, steps)):
            if s >= max_steps:
                raise ValueError(
                    f"tikmix_schedule={self.source!r}: entry {k} is at {p.describe()}, i.e. step {s}, outside this run "
                    f"of max_steps={max_steps}; give a position before the last step, or train longer"
                )
            if k and s <= steps[k - 1]:
                raise ValueError(
                    f"tikmix_schedule={self.source!r}: entry {k} (at {p.describe()}) falls on step {s}, not after "
                    f"entry {k - 1} (at {self.phases[k - 1].describe()}, step {steps[k - 1]}) in a run of "
                    f"max_steps={max_steps}; put the entries in order and at least one step apart, or merge them"
                )
        return steps


# ------------------------------------------------------------------------------------------------
# Reading


def _read(path: Path) -> Any:
    try:
        return read_structured(path, f"tikmix_schedule={str(path)!r}")
    except FileReadError as err:
        raise ValueError(f"{err}; {_FORMAT_HELP}") from None


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} = {value!r} is not a number")
    return float(value)


def _position(at: Any, where: str) -> tuple[str, float | int]:
    if isinstance(at, Mapping):
        if len(at) != 1 or next(iter(at)) not in KINDS:
            raise ValueError(f"{where}: at = {dict(at)!r}; give one of {{fraction: f}}, {{steps: N}} or {{tokens: N}}")
        kind, value = next(iter(at.items()))
    else:
        kind, value = "fraction", at
    number = _number(value, f"{where}: at")
    if kind == "fraction":
        if not (0.0 <= number < 1.0):
            raise ValueError(
                f"{where}: at = {value!r} is outside the run; a fraction of training lies in [0, 1) "
                "(use {steps: N} or {tokens: N} for an absolute position)"
            )
        return kind, number
    if not math.isfinite(number) or number != int(number) or number < 0:
        raise ValueError(f"{where}: at = {{{kind}: {value!r}}}; {kind} must be a non-negative integer")
    return kind, int(number)


def schedule_from_list(entries: Any, source: str) -> Schedule:
    """Check a list of ``{at, weights}`` entries (from a file or from code) and build the :class:`Schedule`."""
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            f"tikmix_schedule={source!r}: got {type(entries).__name__} {str(entries)[:60]!r}; {_FORMAT_HELP}"
        )
    phases = []
    for k, entry in enumerate(entries):
        where = f"tikmix_schedule={source!r}: entry {k}"
        if not isinstance(entry, Mapping) or set(entry) != {"at", "weights"}:
            raise ValueError(f"{where} is {entry!r}; each entry has exactly the keys at and weights")
        kind, at = _position(entry["at"], where)
        phases.append(Phase(kind, at, check_weights(entry["weights"], f"{where}: weights")))
    schedule = Schedule(tuple(phases), source)
    if "tokens" in schedule.kinds and len(schedule.kinds) > 1:
        raise ValueError(
            f"tikmix_schedule={source!r} mixes token positions with {sorted(schedule.kinds - {'tokens'})}; "
            "their order is only known while training: give every position in tokens, or none"
        )
    # Steps and fractions are ordered against each other once max_steps is known (resolve_steps).
    if schedule.kinds <= {"tokens"} or schedule.kinds <= {"fraction"} or schedule.kinds <= {"steps"}:
        ats = [p.at for p in phases]
        for k in range(1, len(ats)):
            if ats[k] <= ats[k - 1]:
                raise ValueError(
                    f"tikmix_schedule={source!r}: entry {k} (at {phases[k].describe()}) is not after entry {k - 1} "
                    f"(at {phases[k - 1].describe()}); positions must increase"
                )
    return schedule


def schedule_from_history(doc: Mapping, source: str, *, total_steps: int | None = None) -> Schedule:
    """The schedule a run followed, from its ``history.json`` document.

    The starting weights come at position 0 and every stage's weights at the stage's step, as a
    fraction of the run's ``max_steps`` (recorded in the history; ``total_steps`` when it is not).
    Without either, positions are steps, which a longer run honours as steps.
    """
    stages = doc.get("stages")
    if not isinstance(stages, list):
        raise ValueError(f"tikmix_schedule={source!r}: the history has no stages list; it is damaged")
    total = doc.get("max_steps") or total_steps
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total <= 0):
        raise ValueError(f"tikmix_schedule={source!r}: max_steps={total!r} is not a positive integer")

    def at(step: int):
        return step / total if total else {"steps": step}

    entries = []
    initial = doc.get("initial_weights")
    if initial is not None and not isinstance(initial, Mapping):
        raise ValueError(f"tikmix_schedule={source!r}: initial_weights = {str(initial)[:60]!r} is not a mapping "
                         "domain -> weight; the history is damaged")
    if initial:
        entries.append({"at": 0.0 if total else {"steps": 0}, "weights": dict(initial)})
    for k, stage in enumerate(stages):
        step = stage.get("step") if isinstance(stage, Mapping) else None
        weights = stage.get("weights_after") if isinstance(stage, Mapping) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(weights, Mapping):
            raise ValueError(
                f"tikmix_schedule={source!r}: stage {k} has no step (a non-negative integer) and weights_after (a "
                f"mapping), got {str(stage)[:80]!r}; the history is damaged"
            )
        entries.append({"at": at(step), "weights": dict(weights)})
    if not entries:
        raise ValueError(f"tikmix_schedule={source!r}: the history records no weights (no stage, no initial weights)")
    return schedule_from_list(entries, source)


def load_schedule(path: str | os.PathLike, *, total_steps: int | None = None) -> Schedule:
    """Read a schedule file (YAML or JSON list) or a TiKMiX ``history.json``, checked.

    Raises ``ValueError`` naming the file, the entry and the fix for anything that is not a
    schedule: neither format, positions out of order or outside ``[0, 1)``, weights that are not
    finite non-negative numbers.
    """
    path = Path(path)
    doc = _read(path)
    if isinstance(doc, Mapping):
        if doc.get("format") == HISTORY_FORMAT:
            return schedule_from_history(doc, str(path), total_steps=total_steps)
        raise ValueError(
            f"tikmix_schedule={str(path)!r}: a mapping with keys {sorted(doc)[:6]}, neither a schedule nor a TiKMiX "
            f"history (format {HISTORY_FORMAT!r}); {_FORMAT_HELP}"
        )
    return schedule_from_list(doc, str(path))


def parse_domain_map(value: str | Mapping | None) -> dict[str, str]:
    """``tikmix_schedule_domains`` as a mapping schedule name -> run name (JSON text or a mapping)."""
    if value is None:
        return {}
    parsed: object = value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
    if not isinstance(parsed, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in parsed.items()
    ):
        raise ValueError(
            f"tikmix_schedule_domains={value!r}: give a JSON mapping of the schedule's domain names to this run's, "
            "e.g. '{\"web\": \"common_crawl\"}'"
        )
    return dict(parsed)


# ------------------------------------------------------------------------------------------------
# Writing: `tikmix schedule export`


def export_schedule(history: str | os.PathLike, output: str | os.PathLike | None = None, *,
                    total_steps: int | None = None, final: bool = False) -> Path:
    """Write the schedule a run followed (its ``history.json``, or the run's ``output_dir``) as a file to edit.

    ``output`` ends in ``.yaml``/``.yml`` (needs pyyaml) or ``.json``; default ``schedule.yaml`` beside
    the history. With ``final``, the file holds one entry: the run's last weights from the first sample
    on, the static mixture of what the run found (``docs/schedules.md`` says when that beats replaying the
    whole schedule). The file is written through a temporary file and a rename. Returns the path written.
    Raises ``ValueError`` for a file that is not a history.
    """
    src = Path(history)
    if src.is_dir():
        src = next((c for c in (src / "tikmix" / "history.json", src / "history.json") if c.is_file()), src)
    if not src.is_file():
        raise ValueError(f"HISTORY {history}: no such file; give <output_dir>/tikmix/history.json or that output_dir")
    doc = _read(src)
    if not isinstance(doc, Mapping) or doc.get("format") != HISTORY_FORMAT:
        raise ValueError(f"HISTORY {src}: not a TiKMiX history (expected format {HISTORY_FORMAT!r})")
    schedule = schedule_from_history(doc, str(src), total_steps=total_steps)
    out = Path(output) if output is not None else src.parent / "schedule.yaml"
    entries = schedule.to_list()
    what = "mixture schedule"
    if final:
        entries = [{"at": 0.0 if schedule.phases[0].kind == "fraction" else {"steps": 0},
                    "weights": entries[-1]["weights"]}]
        what = "last mixture, from the first sample on,"
    if out.suffix.lower() in (".yaml", ".yml"):
        text = yaml_module(f"-o {out}").safe_dump(entries, sort_keys=False, default_flow_style=None)
        note = f"# The {what} of {src}\n# at: fraction of training, or {{steps: N}} / {{tokens: N}}\n"
        text = note + text
    elif out.suffix.lower() == ".json":
        text = json.dumps(entries, indent=1) + "\n"
    else:
        raise ValueError(f"-o {out}: name the file *.yaml, *.yml or *.json")
    save_text_atomic(out, text)
    return out
