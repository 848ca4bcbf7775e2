"""The options of TiKMiX-D and TiKMiX-M (``docs/method.md``, ``docs/uncertainty.md``), each field with its check.

TiKMiX-D (``direct``) reads :class:`TiKMiXDOptions`; TiKMiX-M (``surrogate``) reads
:class:`TiKMiXMOptions`, which adds the surrogate's knobs to those of the TiKMiX-D answer it refines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from ..options import OptionGroup, choice, fail, flag, integer, number, option

__all__ = ["DEFAULT_SMOOTHING", "OBJECTIVES", "TiKMiXDOptions", "TiKMiXMOptions"]

#: ``--tikmix_objective`` choices of TiKMiX-D (and of TiKMiX-M's anchor).
OBJECTIVES = ("trust_region", "paper")
#: The decay of S's average over stages when none is given: evidence accumulates under the default objective;
#: the paper's uses each stage's own S.
DEFAULT_SMOOTHING = {"trust_region": 0.5, "paper": 0.0}

NATS = "must be a finite number of nats > 0, e.g. 0.1"


@dataclass
class TiKMiXDOptions(OptionGroup):
    """TiKMiX-D's objective (``tikmix_objective``: the trust region, or the paper's Eq. 10), its guards, and
    what it does with the uncertainty of ``S`` (shrinkage, smoothing over stages)."""

    # A Literal of the runtime tuple, for HfArgumentParser's choices; mypy takes literal values only.
    tikmix_objective: Annotated[Literal[OBJECTIVES], choice(OBJECTIVES)] = option(  # type: ignore[valid-type]
        "trust_region",
        "direct/surrogate: trust_region (the default; the largest predicted validation-loss drop within a KL "
        "trust region around the previous mixture, docs/method.md) or paper (Eq. 10 as published: normalised "
        "gain, std and entropy).",
    )
    tikmix_trust_radius: Annotated[float, number(above=0, fix=NATS)] = option(
        0.1, "trust_region: initial radius, the largest KL(w || w_prev) in nats one decision may move."
    )
    tikmix_trust_radius_min: Annotated[float, number(above=0, fix=NATS)] = option(
        0.01, "trust_region: the radius never shrinks below this (nats)."
    )
    tikmix_trust_radius_max: Annotated[float, number(above=0, fix=NATS)] = option(
        1.0, "trust_region: the radius never grows above this (nats)."
    )
    tikmix_max_epochs: Annotated[
        float | None, number(above=0, optional=True, fix="must be a number of epochs > 0, e.g. 4 (or unset for no cap)")
    ] = option(
        4.0,
        "trust_region: repetition cap; no domain is weighted to be read more than this many times over the "
        "remaining training, where domain sizes are known. Unset = no cap.",
    )
    tikmix_alpha: Annotated[float, number(at_least=0)] = option(
        1.0, "Weight of std(P_hat), the spread across tasks (Eq. 10)."
    )
    tikmix_beta: Annotated[float, number(at_least=0)] = option(
        1.0, "Weight of sum(P_hat), the total normalised gain (Eq. 10)."
    )
    tikmix_gamma: Annotated[float, number(at_least=0)] = option(
        1.0, "Weight of the entropy H(w), data diversity (Eq. 10)."
    )
    tikmix_pareto: Annotated[bool, flag()] = option(
        True, "Require S w >= S w_prev: no task worse than under the previous mixture."
    )
    tikmix_floor: Annotated[
        float, number(at_least=0, below=1, fix="must be a finite number >= 0 and below 1 (it is a per-domain "
                                                "minimum weight)")
    ] = option(0.0, "Lowest weight any domain may get (0 = no floor).")
    tikmix_max_change: Annotated[float | None, number(above=0, at_most=1, optional=True)] = option(
        None, "Largest change of one domain's weight per stage (none by default)."
    )
    # Uncertainty of the influence matrix (docs/uncertainty.md)
    tikmix_shrink_z: Annotated[
        float, number(at_least=0, fix="must be a finite number >= 0 (standard errors; 0 = no shrinkage)")
    ] = option(
        0.0,
        "direct/surrogate: shrink S toward zero by z standard errors, sign(S) max(|S| - z SE, 0), before "
        "solving, so that noise cannot move weight or bind the Pareto constraint; 0 = the paper's plain "
        "S (1.0 is a sensible choice). Needs >= 2 probe micro-batches per domain.",
    )
    tikmix_smoothing: Annotated[
        float | None,
        number(at_least=0, below=1, optional=True, fix="must lie in [0, 1) (0 = off; 1 would never forget a "
                                                        "stage), or be unset for the objective's default"),
    ] = option(
        None,
        "direct/surrogate: decay in [0, 1) of a precision-weighted (1/SE^2) average of S over stages, kept in "
        "the checkpoint; 0 = off (each stage uses its own S). Unset: 0.5 with tikmix_objective=trust_region, "
        "0 with paper.",
    )

    def check_rules(self) -> None:
        if not self.tikmix_trust_radius_min <= self.tikmix_trust_radius <= self.tikmix_trust_radius_max:
            fail("tikmix_trust_radius", self.tikmix_trust_radius,
                 f"must lie between tikmix_trust_radius_min={self.tikmix_trust_radius_min} and "
                 f"tikmix_trust_radius_max={self.tikmix_trust_radius_max}")

    def smoothing(self) -> float:
        """``tikmix_smoothing``, or the objective's default (:data:`DEFAULT_SMOOTHING`) when it is unset."""
        if self.tikmix_smoothing is None:
            return DEFAULT_SMOOTHING[self.tikmix_objective]
        return float(self.tikmix_smoothing)


@dataclass
class TiKMiXMOptions(TiKMiXDOptions):
    """TiKMiX-D's options, plus the surrogate's candidates and the look-ahead that scores them."""

    tikmix_surrogate_candidates: Annotated[
        int, integer(at_least=10, fix="must be an integer >= 10: the surrogate needs at least 10 candidates")
    ] = option(32, "TiKMiX-M: mixtures evaluated by the look-ahead to train the surrogate.")
    tikmix_lookahead_sequences: Annotated[
        int | None,
        integer(at_least=1, optional=True, fix="must be a positive integer (or unset for every validation sequence)"),
    ] = option(
        8,
        "TiKMiX-M: the look-ahead scores each candidate on at most this many of each task's validation "
        "sequences (one forward pass over them per candidate; unset = all tikmix_validation_sequences).",
    )
    tikmix_lookahead_lr: Annotated[
        float | None, number(above=0, optional=True, fix="must be a positive number (or unset)")
    ] = option(
        None,
        "TiKMiX-M: step size of the virtual look-ahead step (default: the best of a grid of learning-rate "
        "multiples along the TiKMiX-D direction).",
    )
