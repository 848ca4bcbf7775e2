"""The training tokens a run has seen: the Trainer's own count, or the tokens the mixture has handed out.

Token stages (``tikmix_stage_tokens``) need the count at every step; every stage records it. The
Trainer counts input tokens when ``include_num_input_tokens_seen`` is on; otherwise map-style domains
whose examples carry ``input_ids`` give it from the mixture's draws. A run with neither cannot count:
token stages refuse it, and a stage records no count and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .loader import LoaderGeometry

__all__ = ["TokenCount"]


@dataclass(frozen=True)
class TokenCount:
    """How this run counts its training tokens (``from_trainer``: ``state.num_input_tokens_seen``)."""

    mixture: Any = None  # the DomainMixture
    geometry: LoaderGeometry = LoaderGeometry()
    from_trainer: bool = False

    def seen(self, state: Any) -> int:
        """Tokens trained on after ``state.global_step`` steps, all ranks; ``ValueError`` with the fix where
        this run cannot count them."""
        if self.from_trainer:
            return int(state.num_input_tokens_seen)
        drawn = self.mixture.drawn(self.geometry.consumed(state.global_step))
        tokens = [v["tokens"] for v in drawn.values()]
        if None in tokens:
            unknown = [d for d, v in drawn.items() if v["tokens"] is None]
            raise ValueError(
                f"the training tokens cannot be counted (tikmix_stage_tokens needs them): domains {unknown} are "
                "streamed or their examples carry no input_ids; set TrainingArguments.include_num_input_tokens_seen="
                "True, or use map-style domains whose examples carry input_ids"
            )
        return int(sum(tokens))

    def recorded(self, state: Any) -> tuple[int | None, str | None]:
        """``(tokens, None)``, or ``(None, why)`` where this run cannot count them: a stage records either."""
        try:
            return self.seen(state), None
        except ValueError as err:
            return None, f"tokens_seen not recorded: {err}"
