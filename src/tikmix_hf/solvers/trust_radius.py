"""How far TiKMiX-D may move at a decision: a trust radius set by the run's own evidence.

At every decision the controller compares what the previous decision predicted with what happened
since, and looks at how consistent the new evidence is with the old:

- **realised ratio** ``r = sum_i realised_i / sum_i predicted_i``: the validation-loss drop each
  task actually had since the last decision (measured by the influence pass, which computes those
  losses anyway) over the first-order drop ``h S w`` the last decision predicted for it;
- **consistency** ``c``: the cosine between this stage's own direction of gain over domains
  (``sum_i S_i`` of its measurement, centred under the mixture) and the direction of the evidence the
  last decision acted on (``S`` smoothed over the stages up to it), so a direction that flips from
  stage to stage counts as noise. A smoothed ``S`` is never compared with the next smoothed one: the
  two share their past and would agree even on pure noise.

Then the radius ``rho`` (KL, nats) is updated multiplicatively and kept within its bounds::

    grow   (rho * GROW)    when r > 0 and c >= CONSISTENT      (predictions realised, evidence agrees)
    shrink (rho * SHRINK)  when r <= 0 or  c < 0              (the loss did not follow, or the signal flipped)
    keep                   otherwise (and at the first decision, where there is nothing to compare)

and the radius used is ``rho / (1 + rse^2)``, ``rse`` the relative standard error of ``S`` (its
Frobenius norm over that of the standard errors), so a noisy measurement moves the mixture less.
Pure numpy; the state is JSON and resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from numpy.typing import ArrayLike

GROW = 2.0
SHRINK = 0.5
CONSISTENT = 0.5


class TrustRadius:
    """The radius controller of the module docstring; ``state_dict`` / ``load_state_dict`` are JSON."""

    def __init__(self, radius: float, minimum: float, maximum: float) -> None:
        if not (0 < minimum <= radius <= maximum) or not all(map(math.isfinite, (radius, minimum, maximum))):
            raise ValueError(
                f"trust radius bounds must satisfy 0 < minimum <= radius <= maximum (finite); got minimum={minimum!r}, "
                f"radius={radius!r}, maximum={maximum!r}"
            )
        self.radius, self.minimum, self.maximum = float(radius), float(minimum), float(maximum)
        self.predicted: list[float] | None = None  # per task, what the last decision predicted
        self.losses: list[float] | None = None  # per task, the validation losses at the last decision
        self.direction: list[float] | None = None  # per domain, the last stage's direction of gain

    def update(self, losses: ArrayLike, direction: ArrayLike, rse: float | None = None,
               accumulated: ArrayLike | None = None) -> tuple[float, dict]:
        """The radius for this decision, from the losses now and this stage's direction; and why.

        ``losses``: validation loss per task now; ``direction``: the direction of gain per domain of
        this stage's own measurement; ``rse``: the relative standard error of ``S`` (``None`` when
        unknown); ``accumulated``: the direction of the evidence accumulated up to this stage (``S``
        smoothed over stages), which the next stage's own direction is compared with. Without it,
        ``direction`` is kept. Comparing a measurement only with evidence that does not contain it
        keeps the test honest: two smoothed averages share their past, so they agree even when every
        stage measures noise.
        """
        losses = np.asarray(losses, dtype=np.float64)
        direction = np.asarray(direction, dtype=np.float64)
        info: dict = {"radius_before": self.radius}
        if self.predicted is not None and self.losses is not None and len(self.losses) == losses.size:
            realised = np.asarray(self.losses) - losses
            predicted = np.asarray(self.predicted)
            total = float(predicted.sum())
            ratio = float(realised.sum()) / total if total != 0 else float("nan")
            consistency = _cosine(np.asarray(self.direction), direction) if self.direction is not None else float("nan")
            if math.isfinite(ratio) and ratio > 0 and math.isfinite(consistency) and consistency >= CONSISTENT:
                self.radius, info["action"] = min(self.radius * GROW, self.maximum), "grow"
            elif (math.isfinite(ratio) and ratio <= 0) or (math.isfinite(consistency) and consistency < 0):
                self.radius, info["action"] = max(self.radius * SHRINK, self.minimum), "shrink"
            else:
                info["action"] = "keep"
            info.update(realised_gain=realised.tolist(), predicted_gain=predicted.tolist(),
                        realised_ratio=ratio if math.isfinite(ratio) else None,
                        consistency=consistency if math.isfinite(consistency) else None)
        else:
            info["action"] = "first"
        factor = 1.0 if rse is None or not math.isfinite(rse) else 1.0 / (1.0 + rse * rse)
        info.update(radius=self.radius, uncertainty_factor=factor, radius_used=self.radius * factor,
                    rse=None if rse is None or not math.isfinite(rse) else float(rse))
        self.direction = (direction if accumulated is None else np.asarray(accumulated, dtype=np.float64)).tolist()
        return self.radius * factor, info

    def record(self, predicted: Iterable[float], losses: Iterable[float]) -> None:
        """What this decision predicts per task over the coming stage, and the losses it starts from."""
        self.predicted = [float(x) for x in predicted]
        self.losses = [float(x) for x in losses]

    def state_dict(self) -> dict:
        return {"radius": self.radius, "minimum": self.minimum, "maximum": self.maximum,
                "predicted": self.predicted, "losses": self.losses, "direction": self.direction}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - {"radius", "minimum", "maximum", "predicted", "losses", "direction"})
        if unknown:
            raise ValueError(f"TrustRadius state has unknown keys {unknown}")
        self.radius = float(state["radius"])
        self.minimum, self.maximum = float(state["minimum"]), float(state["maximum"])
        for key in ("predicted", "losses", "direction"):
            value = state.get(key)
            setattr(self, key, None if value is None else [float(x) for x in value])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("nan")
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / den if den > 0 else float("nan")


def gain_direction(S: ArrayLike, w: ArrayLike) -> np.ndarray:
    """``sum_i S_i`` centred under ``w``: where the mixture would move, whatever the scale of ``S``."""
    g = np.asarray(S, dtype=np.float64).sum(axis=0)
    g = g - float(np.asarray(w) @ g)
    norm = float(np.linalg.norm(g))
    return g / norm if norm > 0 else g


def matrix_rse(scores: ArrayLike, stderr: ArrayLike | None) -> float | None:
    """``||SE||_F / ||S||_F`` over the finite entries; ``None`` without standard errors."""
    if stderr is None:
        return None
    se = np.asarray(stderr, dtype=np.float64)
    S = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(se)
    if not finite.any():
        return None
    den = float(np.linalg.norm(S[finite]))
    return float(np.linalg.norm(se[finite])) / den if den > 0 else None
