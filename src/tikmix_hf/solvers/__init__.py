"""TiKMiX solvers: turn an influence matrix into the next mixture. Pure numpy/scipy/lightgbm.

- :func:`solve_trust_region` (TiKMiX-D, the default ``--tikmix_objective trust_region``): the largest
  predicted validation-loss drop within a KL trust region around the previous mixture
  (``trust_region.py``), with the radius set by the run's evidence (:class:`TrustRadius`,
  ``trust_radius.py``).
- :func:`solve_direct` (TiKMiX-D with the paper's Eq. 10 objective, ``--tikmix_objective paper``):
  SLSQP on the normalised-influence objective with the Pareto constraint, restarts and a fallback
  that keeps the prior (``direct.py``).
- :func:`solve_surrogate` (TiKMiX-M, paper Section 3.3 and Algorithm 1): a LightGBM surrogate of a
  caller-measured target around the TiKMiX-D answer, searched with Dirichlet sampling (``surrogate.py``).
- :class:`PrecisionSmoother` and :func:`shrink_influence` (``uncertainty.py``): ``S`` averaged over
  stages and shrunk by its standard errors before solving.
- :class:`TrustRegionDecider` (``decider.py``): all of TiKMiX-D's default decision, stage after stage,
  for a custom training loop; the callback's TiKMiX-D wraps it.
- :func:`normalised_performance` (Eq. 9) and :func:`objective_terms` (Eq. 10) for reporting
  (``objective.py``); :class:`SolverResult` (``result.py``), what every solver returns.
- The baselines' update rules (``baselines.py``).

Beside those: ``problem.py`` (the checked problem and its bounds, shared by the TiKMiX solvers),
``checks.py`` (their argument checks) and ``threads.py`` (one BLAS thread for small matrices).
Nothing here imports torch; lightgbm is imported on the first call of :func:`solve_surrogate`.
"""

from .baselines import (
    doge_update,
    doremi_update,
    odm_exploration_rate,
    odm_policy,
    odm_update_rewards,
    running_average,
    temperature_weights,
)
from .decider import TrustRegionDecider
from .direct import solve_direct
from .objective import normalised_performance, objective_terms
from .result import SolverResult
from .surrogate import solve_surrogate
from .trust_radius import TrustRadius
from .trust_region import solve_trust_region
from .uncertainty import PrecisionSmoother, shrink_influence

__all__ = [
    "PrecisionSmoother", "SolverResult", "TrustRadius", "TrustRegionDecider", "normalised_performance",
    "objective_terms", "shrink_influence",
    "solve_direct", "solve_surrogate", "solve_trust_region",
    # baselines (solvers/baselines.py)
    "doge_update", "doremi_update", "odm_exploration_rate",
    "odm_policy", "odm_update_rewards", "running_average", "temperature_weights",
]
