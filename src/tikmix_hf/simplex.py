"""What "a mixture" means, written once: non-negative weights that sum to one.

Pure numpy, so that the solvers (which import no torch), the influence engine and the mixture
all check mixtures against the same rule and the same tolerance.
"""

from __future__ import annotations

import numpy as np

#: Slack allowed on the simplex (sum and sign) when checking a mixture someone else computed.
SIMPLEX_TOL = 1e-6


def off_simplex(W, tol: float = SIMPLEX_TOL) -> np.ndarray:
    """Per row of ``W`` (``(N, m)`` or ``(m,)``): ``True`` where the row is not a mixture.

    A row is a mixture when every entry is finite, none is below ``-tol`` and the sum is within
    ``tol`` of one.
    """
    W = np.atleast_2d(np.asarray(W, dtype=np.float64))
    finite = np.isfinite(W).all(axis=1)
    with np.errstate(invalid="ignore"):
        off = (W.min(axis=1) < -tol) | (np.abs(W.sum(axis=1) - 1) > tol)
    return ~finite | off


def check_vector(value, name: str, *, size: int | None = None, nonnegative: bool = False) -> np.ndarray:
    """``value`` as a finite non-empty float64 vector, one entry per domain; the error names ``name``."""
    try:
        vec = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a vector of numbers") from None
    if vec.ndim != 1 or vec.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector (one entry per domain), got shape {vec.shape}")
    if size is not None and vec.size != size:
        raise ValueError(f"{name} has {vec.size} entries but there are {size} domains")
    if not np.all(np.isfinite(vec)):
        raise ValueError(f"{name}={vec.tolist()} has a non-finite entry")
    if nonnegative and np.any(vec < 0):
        raise ValueError(f"{name}={vec.tolist()} has a negative entry")
    return vec


def normalise(weights, name: str = "weights") -> np.ndarray:
    """Finite non-negative weights with a positive sum, divided by their sum."""
    w = check_vector(weights, name, nonnegative=True)
    total = w.sum()
    if total <= 0:
        raise ValueError(f"{name}={w.tolist()} are all zero; at least one domain needs a positive weight")
    return w / total
