"""The arms of the demo: the ways of mixing that are trained and scored alike."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import DEFAULT_FRACTIONS

#: The default objective's default schedule.
EARLY = DEFAULT_FRACTIONS["trust_region"]


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
        # The default objective decides on its default, early schedule; the paper's arms at the preset's stages.
        Arm("tikmix_d", "TiKMiX-D", solver="direct", config={"tikmix_stage_fractions": list(EARLY)}),
        # the default with the guard for general ability: a validation task drawn from the natural mixture
        Arm("tikmix_d_general", "TiKMiX-D + general task", solver="direct",
            config={"tikmix_stage_fractions": list(EARLY), "tikmix_general_sequences": 16}),
        Arm("tikmix_m", "TiKMiX-M", solver="surrogate", config={"tikmix_stage_fractions": list(EARLY)}),
        Arm("tikmix_d_paper", "TiKMiX-D (paper objective)", solver="direct", config={"tikmix_objective": "paper"}),
        Arm("tikmix_m_paper", "TiKMiX-M (paper objective)", solver="surrogate",
            config={"tikmix_objective": "paper"}),
    )
}

#: What ``tikmix demo`` trains unless told otherwise: the baseline, the default TiKMiX-D beside the paper's and
#: beside itself with the guard for general ability, and TiKMiX-M.
DEFAULT_ARMS = ("static", "tikmix_d", "tikmix_d_general", "tikmix_d_paper", "tikmix_m")
