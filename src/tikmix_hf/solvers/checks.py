"""Checks of the solvers' own arguments: the influence matrix, the names of its rows and columns, the
objective's coefficients and the per-domain guards. The checks every layer shares (numbers, mixtures,
the simplex) are in :mod:`tikmix_hf.validation`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..validation import as_float64, format_value


def check_influence(S) -> np.ndarray:
    """``S`` as a finite float64 n_tasks x n_domains array with at least one task and two domains."""
    S = as_float64(S, "S must be a numeric n_tasks x n_domains array")
    if S.ndim != 2:
        hint = " (for a single task use S.reshape(1, -1))" if S.ndim == 1 else ""
        raise ValueError(f"S must be 2-D, n_tasks x n_domains; got shape {S.shape}{hint}")
    n, m = S.shape
    if n < 1:
        raise ValueError(f"S must have at least one task (row); got shape {S.shape}")
    if m < 2:
        raise ValueError(
            f"S must have at least 2 domains (columns) to mix; got shape {S.shape}. "
            "With one domain there is nothing to solve: its weight is 1"
        )
    bad = ~np.isfinite(S)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(
            f"S must be finite; S[{i}, {j}] = {S[i, j]} ({int(bad.sum())} non-finite entries). "
            "Recompute the influence matrix or drop the offending task/domain"
        )
    return S


def check_names(names, count: int, arg: str, what: str) -> list[str] | None:
    """``count`` distinct strings naming the rows or columns of ``S``, or ``None``."""
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"{arg} must be a list of {count} {what} names; got {format_value(names)}")
    names = list(names)
    if len(names) != count:
        raise ValueError(
            f"{arg} has {len(names)} names but S has {count} {what}s; "
            f"pass exactly one name per {what}, in the order of S"
        )
    if not all(isinstance(x, str) for x in names):
        raise ValueError(f"{arg} must contain strings; got {format_value(names)}")
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise ValueError(f"{arg} must not repeat names; repeated: {dup}")
    return names


def check_coefficient(value, arg: str) -> float:
    """A weight of Eq. 10's terms (``alpha``, ``beta``, ``gamma``): a finite number >= 0, as a float."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{arg} must be a non-negative number; got {format_value(value)}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{arg} must be a finite non-negative number; got {value!r}")
    return value


def check_per_domain(value, m: int, arg: str) -> np.ndarray | None:
    """A guard (``floor``, ``upper``, ``max_change``): ``None``, or a scalar or one finite number >= 0 per domain."""
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{arg} must be a number or one number per domain; got {format_value(value)}") from None
    if arr.ndim == 0:
        arr = np.full(m, float(arr))
    if arr.shape != (m,):
        raise ValueError(
            f"{arg} must be a scalar or have shape ({m},), one per domain; got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{arg} must be finite and non-negative; got {format_value(arr.tolist())}")
    return arr
