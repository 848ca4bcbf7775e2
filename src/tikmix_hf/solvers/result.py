"""What a TiKMiX solver returns: :class:`SolverResult`, the weights with an account of how they came about."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._io import jsonable

STATUSES = ("converged", "restarted", "fallback")


@dataclass
class SolverResult:
    """The answer of :func:`solve_direct`, :func:`solve_trust_region` or :func:`solve_surrogate`.

    ``status`` is one of:

    - ``"converged"``: the first attempt succeeded (TiKMiX-D: SLSQP from the uniform start;
      TiKMiX-M: the surrogate's pick was used).
    - ``"restarted"``: TiKMiX-D only; the uniform start failed and the restart from the prior
      succeeded.
    - ``"fallback"``: the optimiser's answer was not used. TiKMiX-D keeps the prior (or, when
      the prior breaks ``floor``/``upper``, its projection onto those guards). TiKMiX-M returns
      what ``details["fallback_to"]`` names: ``"prior"``, ``"direct"`` or ``"best_candidate"``.

    ``message`` says in words what happened and why. ``terms`` holds the objective terms of
    Eq. 10 at the answer and at the prior (see :func:`~tikmix_hf.solvers.objective_terms`).
    """

    weights: np.ndarray
    status: str
    message: str
    terms: dict
    domains: list[str] | None = None
    tasks: list[str] | None = None
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready copy: lists, floats, ints, strings, ``None`` (NaN and inf become ``None``)."""
        return {
            "weights": jsonable(self.weights),
            "status": self.status,
            "message": self.message,
            "terms": jsonable(self.terms),
            "domains": None if self.domains is None else list(self.domains),
            "tasks": None if self.tasks is None else list(self.tasks),
            "details": jsonable(self.details),
        }

    def as_mapping(self) -> dict[str, float]:
        """``{domain: weight}``; needs the result to carry domain names."""
        if self.domains is None:
            raise ValueError(
                "as_mapping() needs domain names, but this result has domains=None; "
                "pass domains=[...] to the solver, or use .weights"
            )
        return {name: float(w) for name, w in zip(self.domains, self.weights)}
