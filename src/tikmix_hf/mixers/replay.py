"""Replay: follow a mixture schedule found elsewhere (``--tikmix_solver replay --tikmix_schedule PATH``).

The schedule (:mod:`tikmix_hf.schedule`) is a ``history.json`` of an earlier run or a file a person
wrote. Its positions become this run's stage boundaries (:meth:`ReplayMixer.plan`): fractions of
training by default, so a longer run gets the same phases at the same share of its steps; steps
and tokens exactly as written. At each boundary the mixer returns the phase's weights and nothing
else happens: no probes, no influence pass, no solver. The callback schedules them at its usual
declared index, so replaying a run's own history in an identical run draws the same samples.

Example (a custom loop, without the callback)::

    mixer = ReplayMixer()
    config = TiKMiXConfig(tikmix_solver="replay", tikmix_schedule="proxy/tikmix/history.json")
    mixer.check_ready(config)
    plan = mixer.plan(config, max_steps=20000, domains=["code", "web"])
    plan.steps      # the steps at which the weights change; plan.initial: the weights from step 0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np

from ..options import OptionGroup, custom, option, path
from ..schedule import Schedule, load_schedule, parse_domain_map
from .base import Decision, Mixer, StageInputs, StagePlan, register

__all__ = ["ReplayMixer", "ReplayOptions"]


def _check_domain_map(name: str, value) -> None:
    parse_domain_map(value)  # its error names tikmix_schedule_domains


@dataclass
class ReplayOptions(OptionGroup):
    """The schedule to replay and how its domain names map to this run's. Whether the file is a good schedule
    is checked when training starts (:meth:`ReplayMixer.check_ready`), so that a saved config rebuilds anywhere."""

    tikmix_schedule: Annotated[
        str | None,
        path(optional=True, fix="must be the path of a history.json or a schedule file (docs/schedules.md), or unset"),
    ] = option(
        None,
        "replay: a history.json of an earlier run, or a YAML/JSON list of {at: <fraction | {steps: N} | "
        "{tokens: N}>, weights: {domain: w}}; its positions are this run's stage boundaries.",
    )
    tikmix_schedule_domains: Annotated[str | None, custom(_check_domain_map, optional=True)] = option(
        None, "replay: JSON mapping of the schedule's domain names to this run's, e.g. '{\"web\": \"cc\"}'."
    )


@register("replay", options=ReplayOptions)
class ReplayMixer(Mixer):
    """The weights of a schedule file, at the schedule's positions (see the module docstring)."""

    measures = False

    def __init__(self, options: ReplayOptions | None = None) -> None:
        super().__init__(options)
        self.schedule: Schedule | None = None
        self.domains: list[str] = []
        self._starts: list[int] = []  # per phase: its step, or its token count for token schedules
        self._saved: list | None = None  # the schedule a checkpoint replayed, until plan() can compare

    def check_ready(self, config: Any) -> None:
        options = self.configure(config)
        if not options.tikmix_schedule:
            raise ValueError(
                "tikmix_solver='replay' needs tikmix_schedule: the path of a history.json or a schedule file"
            )
        schedule = load_schedule(options.tikmix_schedule)
        self.schedule = schedule.renamed(parse_domain_map(options.tikmix_schedule_domains))

    def plan(self, config: Any, max_steps: int, domains: list[str]) -> StagePlan:
        if self.schedule is None:
            self.check_ready(config)
        schedule = self.schedule
        assert schedule is not None  # check_ready loaded it
        schedule.check_domains(domains)
        self.domains = list(domains)
        if schedule.kinds == {"tokens"}:
            self._starts = [int(p.at) for p in schedule.phases]
        else:
            self._starts = schedule.resolve_steps(max_steps)
        phases = list(schedule.phases)
        initial = None
        if self._starts[0] == 0:
            if config.tikmix_initial_weights not in (None, "keep"):
                raise ValueError(
                    f"tikmix_initial_weights={config.tikmix_initial_weights!r}: the schedule {schedule.source} sets "
                    "the weights from the start (its entry at 0); leave tikmix_initial_weights unset (or keep), or "
                    "drop that entry"
                )
            initial = {d: phases[0].weights[d] for d in domains}
        self._compare_saved()
        later = self._starts[1:] if initial is not None else self._starts
        if schedule.kinds == {"tokens"}:
            return StagePlan(tokens=later, initial=initial)
        return StagePlan(steps=later, initial=initial)

    def decide(self, inputs: StageInputs) -> Decision:
        if self.schedule is None or not self._starts:
            raise RuntimeError("ReplayMixer.decide before plan(): the callback plans the run in on_train_begin")
        by_tokens = self.schedule.kinds == {"tokens"}
        reached = inputs.tokens_seen if by_tokens else inputs.step
        if reached is None:
            raise RuntimeError("a token schedule needs StageInputs.tokens_seen")
        # The last phase whose position has been reached: a step that crosses two token positions
        # moves straight to the later one.
        k = max(i for i, s in enumerate(self._starts) if s <= reached) if reached >= self._starts[0] else None
        if k is None:
            raise RuntimeError(f"stage at step {inputs.step}: no phase of {self.schedule.source} has started yet")
        phase = self.schedule.phases[k]
        weights = np.array([phase.weights[d] for d in inputs.domains], dtype=np.float64)
        message = f"replayed entry {k} of {self.schedule.source} (at {phase.describe()})"
        # Unnormalised: the mixture normalises, so a history's weights are scheduled as they were.
        return Decision(weights, "replayed", message, extra={
            "source": self.schedule.source, "entry": k, "at": phase.position(), "planned": self._starts[k],
        })

    # A checkpoint keeps the schedule it replayed, so that a resume cannot silently switch files.
    def state_dict(self) -> dict:
        return {"schedule": self.schedule.to_list() if self.schedule is not None else None}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - {"schedule"})
        if unknown:
            raise ValueError(f"ReplayMixer state has unknown keys {unknown}; expected ['schedule']")
        self._saved = state.get("schedule")
        self._compare_saved()

    def _compare_saved(self) -> None:
        if self._saved is not None and self.schedule is not None and self._saved != self.schedule.to_list():
            raise ValueError(
                f"the checkpoint replayed another schedule than tikmix_schedule={self.schedule.source!r} now holds; "
                "resume with the file (and tikmix_schedule_domains) the run started with"
            )
