"""When the mixture is re-decided: stage boundaries and the training windows before them.

Pure arithmetic on the run's length and the options, so the callback's plan can be tested in
milliseconds and is the same on every rank and on resume:

- :func:`plan_stages`: the boundaries of a run of ``max_steps`` optimizer steps, from a mixer's own
  :class:`~tikmix_hf.mixers.StagePlan` (a replayed schedule), or ``tikmix_stage_steps``,
  ``tikmix_stage_tokens`` or ``tikmix_stage_fractions`` (default :data:`~tikmix_hf.config.DEFAULT_FRACTIONS`),
  plus ``tikmix_warmup_steps``; with the warnings a user should see when a setting leaves no boundary;
- :func:`plan_windows`: the step at which each boundary's training window opens;
- :meth:`Stages.crossed` and :meth:`Stages.next_boundary`: token-based boundaries as training counts tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import DEFAULT_FRACTIONS, TiKMiXConfig
from .mixers import StagePlan

__all__ = ["Stages", "plan_stages", "plan_windows"]


@dataclass(frozen=True)
class Stages:
    """A run's stage boundaries: fixed steps, and token marks or a token period decided as tokens are seen."""

    steps: frozenset[int] = frozenset()
    token_period: int | None = None  # re-decide each time the training tokens cross a multiple of this
    token_marks: tuple[int, ...] = ()  # re-decide once the training tokens reach each of these (a replay)
    initial: dict[str, float] | None = None  # a mixer's own starting weights (a replay), else None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def counts_tokens(self) -> bool:
        return bool(self.token_period or self.token_marks)

    def crossed(self, tokens_before: int, tokens_now: int) -> bool:
        """Whether a token boundary lies in ``(tokens_before, tokens_now]``."""
        if self.token_period:
            return tokens_now // self.token_period > tokens_before // self.token_period
        return any(tokens_before < mark <= tokens_now for mark in self.token_marks)

    def next_boundary(self, step: int, max_steps: int, tokens_seen: int) -> int:
        """The step of the next decision after ``step``, or ``max_steps``.

        With a token period the next boundary is estimated one period on at the tokens per step so far.
        """
        later = [b for b in self.steps if b > step]
        if self.token_period and step > 0:
            per_step = max(tokens_seen / step, 1.0)
            later.append(step + max(1, round(self.token_period / per_step)))
        return min([*later, max_steps])


def plan_stages(config: TiKMiXConfig, max_steps: int, mixer_plan: StagePlan | None = None) -> Stages:
    """The boundaries of a run of ``max_steps`` steps (module docstring); a mixer's own plan wins."""
    if mixer_plan is not None:
        return Stages(steps=frozenset(mixer_plan.steps), token_marks=tuple(mixer_plan.tokens),
                      initial=mixer_plan.initial)
    warnings: list[str] = []
    steps: set[int] = set()
    period = None
    if config.tikmix_stage_tokens:
        period = int(config.tikmix_stage_tokens)
    elif config.tikmix_stage_steps:
        every = int(config.tikmix_stage_steps)
        steps = set(range(every, max(max_steps, 1), every))
        if every >= max_steps:
            warnings.append(f"tikmix_stage_steps={every} is not shorter than training (max_steps={max_steps}): no "
                            "stage boundary falls inside this run, the mixture will not change")
    else:
        fractions = config.tikmix_stage_fractions or list(DEFAULT_FRACTIONS[config.tikmix_objective])
        steps = {s for s in (round(f * max_steps) for f in fractions) if 0 < s < max_steps}
        if not steps:
            warnings.append(f"no stage boundary at fractions {fractions} of max_steps={max_steps} falls inside "
                            "training")
    if config.tikmix_warmup_steps:
        if config.tikmix_warmup_steps >= max_steps:
            warnings.append(f"tikmix_warmup_steps={config.tikmix_warmup_steps} is not shorter than "
                            f"max_steps={max_steps}")
        else:
            steps.add(int(config.tikmix_warmup_steps))
    return Stages(steps=frozenset(steps), token_period=period, warnings=tuple(warnings))


def plan_windows(boundaries, window_steps: int) -> dict[int, int]:
    """``{step at whose start a training window opens: the boundary it measures for}``.

    A window spans up to ``window_steps`` steps and at most the second half of its stage: the first
    steps after a decision still draw the old weights (the pipeline's lag) and move fastest, and the
    first steps of training start from a random model.
    """
    opens, previous = {}, 0
    for boundary in sorted(boundaries):
        opens[boundary - max(1, min(int(window_steps), (boundary - previous) // 2))] = boundary
        previous = boundary
    return opens
