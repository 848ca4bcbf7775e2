r"""A starting mixture before step 0: the domains whose token statistics best explain each task's text.

Before any model exists, a mixture can already be tilted toward the validation tasks, as a person
who knows where the tasks come from would tilt it. Each domain ``j`` gets a bigram model of its
tokens, smoothed toward its unigram model (and that one add-``alpha`` toward uniform)::

    q_j(b | a) = (c_j(a, b) + beta q_j(b)) / (c_j(a) + beta),    q_j(b) = (c_j(b) + alpha) / (N_j + alpha V)

and each task ``i`` the mixture weights under which its text is most likely,

.. math::

    \hat u_i = \arg\max_{u \in \Delta} \sum_t \log \sum_j u_j\, q_j(x_t \mid x_{t-1})

(the first token of a sequence under ``q_j(x_1)``). The log-likelihood is concave in ``u``, so the EM
iteration ``u_j \leftarrow \frac{1}{T} \sum_t u_j q_j(x_t \mid x_{t-1}) / \sum_k u_k q_k(x_t \mid x_{t-1})``
climbs to its maximum: the classical estimate of an interpolated language model's weights.
Domain2Vec (arXiv 2506.10952) and DSIR (arXiv 2302.03169) likewise match domains to a target by
token statistics.

The starting mixture blends the tasks' matches into a base (the mixture's own weights)::

    w_0 = (1 - share) base + share mean_i \hat u_i

so every domain keeps at least ``1 - share`` of its base weight and the tasks share the rest, the
shape of the "half natural, half the tasks' sources" mixture a person would pick. TiKMiX's
decisions then correct it from measured influence. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ..validation import check_vector

__all__ = ["AlignmentResult", "aligned_mixture", "em_mixture_weights", "task_matches"]

#: Add-alpha smoothing of each domain's unigram model toward uniform (tokens its sample never shows).
SMOOTHING = 0.1
#: Weight of the unigram model in each domain's bigram model (a Dirichlet prior of this many counts).
BACKOFF = 1.0
#: EM stops when no weight moves by more than this between two iterations.
TOLERANCE = 1e-10
MAX_ITERATIONS = 5000


@dataclass(frozen=True)
class AlignmentResult:
    """The starting mixture, each task's match (``(n, m)``, rows on the simplex) and its EM iterations."""

    weights: np.ndarray
    matches: np.ndarray
    iterations: list[int]


def em_mixture_weights(likelihoods: ArrayLike, counts: ArrayLike | None = None, *, tol: float = TOLERANCE,
                       max_iterations: int = MAX_ITERATIONS) -> tuple[np.ndarray, int]:
    """``argmax_u sum_e n_e log sum_j u_j L_ej`` over the simplex, by EM from the uniform mixture.

    ``likelihoods``: ``(events, m)``, positive; ``counts``: ``n_e`` per event (default 1).
    Returns the weights and the iterations taken.
    """
    L = np.asarray(likelihoods, dtype=np.float64)
    n = np.ones(L.shape[0]) if counts is None else np.asarray(counts, dtype=np.float64)
    if L.ndim != 2 or L.shape[0] == 0 or L.shape[1] == 0 or n.shape != (L.shape[0],):
        raise ValueError(f"likelihoods must be (events, m) with one count per event; got {L.shape} and {n.shape}")
    if not (np.isfinite(L).all() and (L > 0).all() and np.isfinite(n).all() and (n >= 0).all() and n.sum() > 0):
        raise ValueError("likelihoods must be finite and positive, counts finite, non-negative and not all zero")
    share = n / n.sum()
    u = np.full(L.shape[1], 1.0 / L.shape[1])
    for k in range(1, max_iterations + 1):  # noqa: B007 (the iterations taken are returned)
        new = u * ((share / (L @ u)) @ L)
        new /= new.sum()
        done = float(np.max(np.abs(new - u))) <= tol
        u = new
        if done:
            break
    return u, k


