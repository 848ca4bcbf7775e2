r"""A starting mixture before step 0: the domains whose token statistics best explain each task's text.

Before any model exists, a mixture can already be tilted toward the validation tasks, as a person
who knows where the tasks come from would tilt it. Each domain ``j`` gets a unigram model
``q_j`` of its tokens (add-``alpha`` smoothed over the vocabulary), and each task ``i`` the
mixture weights under which its text is most likely:

.. math::

    \hat u_i = \arg\max_{u \in \Delta} \sum_v c_{iv} \log \sum_j u_j q_{jv}

(``c_i`` the task's token counts). The log-likelihood is concave in ``u``, so the EM iteration
``u_j \leftarrow u_j \sum_v (c_{iv} / N_i)\, q_{jv} / (u^\top q)_v`` climbs to its maximum. This is the
classical estimate of a mixture language model's interpolation weights; Domain2Vec (arXiv
2506.10952) and DSIR (arXiv 2302.03169) match domains to a target by such token statistics.

The starting mixture blends the tasks' matches into a base (the mixture's own weights)::

    w_0 = (1 - share) base + share mean_i \hat u_i

so every domain keeps at least ``1 - share`` of its base weight and the tasks share the rest, the
shape of the "half natural, half the tasks' sources" mixture a person would pick. TiKMiX's
decisions then correct it from measured influence. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..simplex import check_vector

__all__ = ["AlignmentResult", "aligned_mixture", "task_matches"]

#: Add-alpha smoothing of each domain's unigram model (tokens the domain's sample never shows).
SMOOTHING = 0.1
#: EM stops when no weight moves by more than this between two iterations.
TOLERANCE = 1e-10
MAX_ITERATIONS = 2000


@dataclass(frozen=True)
class AlignmentResult:
    """The starting mixture, each task's match (``(n, m)``, rows on the simplex) and its EM iterations."""

    weights: np.ndarray
    matches: np.ndarray
    iterations: list[int]


def task_matches(domain_counts, task_counts, *, smoothing: float = SMOOTHING, tol: float = TOLERANCE,
                 max_iterations: int = MAX_ITERATIONS) -> tuple[np.ndarray, list[int]]:
    """Each task's maximum-likelihood mixture of the domains' unigram models (module docstring).

    Args:
        domain_counts: ``(m, V)`` token counts of a sample of each domain.
        task_counts: ``(n, V)`` token counts of each task's text.

    Returns:
        ``(n, m)`` weights (rows on the simplex) and the EM iterations each task took.
    """
    D = np.asarray(domain_counts, dtype=np.float64)
    C = np.asarray(task_counts, dtype=np.float64)
    if D.ndim != 2 or C.ndim != 2 or D.shape[1] != C.shape[1] or D.shape[0] == 0 or C.shape[0] == 0:
        raise ValueError(f"domain_counts (m, V) and task_counts (n, V) must share V; got shapes {D.shape} and "
                         f"{C.shape}")
    if not (np.isfinite(D).all() and np.isfinite(C).all()) or (D < 0).any() or (C < 0).any():
        raise ValueError("token counts must be finite and non-negative")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0 (an unseen token would have probability 0); got {smoothing!r}")
    empty = [j for j, row in enumerate(D) if row.sum() == 0]
    if empty:
        raise ValueError(f"domains at positions {empty} have no tokens in their sample")
    m, V = D.shape
    Q = (D + smoothing) / (D.sum(axis=1, keepdims=True) + smoothing * V)  # (m, V) unigram models
    out, iterations = np.empty((C.shape[0], m)), []
    for i, c in enumerate(C):
        total = c.sum()
        if total == 0:
            raise ValueError(f"task at position {i} has no tokens")
        seen = c > 0
        q, ci = Q[:, seen], c[seen] / total
        u = np.full(m, 1.0 / m)
        for k in range(1, max_iterations + 1):
            new = u * (q @ (ci / (u @ q)))
            new /= new.sum()
            done = np.max(np.abs(new - u)) <= tol
            u = new
            if done:
                break
        out[i] = u
        iterations.append(k)
    return out, iterations


def aligned_mixture(domain_counts, task_counts, base, *, share: float = 0.5,
                    smoothing: float = SMOOTHING) -> AlignmentResult:
    """``w_0 = (1 - share) base + share mean_i u_i`` (module docstring), with each task's match ``u_i``."""
    share = float(share)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must lie in [0, 1]; got {share!r}")
    base = check_vector(base, "base", size=np.asarray(domain_counts).shape[0], nonnegative=True)
    if abs(base.sum() - 1.0) > 1e-6:
        raise ValueError(f"base must be a mixture (sum 1); its weights sum to {base.sum()!r}")
    matches, iterations = task_matches(domain_counts, task_counts, smoothing=smoothing)
    weights = (1.0 - share) * base + share * matches.mean(axis=0)
    return AlignmentResult(weights=weights / weights.sum(), matches=matches, iterations=iterations)
