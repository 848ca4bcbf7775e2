"""TiKMiX-D's default decision as one object a custom training loop calls once per stage.

What the callback's TiKMiX-D does at each boundary with its defaults, without a Trainer:

1. the measured ``S`` is averaged over stages (:class:`~tikmix_hf.solvers.uncertainty.PrecisionSmoother`,
   ``smoothing``) and, optionally, shrunk toward zero by ``shrink_z`` standard errors;
2. the trust radius is set by the run's evidence (:class:`~tikmix_hf.solvers.trust_radius.TrustRadius`):
   what the last decision predicted against the loss drops since, and whether this stage's own ``S``
   agrees with the evidence the last decision acted on;
3. the next mixture is the largest predicted validation-loss drop within that KL radius of the
   previous mixture (:func:`~tikmix_hf.solvers.trust_region.solve_trust_region`).

Example::

    decider = TrustRegionDecider()
    weights = prior
    for stage in range(stages):
        ...  # train the stage on `weights`
        S = group_influence(model, domain_batches, validation_batches, preconditioner="adam", optimizer=opt)
        answer = decider.decide(S.scores, weights, stderr=S.stderr,
                                task_losses=[S.task_losses[t] for t in S.task_names], step=lr * stage_steps)
        weights = answer.weights

Pure numpy; :meth:`TrustRegionDecider.state_dict` is JSON and resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from .result import SolverResult
from .trust_radius import TrustRadius, gain_direction, matrix_rse
from .trust_region import solve_trust_region
from .uncertainty import PrecisionSmoother, shrink_influence

__all__ = ["TrustRegionDecider"]


class TrustRegionDecider:
    """TiKMiX-D's default, stage after stage (module docstring).

    Args:
        radius, radius_min, radius_max: the first decision's KL radius in nats and its bounds
            (``tikmix_trust_radius`` and its ``_min``/``_max``).
        smoothing: decay of the precision-weighted average of ``S`` over stages, in ``[0, 1)``; 0 uses
            each stage's own ``S`` (``tikmix_smoothing``).
        shrink_z: shrink ``S`` toward zero by this many standard errors; 0 = off (``tikmix_shrink_z``).
        alpha, pareto, floor, max_change: as for :func:`~tikmix_hf.solvers.trust_region.solve_trust_region`.
    """

    def __init__(self, *, radius: float = 0.1, radius_min: float = 0.01, radius_max: float = 1.0,
                 smoothing: float = 0.5, shrink_z: float = 0.0, alpha: float = 1.0, pareto: bool = True,
                 floor: ArrayLike | None = None, max_change: ArrayLike | None = None) -> None:
        if not 0 <= float(smoothing) < 1:
            raise ValueError(f"smoothing must lie in [0, 1); got smoothing={smoothing!r}")
        if not float(shrink_z) >= 0:
            raise ValueError(f"shrink_z must be >= 0; got shrink_z={shrink_z!r}")
        self.radius = TrustRadius(radius, radius_min, radius_max)
        self.smoother = PrecisionSmoother(float(smoothing)) if smoothing > 0 else None
        self.shrink_z = float(shrink_z)
        self.alpha, self.pareto, self.floor, self.max_change = alpha, bool(pareto), floor, max_change
        self.last: dict = {}  # what the last decision saw: the matrix it solved with, the controller's account

    def smooth(self, S: ArrayLike, stderr: ArrayLike | None = None, *, tasks: Sequence[str] | None = None,
               domains: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``S`` and its standard errors averaged over the stages so far (as they are with ``smoothing=0``)."""
        S = np.asarray(S, dtype=np.float64)
        if self.smoother is None:
            return S, None if stderr is None else np.asarray(stderr, dtype=np.float64)
        tasks = list(tasks) if tasks is not None else [str(i) for i in range(S.shape[0])]
        domains = list(domains) if domains is not None else [str(j) for j in range(S.shape[1])]
        return self.smoother.update(S, stderr, tasks, domains)

    def shrink(self, scores: ArrayLike, stderr: ArrayLike | None) -> np.ndarray:
        """``scores`` shrunk toward zero by ``shrink_z`` standard errors (as they are without standard errors)."""
        if self.shrink_z > 0 and stderr is not None:
            return shrink_influence(scores, stderr, self.shrink_z)
        return np.asarray(scores, dtype=np.float64)

    def scores(self, S: ArrayLike, stderr: ArrayLike | None = None, *, tasks: Sequence[str] | None = None,
               domains: Sequence[str] | None = None) -> np.ndarray:
        """Step 1 of the module docstring: ``S`` as the solver should see it."""
        smoothed, se = self.smooth(S, stderr, tasks=tasks, domains=domains)
        return self.shrink(smoothed, se)

    def solve(self, S: ArrayLike, scores: ArrayLike, prior: ArrayLike, *, stderr: ArrayLike | None = None,
              task_losses: Iterable[float], step: float = 1.0, upper: ArrayLike | None = None,
              domains: Sequence[str] | None = None, tasks: Sequence[str] | None = None) -> SolverResult:
        """Steps 2 and 3: the radius from the evidence, then the answer for ``scores`` (from :meth:`scores`)."""
        prior = np.asarray(prior, dtype=np.float64)
        losses = [float(x) for x in task_losses]
        radius, controller = self.radius.update(losses, gain_direction(S, prior), matrix_rse(S, stderr),
                                                accumulated=gain_direction(scores, prior))
        solved = solve_trust_region(scores, prior, radius=radius, step=step, alpha=self.alpha, pareto=self.pareto,
                                    floor=self.floor, upper=upper, max_change=self.max_change,
                                    domains=None if domains is None else list(domains),
                                    tasks=None if tasks is None else list(tasks))
        self.radius.record(solved.details["predicted_gain"], losses)
        self.last = {"controller": controller, "scores": scores}
        return solved

    def decide(self, S: ArrayLike, prior: ArrayLike, *, stderr: ArrayLike | None = None,
               task_losses: Iterable[float], step: float = 1.0, upper: ArrayLike | None = None,
               domains: Sequence[str] | None = None, tasks: Sequence[str] | None = None) -> SolverResult:
        """The next mixture for this stage's ``S`` (``n_tasks x n_domains``) and the mixture in effect.

        ``task_losses``: each task's validation loss now (the controller compares the drop since the last
        decision with what it predicted); ``step``: the coming stage's step length (learning rate x steps),
        which scales the reported predicted gains; ``upper``: per-domain upper bounds (a repetition cap).
        """
        scores = self.scores(S, stderr, tasks=tasks, domains=domains)
        return self.solve(S, scores, prior, stderr=stderr, task_losses=task_losses, step=step, upper=upper,
                          domains=domains, tasks=tasks)

    def state_dict(self) -> dict:
        state = {}
        if self.radius.predicted is not None:  # the radius has taken part in a decision
            state["trust_radius"] = self.radius.state_dict()
        if self.smoother is not None and self.smoother.stages > 0:
            state["smoother"] = self.smoother.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state or {})
        radius, smoother = state.pop("trust_radius", None), state.pop("smoother", None)
        if state:
            raise ValueError(f"TrustRegionDecider: unknown state {sorted(state)}")
        if radius:
            self.radius = TrustRadius(radius["radius"], radius["minimum"], radius["maximum"])
            self.radius.load_state_dict(radius)
        if smoother and smoother.get("stages"):
            self.smoother = PrecisionSmoother(smoother["decay"])
            self.smoother.load_state_dict(smoother)