def _pairs(sequences: Sequence[np.ndarray], V: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique ``a * V + b`` keys of the sequences' consecutive token pairs, with their counts."""
    keys = [s[:-1] * V + s[1:] for s in sequences if s.size > 1]
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.unique(np.concatenate(keys), return_counts=True)


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """``values`` at ``queries`` in the sorted ``keys``; 0 where a query is not among them."""
    if keys.size == 0:
        return np.zeros(queries.size)
    at = np.minimum(np.searchsorted(keys, queries), keys.size - 1)
    return np.where(keys[at] == queries, values[at], 0.0)


def task_matches(domain_sequences: Sequence[Sequence], task_sequences: Sequence[Sequence], *,
                 smoothing: float = SMOOTHING, backoff: float = BACKOFF) -> tuple[np.ndarray, list[int]]:
    """Each task's maximum-likelihood mixture of the domains' smoothed bigram models (module docstring).

    Args:
        domain_sequences: per domain, a sample of its token sequences (1-D integer arrays).
        task_sequences: per task, its token sequences.

    Returns:
        ``(n, m)`` weights (rows on the simplex) and the EM iterations each task took.
    """
    if not smoothing > 0 or not backoff > 0:
        raise ValueError(f"smoothing and backoff must be > 0; got {smoothing!r} and {backoff!r}")
    domains = [[np.asarray(s, dtype=np.int64).reshape(-1) for s in group] for group in domain_sequences]
    tasks = [[np.asarray(s, dtype=np.int64).reshape(-1) for s in group] for group in task_sequences]
    if not domains or not tasks:
        raise ValueError("give at least one domain and one task")
    every = [s for group in (*domains, *tasks) for s in group if s.size]
    if any((s < 0).any() for s in every):
        raise ValueError("token ids must be non-negative")
    for kind, groups in (("domain", domains), ("task", tasks)):
        empty = [k for k, group in enumerate(groups) if not any(s.size for s in group)]
        if empty:
            raise ValueError(f"{kind}s at positions {empty} have no tokens")
    V = 1 + max(int(s.max()) for s in every)
    m = len(domains)
    unigram = np.stack([np.bincount(np.concatenate(g), minlength=V) for g in domains]).astype(np.float64)
    unigram = (unigram + smoothing) / (unigram.sum(axis=1, keepdims=True) + smoothing * V)  # (m, V)
    keys, counts, context = [], [], np.zeros((m, V))
    for j, group in enumerate(domains):
        k, c = _pairs(group, V)
        keys.append(k)
        counts.append(c.astype(np.float64))
        np.add.at(context[j], k // V, c)
    matches, iterations = np.empty((len(tasks), m)), []
    for i, group in enumerate(tasks):
        pair_keys, pair_counts = _pairs(group, V)
        firsts, first_counts = np.unique([s[0] for s in group if s.size], return_counts=True)
        a, b = pair_keys // V, pair_keys % V
        L = np.empty((pair_keys.size + firsts.size, m))
        for j in range(m):
            pair = _lookup(keys[j], counts[j], pair_keys)
            L[: pair_keys.size, j] = (pair + backoff * unigram[j, b]) / (context[j, a] + backoff)
            L[pair_keys.size:, j] = unigram[j, firsts]
        matches[i], steps = em_mixture_weights(L, np.concatenate([pair_counts, first_counts]))
        iterations.append(steps)
    return matches, iterations


def aligned_mixture(domain_sequences: Sequence[Sequence], task_sequences: Sequence[Sequence], base: ArrayLike, *,
                    share: float = 0.5, smoothing: float = SMOOTHING, backoff: float = BACKOFF) -> AlignmentResult:
    """``w_0 = (1 - share) base + share mean_i u_i`` (module docstring), with each task's match ``u_i``."""
    share = float(share)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must lie in [0, 1]; got {share!r}")
    base = check_vector(base, "base", size=len(domain_sequences), nonnegative=True)
    if abs(base.sum() - 1.0) > 1e-6:
        raise ValueError(f"base must be a mixture (sum 1); its weights sum to {base.sum()!r}")
    matches, iterations = task_matches(domain_sequences, task_sequences, smoothing=smoothing, backoff=backoff)
    weights = (1.0 - share) * base + share * matches.mean(axis=0)
    return AlignmentResult(weights=weights / weights.sum(), matches=matches, iterations=iterations)
