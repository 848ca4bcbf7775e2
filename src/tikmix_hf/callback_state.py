"""The callback's checkpoint state: JSON only, inside ``trainer_state.json``.

:class:`CallbackState` holds what a resumed run needs to continue exactly: the stage counter, the
stream position and weight schedule of the mixture, the mixer's own state, the history, and the
open training window's start. :meth:`CallbackState.from_json` refuses a state written by another
version or modified by hand, and :meth:`CallbackState.check_resumable` one that does not belong to
this run, each with the reason and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["STATE_FORMAT", "CallbackState"]

STATE_FORMAT = "tikmix_hf.callback/1"


@dataclass
class CallbackState:
    """What a checkpoint keeps of :class:`~tikmix_hf.TiKMiXCallback`."""

    stage: int
    step: int
    tokens_prev: int
    tasks: list[str]
    mixture: dict  # DomainMixture.state_dict(position=...)
    mixer_name: str
    mixer_state: dict = field(default_factory=dict)
    initial_weights: dict[str, float] | None = None
    history: list[dict] = field(default_factory=list)
    window: dict | None = None  # {"opened_at": step} when the checkpoint was taken inside a training window
    influence_source: str = "probes"
    alignment: dict | None = None  # how an aligned starting mixture came about

    def to_json(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "stage": self.stage,
            "step": self.step,
            "tokens_prev": self.tokens_prev,
            "tasks": list(self.tasks),
            "mixture": self.mixture,
            "initial_weights": self.initial_weights,
            "mixer": {"name": self.mixer_name, "state": self.mixer_state},
            "history": self.history,
            "window": self.window,
            "influence_source": self.influence_source,
            "alignment": self.alignment,
        }

    @classmethod
    def from_json(cls, saved: Any) -> CallbackState:
        if not isinstance(saved, Mapping) or saved.get("format") != STATE_FORMAT:
            raise ValueError(f"the checkpoint's TiKMiXCallback state is not in format {STATE_FORMAT!r}: it was written "
                             "by another version or has been modified")
        try:
            mixer = saved.get("mixer") or {}
            window = saved.get("window")
            state = cls(
                stage=_count(saved["stage"]),
                step=_count(saved["step"]),
                tokens_prev=_count(saved.get("tokens_prev", 0)),
                tasks=[str(t) for t in saved.get("tasks", [])],
                mixture=dict(saved["mixture"]),
                mixer_name=str(mixer["name"]),
                mixer_state=dict(mixer.get("state") or {}),
                initial_weights=saved.get("initial_weights"),
                history=list(saved.get("history", [])),
                window=None if not window else {"opened_at": _count(window["opened_at"])},
                influence_source=str(saved.get("influence_source", "probes")),
                alignment=saved.get("alignment"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"the checkpoint's TiKMiXCallback state is damaged ({type(err).__name__}: {err}); resume "
                             "from an earlier checkpoint") from None
        if not isinstance(state.mixture.get("position"), int):
            raise ValueError("the checkpoint's TiKMiXCallback state has no stream position; resume from an earlier "
                             "checkpoint")
        return state

    def check_resumable(self, *, tasks: list[str], mixer_name: str) -> None:
        """Refuse a state that another run wrote: other validation tasks, another mixer."""
        if self.tasks != list(tasks):
            raise ValueError(f"the checkpoint was trained with validation tasks {self.tasks} but this run has "
                             f"{list(tasks)}; resume with the same tasks")
        if self.mixer_name != mixer_name:
            raise ValueError(f"the checkpoint was trained with tikmix_solver={self.mixer_name!r} but this run uses "
                             f"{mixer_name!r}; resume with the same solver")

    def check_position(self, position: int, step: int, samples_per_step: int) -> None:
        """Refuse a stream position that this run's batch geometry does not reach at ``step``."""
        saved = int(self.mixture["position"])
        if saved != position:
            raise ValueError(f"the checkpoint's mixture position {saved} does not match step {step} x "
                             f"{samples_per_step} samples per step ({position}): resume with the same batch size, "
                             "gradient accumulation and number of processes")


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a count, got {value!r}")
    return value
