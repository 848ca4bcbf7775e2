"""The arms of the demo: the ways of mixing that are trained and scored alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Arm:
    """One way of mixing, trained and scored like every other arm.

    ``initial`` is the mixture at step 0: ``"natural"``, ``"uniform"`` or explicit weights per
    domain. ``solver`` is ``None`` for a static mixture, else a ``tikmix_solver`` value that
    :class:`~tikmix_hf.TiKMiXCallback` runs at the stage boundaries, with ``config`` holding any
    further ``TiKMiXConfig`` fields (e.g. ``{"tikmix_shrink_z": 1.0}``).
    """

    name: str
    label: str
    initial: str | Mapping[str, float] = "natural"
    solver: str | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("static", "static (natural)"),
        Arm("natural", "static (natural)"),
        Arm("uniform", "static (uniform)", initial="uniform"),
        Arm("tikmix_d", "TiKMiX-D", solver="direct"),
        Arm("tikmix_m", "TiKMiX-M", solver="surrogate"),
    )
}
