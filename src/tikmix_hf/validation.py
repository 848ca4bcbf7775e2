"""The checks every layer shares: numbers, vectors, domain weights and the simplex they must lie on.

Pure numpy, so that the solvers (which import no torch), the influence engine, the mixture, the
schedules and the options all refuse a bad value by the same rule and with the same tolerance.
Every check returns the value in the form the caller computes with, or raises ``ValueError``
naming the argument, the offending value and what to pass instead.

- Numbers: :class:`Range` (kind and bounds, written once), :func:`check_number` and its two
  common cases :func:`check_positive` and :func:`check_unit`.
- Arrays: :func:`as_float64` (any array of numbers, or an error that says what was expected).
- Vectors and weights: :func:`check_vector`, :func:`normalise`, :func:`check_weights` (a mapping
  domain -> weight), :func:`check_mixture` (a mixture given as an array or a mapping).
- The simplex: :data:`SIMPLEX_TOL`, :func:`off_simplex` and :func:`project_bounded_simplex`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

#: Slack allowed on the simplex (sum and sign) when checking a mixture someone else computed.
SIMPLEX_TOL = 1e-6


def format_value(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters so that an error message stays readable."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Numbers


def is_real(value: Any) -> bool:
    """A real number that is not a bool (``True`` is an ``int`` in Python, but never a number here)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class Range:
    """What a number must be: finite, an integer or not, and within bounds whose ends are open or closed."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def holds(self, value: Any) -> bool:
        """Whether ``value`` is a number of this kind (never a bool or a string) inside the bounds."""
        if self.integer:
            if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
                return False
        elif not is_real(value):
            return False
        else:
            try:
                if not math.isfinite(value):
                    return False
            except OverflowError:  # an int too large for a float
                return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """The requirement in words: ``"a finite number > 0"``, ``"a number in [0, 1)"``, ``"an integer >= 2"``."""
        noun = "an integer" if self.integer else "a number" if self.high is not None else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{noun} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {self.high:g}"
        return noun


POSITIVE = Range(low=0, low_open=True)
NONNEGATIVE = Range(low=0)


def check_number(value: Any, name: str, rule: Range) -> Any:
    """``value`` when ``rule`` holds for it (returned as given); otherwise a ``ValueError`` naming ``name``."""
    if not rule.holds(value):
        raise ValueError(f"{name} must be {rule.describe()}; got {name}={format_value(value)}")
    return value


def check_positive(value: Any, name: str) -> float:
    """A finite number > 0, as a float."""
    return float(check_number(value, name, POSITIVE))


def check_unit(value: Any, name: str, *, closed_right: bool) -> float:
    """A number in ``[0, 1]`` (``closed_right``) or ``[0, 1)``, as a float."""
    return float(check_number(value, name, Range(0, 1, high_open=not closed_right)))


# ----------------------------------------------------------------------------------------------
# Arrays, vectors and domain weights


def as_float64(value: Any, expected: str) -> np.ndarray:
    """``value`` as a float64 array, or ``ValueError("<expected>; could not convert it (<why>)")``."""
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{expected}; could not convert it ({exc})") from None


def check_vector(value: Any, name: str, *, size: int | None = None, nonnegative: bool = False) -> np.ndarray:
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


def normalise(weights: ArrayLike, name: str = "weights") -> np.ndarray:
    """Finite non-negative weights with a positive sum, divided by their sum."""
    w = check_vector(weights, name, nonnegative=True)
    total = w.sum()
    if total <= 0:
        raise ValueError(f"{name}={w.tolist()} are all zero; at least one domain needs a positive weight")
    return w / total


def check_weights(weights: Any, name: str, domains: Sequence[str] | None = None) -> dict[str, float]:
    """A mapping domain -> weight: non-empty string keys, finite numbers >= 0, not all zero.

    With ``domains`` its keys must be exactly those domains. Returns ``{domain: float}`` in the
    mapping's own order (the caller orders it by its domains).
    """
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(
            f"{name} = {format_value(weights)}; give a mapping domain -> weight, e.g. {{code: 0.3, web: 0.7}}"
        )
    if domains is not None:
        missing = [d for d in domains if d not in weights]
        unknown = [k for k in weights if k not in domains]
        if missing or unknown:
            raise ValueError(f"{name} keys must match domains exactly; missing {missing}, unknown {unknown}")
    out = {}
    for key, value in weights.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name}: domain names must be non-empty strings, got {key!r}")
        if not NONNEGATIVE.holds(value):
            raise ValueError(f"{name}[{key!r}] = {value!r}; weights must be finite and >= 0")
        out[key] = float(value)
    if sum(out.values()) <= 0:
        raise ValueError(f"{name}: every weight is zero; at least one domain needs a positive weight")
    return out


def check_mixture(w: ArrayLike | Mapping[str, float], name: str, size: int,
                  domains: Sequence[str] | None = None) -> np.ndarray:
    """A mixture (an array, or a mapping domain -> weight when ``domains`` fixes the order) as a float64
    vector on the simplex: non-negative and summing to one within :data:`SIMPLEX_TOL`, then renormalised."""
    if isinstance(w, Mapping):
        if domains is None:
            raise ValueError(f"{name} was given as a mapping, which needs domains=[...] to fix the column order of S")
        weights = check_weights(w, name, domains)
        w = [weights[d] for d in domains]
    w = as_float64(w, f"{name} must be a numeric vector of {size} weights")
    if w.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},), one weight per domain (column of S); got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{name} must be finite; got {format_value(w.tolist())}")
    if np.any(w < 0):
        j = int(np.argmin(w))
        raise ValueError(f"{name} must be non-negative; {name}[{j}] = {w[j]}. Pass a mixture on the simplex")
    total = float(w.sum())
    if abs(total - 1.0) > SIMPLEX_TOL:
        raise ValueError(
            f"{name} must sum to 1 (within {SIMPLEX_TOL:g}); it sums to {total!r}. Divide it by its sum first"
        )
    return w / total


# ----------------------------------------------------------------------------------------------
# The simplex


def off_simplex(W: ArrayLike, tol: float = SIMPLEX_TOL) -> np.ndarray:
    """Per row of ``W`` (``(N, m)`` or ``(m,)``): ``True`` where the row is not a mixture.

    A row is a mixture when every entry is finite, none is below ``-tol`` and the sum is within
    ``tol`` of one.
    """
    W = np.atleast_2d(np.asarray(W, dtype=np.float64))
    finite = np.isfinite(W).all(axis=1)
    with np.errstate(invalid="ignore"):
        off = (W.min(axis=1) < -tol) | (np.abs(W.sum(axis=1) - 1) > tol)
    return ~finite | off


def project_bounded_simplex(X: ArrayLike, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of ``X`` onto ``{w : sum w = 1, lo <= w <= hi}``.

    The answer is ``clip(x - tau, lo, hi)`` for the ``tau`` at which it sums to 1. That sum is
    piecewise linear and non-increasing in ``tau``, with a breakpoint at every ``x_j - hi_j``
    (slope drops by 1) and ``x_j - lo_j`` (slope rises by 1); walking the sorted breakpoints
    gives the sum at each of them, and the crossing of 1 is interpolated exactly.
    Needs ``sum lo <= 1 <= sum hi``.
    """
    X = np.asarray(X, dtype=np.float64)
    single = X.ndim == 1
    X = np.atleast_2d(X)
    n, m = X.shape
    breaks = np.concatenate([X - hi, X - lo], axis=1)
    order = np.argsort(breaks, axis=1, kind="stable")
    breaks = np.take_along_axis(breaks, order, axis=1)
    slope = np.cumsum(np.concatenate([-np.ones(m), np.ones(m)])[order], axis=1)  # slope after each break
    sums = np.empty_like(breaks)
    sums[:, 0] = hi.sum()
    np.cumsum(slope[:, :-1] * np.diff(breaks, axis=1), axis=1, out=sums[:, 1:])
    sums[:, 1:] += hi.sum()
    k = np.clip((sums >= 1.0).sum(axis=1) - 1, 0, 2 * m - 2)
    rows = np.arange(n)
    s_k, c_k, t_k = sums[rows, k], slope[rows, k], breaks[rows, k]
    tau = t_k + np.where(c_k < 0, (s_k - 1.0) / np.where(c_k < 0, -c_k, 1.0), 0.0)
    w = np.clip(X - tau[:, None], lo, hi)
    # The walk is exact up to rounding; put the last ulps on the free coordinates.
    free = (w > lo) & (w < hi)
    resid = (1.0 - w.sum(axis=1)) / np.maximum(free.sum(axis=1), 1)
    w = np.clip(np.where(free, w + resid[:, None], w), lo, hi)
    return w[0] if single else w
