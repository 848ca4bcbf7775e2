"""Update rules of the baseline mixers TiKMiX is measured against. Pure numpy; no torch here.

Each function is one equation of its paper, on plain arrays in the order of the domains; the
mixers in :mod:`tikmix_hf.mixers.baselines` measure the inputs (losses, gradient alignments) and
keep the state between stages. ``docs/baselines.md`` of the project explains how each method was
adapted to a stage-wise callback.

- static: :func:`temperature_weights`;
- ODM (Albalak et al. 2023): :func:`odm_exploration_rate`, :func:`odm_policy`, :func:`odm_update_rewards`;
- DoReMi (Xie et al. 2023): :func:`doremi_update`, :func:`running_average`;
- DoGE (Fan et al. 2023): :func:`doge_update`.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from ..validation import check_positive, check_unit, check_vector, normalise

DOGE_NORM_EPS = 1e-6
"""Added to the mean domain-gradient norm before dividing by it (DoGE's code uses 1e-6)."""

DOGE_CLIP = (0.0, 5.0)
"""DoGE's default clip of the normalised scores, ``[dw_min, dw_max]`` (the code's ``lr_t`` factor aside)."""


# ----------------------------------------------------------------------------------------------
# Helpers


def _softmax(logits: np.ndarray) -> np.ndarray:
    finite = np.isfinite(logits)
    shifted = np.where(finite, logits - logits[finite].max(), -np.inf)
    e = np.exp(shifted)
    return e / e.sum()


def _log(w: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(w)  # a zero weight stays at zero under a multiplicative update


# ----------------------------------------------------------------------------------------------
# Static mixtures


def temperature_weights(sizes: ArrayLike, temperature: float) -> np.ndarray:
    r"""Temperature sampling: ``w_i \propto n_i^{1/T}``.

    The rule of multilingual pre-training (Arivazhagan et al. 2019, "Massively Multilingual Neural
    Machine Translation in the Wild", ``p_i \propto p_i^{1/T}`` with ``p_i = n_i / N``; XLM and mT5
    write it as ``q_i \propto p_i^\alpha``, ``\alpha = 1/T``). ``T = 1`` is the natural mixture,
    ``T -> inf`` the uniform one, ``T < 1`` sharpens toward the largest domain. ``sizes`` may be
    sizes or natural weights: the normalisation makes the answer the same.
    """
    T = check_positive(temperature, "temperature")
    n = normalise(sizes, "sizes")
    return normalise(n ** (1.0 / T), "sizes ** (1/temperature)")


# ----------------------------------------------------------------------------------------------
# ODM: Online Data Mixing (Albalak et al. 2023, arXiv 2312.02406)


def odm_exploration_rate(t: int, num_domains: int, initial: float | None = None) -> float:
    r"""ODM's decaying exploration rate ``eps_t = min{eps_0, sqrt(ln K / (K t))}``, ``eps_0 = 1/K``.

    ODM Algorithm 1 (the EXP3 schedule): ``eps_t = min{1/K, sqrt(ln K / (K t))}``. ``initial``
    replaces the cap ``1/K`` by a smaller ``eps_0`` (it may not exceed ``1/K``: the policy's
    ``1 - K eps`` would turn negative).
    """
    if not isinstance(num_domains, int) or num_domains < 1:
        raise ValueError(f"num_domains={num_domains!r} must be a positive integer")
    if not isinstance(t, (int, np.integer)) or t < 1:
        raise ValueError(f"t={t!r} must be a positive integer (the bandit's clock, 1 for the first update)")
    cap = 1.0 / num_domains if initial is None else check_positive(initial, "initial")
    if cap > 1.0 / num_domains + 1e-15:
        raise ValueError(
            f"initial={initial!r} exceeds 1/K = {1.0 / num_domains:.6g}: the policy's 1 - K eps would be negative"
        )
    if num_domains == 1:
        return cap
    return min(cap, math.sqrt(math.log(num_domains) / (num_domains * int(t))))


def odm_policy(reward_estimates: ArrayLike, eps: float, eps_prev: float) -> np.ndarray:
    r"""ODM's sampling policy (Algorithm 1, the EXP3 mixture with uniform exploration):

    .. math::

        \pi(D_i) = (1 - K\epsilon_t)\,
        \frac{\exp(\epsilon_{t-1}\hat R_i)}{\sum_j \exp(\epsilon_{t-1}\hat R_j)} + \epsilon_t

    A higher reward estimate (a higher loss, in ODM) gives a higher probability; every domain keeps
    at least ``eps_t``.
    """
    R = check_vector(reward_estimates, "reward_estimates")
    K = R.size
    for name, value in (("eps", eps), ("eps_prev", eps_prev)):
        if not isinstance(value, (int, float)) or not 0 <= value <= 1.0 / K + 1e-15:
            raise ValueError(f"{name}={value!r} must lie in [0, 1/K] = [0, {1.0 / K:.6g}]")
    return max(1.0 - K * eps, 0.0) * _softmax(eps_prev * R) + eps


def odm_update_rewards(reward_estimates: ArrayLike, rewards: ArrayLike, alpha: float,
                       policy: ArrayLike | None = None) -> np.ndarray:
    r"""ODM's smoothed-mean reward estimate (Algorithm 1), with reward = loss:

    .. math:: \hat R_i \leftarrow \alpha \hat R_i + (1 - \alpha)\,\frac{R_i}{\pi(D_i)}

    With ``policy`` (bandit feedback, as in ODM: only the sampled domains were seen, the others
    carry ``R_i = 0``), each reward is importance-weighted by ``1 / pi(D_i)``. Without it (full
    information: every domain's loss was measured, as the stage-wise mixer does) the reward enters
    as is, since there is no sampling bias to undo.
    """
    R_hat = check_vector(reward_estimates, "reward_estimates")
    R = check_vector(rewards, "rewards", size=R_hat.size)
    a = check_unit(alpha, "alpha", closed_right=False)
    if policy is not None:
        pi = check_vector(policy, "policy", size=R_hat.size, nonnegative=True)
        seen = R != 0
        if np.any(pi[seen] <= 0):
            raise ValueError(f"policy={pi.tolist()} is zero for a domain with a reward; it cannot have been sampled")
        R = np.where(seen, R / np.where(pi > 0, pi, 1.0), 0.0)
    return a * R_hat + (1.0 - a) * R


# ----------------------------------------------------------------------------------------------
# DoReMi (Xie et al. 2023, arXiv 2305.10429)


def doremi_update(weights: ArrayLike, excess_loss: ArrayLike, eta: float = 1.0, smoothing: float = 1e-3) -> np.ndarray:
    r"""DoReMi's domain-weight step (Algorithm 1, lines 5-6): exponentiated gradient ascent on the
    excess loss, renormalised and mixed with the uniform distribution ``u``:

    .. math::

        \alpha'_t = \alpha_{t-1} \odot \exp(\eta \lambda_t), \qquad
        \alpha_t = (1 - c)\,\frac{\alpha'_t}{\sum_i \alpha'_t[i]} + c\,u

    Defaults are the paper's ``eta = 1`` and ``c = 1e-3`` (the code's ``reweight_eta`` and
    ``reweight_eps``). A domain whose excess loss is positive gains weight relative to the others.
    """
    w = normalise(weights)
    lam = check_vector(excess_loss, "excess_loss", size=w.size, nonnegative=True)
    eta = check_positive(eta, "eta")
    c = check_unit(smoothing, "smoothing", closed_right=True)
    new = _softmax(_log(w) + eta * lam)
    return (1.0 - c) * new + c / w.size


def running_average(average: ArrayLike | None, count: int, weights: ArrayLike) -> np.ndarray:
    r"""``avg_n = (avg_{n-1} (n - 1) + w_n) / n`` with ``n = count + 1``: DoReMi's output
    ``\bar\alpha = \frac{1}{T}\sum_t \alpha_t`` kept incrementally (the code's ``avg_domain_weights``)."""
    w = check_vector(weights, "weights", nonnegative=True)
    if not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count={count!r} must be a non-negative integer (updates averaged so far)")
    if count == 0:
        return w.copy()
    avg = check_vector(average, "average", size=w.size, nonnegative=True)
    return (avg * count + w) / (count + 1)


# ----------------------------------------------------------------------------------------------
# DoGE (Fan et al. 2023, arXiv 2310.15393)


def doge_update(
    weights: ArrayLike,
    alignment: ArrayLike,
    grad_norms: ArrayLike,
    eta: float = 1.0,
    *,
    clip: tuple[float, float] | None = DOGE_CLIP,
    smoothing: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    r"""DoGE's mirror-descent step on the domain weights, driven by gradient alignment.

    DoGE scores domain ``i`` by how well its gradient aligns with the target's,
    ``W_i = <grad l_i(theta), grad l_target(theta)>`` (summed over the target domains), and takes
    the mirror-descent (exponentiated-gradient) step of the paper,
    ``alpha_{t+1} \propto alpha_t \odot \exp(\eta W)``. As DoGE's code does, the scores are first
    divided by the mean gradient norm of the training domains and clipped to ``[dw_min, dw_max]``
    (default ``[0, 5]``), then

    .. math::

        \hat W_i = \mathrm{clip}\!\Big(\frac{W_i}{\frac1k\sum_j\|g_j\| + 10^{-6}}\Big), \qquad
        \alpha_{t+1} = (1 - c)\,\mathrm{softmax}(\log \alpha_t + \eta \hat W) + c\,u

    (DoGE's step is ``eta = lr_t / mu``; ``c`` is its ``reweight_eps``, 0 by default).

    Args:
        weights: the current weights ``alpha_t``.
        alignment: ``W``, one entry per domain (the identity-preconditioned influence summed over tasks).
        grad_norms: ``||g_j||``, the norm of each domain's gradient.
        eta: step size.
        clip: ``(low, high)`` bounds of the normalised scores, or ``None`` for no clipping.
        smoothing: ``c``, the weight of the uniform distribution mixed in after the step.

    Returns:
        ``(new_weights, normalised_scores)``.
    """
    w = normalise(weights)
    W = check_vector(alignment, "alignment", size=w.size)
    norms = check_vector(grad_norms, "grad_norms", size=w.size, nonnegative=True)
    eta = check_positive(eta, "eta")
    c = check_unit(smoothing, "smoothing", closed_right=True)
    scores = W / (norms.mean() + DOGE_NORM_EPS)
    if clip is not None:
        low, high = clip
        if not low <= high:
            raise ValueError(f"clip={clip!r} must be (low, high) with low <= high")
        scores = np.clip(scores, low, high)
    new = _softmax(_log(w) + eta * scores)
    return (1.0 - c) * new + c / w.size, scores


__all__ = [
    "doge_update",
    "doremi_update",
    "odm_exploration_rate",
    "odm_policy",
    "odm_update_rewards",
    "running_average",
    "temperature_weights",
]
