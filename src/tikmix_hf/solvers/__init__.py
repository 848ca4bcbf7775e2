"""TiKMiX solvers: turn an influence matrix into the next mixture. Pure numpy/scipy/lightgbm.

- :func:`solve_direct` (TiKMiX-D, paper Eqs. 9-11): SLSQP on the normalised-influence objective
  with the Pareto constraint, restarts and a fallback that keeps the prior.
- :func:`solve_surrogate` (TiKMiX-M, paper Section 3.3 and Algorithm 1): a LightGBM surrogate of a
  caller-measured target around the TiKMiX-D answer, searched with Dirichlet sampling.
- :func:`normalised_performance` (Eq. 9) and :func:`objective_terms` (Eq. 10) for reporting.

Nothing here imports torch; lightgbm is imported on the first call of :func:`solve_surrogate`.
"""

from ._common import SolverResult, normalised_performance, objective_terms
from .baselines import (
    doge_update,
    doremi_update,
    odm_exploration_rate,
    odm_policy,
    odm_update_rewards,
    running_average,
    temperature_weights,
)
from .direct import solve_direct
from .surrogate import solve_surrogate

__all__ = [
    "SolverResult", "normalised_performance", "objective_terms", "solve_direct", "solve_surrogate",
    # baselines (solvers/baselines.py)
    "doge_update", "doremi_update", "odm_exploration_rate",
    "odm_policy", "odm_update_rewards", "running_average", "temperature_weights",
]
