"""Baseline mixers: static, ODM, DoReMi and DoGE behind the same :class:`~tikmix_hf.mixers.Mixer`
interface as TiKMiX, so that one callback, one history format and one resume path serve every arm
of a comparison (``--tikmix_solver static|odm|doremi|doge``).

The update rules are the pure functions of :mod:`tikmix_hf.solvers.baselines`; this module measures
their inputs with torch and keeps their state between stages as JSON (:meth:`Mixer.state_dict`),
which the callback stores in every checkpoint. Each method was written for its own training loop;
``docs/baselines.md`` says how each was adapted to a decision at stage boundaries, and why.

Example (a custom loop, without the callback)::

    mixer = ODMMixer()
    decision = mixer.decide(StageInputs(stage=0, step=500, domains=names, prior=w, model=model,
                                        optimizer=None, domain_batches=probes, validation_batches={},
                                        config=TiKMiXConfig(tikmix_solver="odm")))
    decision.weights    # the next mixture, in the order of ``names``
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch

from .._distributed import unwrap
from ..influence import group_influence
from ..options import OptionGroup, number, option, text
from ..solvers.baselines import (
    doge_update,
    doremi_update,
    odm_exploration_rate,
    odm_policy,
    odm_update_rewards,
    running_average,
    temperature_weights,
)
from .base import Decision, Mixer, StageInputs, register
from .probe_losses import probe_losses

__all__ = [
    "DoGEMixer", "DoGEOptions", "DoReMiMixer", "DoReMiOptions", "ODMMixer", "ODMOptions", "StaticMixer",
    "StaticOptions",
]


def _named(domains: list[str], values) -> dict[str, float]:
    return {d: float(v) for d, v in zip(domains, np.asarray(values, dtype=np.float64))}


def _check_state(owner: Mixer, state: Mapping, keys: set[str]) -> None:
    unknown = sorted(set(state) - keys)
    if unknown:
        raise ValueError(f"{type(owner).__name__} state has unknown keys {unknown}; expected {sorted(keys)}")


def _check_domains(owner: Mixer, vector: list | None, domains: list[str], what: str) -> None:
    if vector is not None and len(vector) != len(domains):
        raise ValueError(
            f"{type(owner).__name__}: the saved {what} has {len(vector)} entries but this run has "
            f"{len(domains)} domains {domains}; resume with the same domains"
        )


# ----------------------------------------------------------------------------------------------
# Static


@dataclass
class StaticOptions(OptionGroup):
    """The static mixture's temperature."""

    tikmix_temperature: Annotated[float, number(above=0)] = option(
        1.0,
        "static: w proportional to w0^(1/T), w0 the weights in effect at the first stage boundary "
        "(with tikmix_initial_weights=natural: size^(1/T)); 1 keeps them.",
    )


@register("static", options=StaticOptions)
class StaticMixer(Mixer):
    r"""Fixed weights: the static arms of a comparison.

    The weights are those in effect at the first stage boundary, i.e. what ``tikmix_initial_weights``
    chose (``natural``, ``uniform`` or an explicit JSON mapping; ``keep``: the mixture's own), raised
    to ``1 / tikmix_temperature`` and renormalised (:func:`~tikmix_hf.solvers.temperature_weights`);
    with ``natural`` that is temperature sampling, ``w \propto size^{1/T}``. Every later stage returns
    the same weights. Since the callback first consults the mixer at the first stage boundary, a
    temperature other than 1 applies from there: set ``tikmix_warmup_steps=1`` to apply it from
    step 1, or pass ``temperature_weights(sizes, T)`` as ``tikmix_initial_weights``.
    """

    def __init__(self, options: StaticOptions | None = None) -> None:
        super().__init__(options)
        self.weights: list[float] | None = None

    def decide(self, inputs: StageInputs) -> Decision:
        T = self.configure(inputs.config).tikmix_temperature
        _check_domains(self, self.weights, inputs.domains, "weights")
        first = self.weights is None
        if first:
            self.weights = temperature_weights(inputs.prior, T).tolist()
        message = (f"static mixture set from the weights in effect at temperature {T:g}" if first
                   else "static mixture kept")
        return Decision(np.array(self.weights), "converged", message, extra={"temperature": T})

    def state_dict(self) -> dict:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        _check_state(self, state, {"weights"})
        weights = state.get("weights")
        self.weights = None if weights is None else [float(w) for w in weights]


# ----------------------------------------------------------------------------------------------
# ODM


@dataclass
class ODMOptions(OptionGroup):
    """ODM's reward smoothing and initial exploration rate."""

    tikmix_odm_alpha: Annotated[
        float, number(at_least=0, below=1, fix="must lie in [0, 1) (1 would never update the reward)")
    ] = option(0.9, "odm: smoothing of the mean reward, R <- alpha R + (1 - alpha) loss; in [0, 1).")
    tikmix_odm_exploration: Annotated[
        float | None,
        number(above=0, at_most=1, optional=True, fix="must lie in (0, 1/number of domains] (or unset for 1/K)"),
    ] = option(
        None, "odm: initial exploration rate eps_0 (at most 1/K); eps_t = min(eps_0, sqrt(ln K / (K t))). Default 1/K."
    )


@register("odm", options=ODMOptions)
class ODMMixer(Mixer):
    r"""Online Data Mixing (Albalak et al. 2023): an EXP3 bandit whose reward is the domain's loss.

    At every stage boundary (so the decisions are as frequent as the stage schedule, not every step
    as in ODM), with ``t`` the global step:

    1. ``L_i``: the model's mean token loss on domain ``i``'s probe batches of this stage, **measured
       with forward passes only**. ODM's reward is the training loss it already has for each
       sampled batch; a callback never sees per-domain training losses (the Trainer reports one mixed
       loss), so the loss is re-measured on fresh probe samples at the current parameters. Every
       domain is measured (equal probe budget), so the reward is full-information and is not
       importance-weighted by ``1/pi``;
    2. ``R_i <- alpha R_i + (1 - alpha) L_i`` (smoothed mean, ``tikmix_odm_alpha``);
    3. ``eps_t = min(eps_0, sqrt(ln K / (K t)))`` (``eps_0 = tikmix_odm_exploration``, default ``1/K``);
    4. ``pi_i = (1 - K eps_t) softmax(eps_{t-1} R)_i + eps_t``, the next mixture.

    ODM optimises the **training loss**: it up-weights the domains the model finds hardest (highest
    loss), which is not a validation target. Noisy or incompressible domains attract weight; the
    validation tasks are not used. State: the reward estimates ``R``, ``eps_{t-1}`` and the update count.
    """

    def __init__(self, options: ODMOptions | None = None) -> None:
        super().__init__(options)
        self.rewards: list[float] | None = None
        self.eps_prev: float | None = None
        self.updates = 0

    def decide(self, inputs: StageInputs) -> Decision:
        options = self.configure(inputs.config)
        K = len(inputs.domains)
        _check_domains(self, self.rewards, inputs.domains, "reward estimates")
        initial = options.tikmix_odm_exploration
        if initial is not None and initial > 1.0 / K:
            raise ValueError(f"tikmix_odm_exploration={initial!r} exceeds 1/K = {1.0 / K:.6g} for K={K} domains")
        started = time.perf_counter()
        try:
            measured = probe_losses(inputs.model, inputs.domain_batches, show_progress=inputs.show_progress)
        except FloatingPointError as err:
            return Decision(inputs.prior, "skipped", f"losses not measured, weights kept: {err}",
                            seconds_measure=time.perf_counter() - started)
        solve_started = time.perf_counter()
        rewards = np.zeros(K) if self.rewards is None else np.array(self.rewards)
        eps_prev = (1.0 / K if initial is None else initial) if self.eps_prev is None else self.eps_prev
        eps = odm_exploration_rate(max(int(inputs.step), 1), K, initial=initial)
        rewards = odm_update_rewards(rewards, measured.losses, options.tikmix_odm_alpha)
        policy = odm_policy(rewards, eps, eps_prev)
        self.rewards, self.eps_prev, self.updates = rewards.tolist(), float(eps), self.updates + 1
        extra = {
            "losses": _named(inputs.domains, measured.losses),
            "reward_estimates": _named(inputs.domains, rewards),
            "exploration": eps,
            "exploration_prev": eps_prev,
            "updates": self.updates,
        }
        return Decision(policy, "converged", f"ODM policy at t={inputs.step}, eps={eps:.4g}",
                        seconds_measure=measured.seconds, seconds_solve=time.perf_counter() - solve_started,
                        extra=extra)

    def state_dict(self) -> dict:
        return {"rewards": self.rewards, "eps_prev": self.eps_prev, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        _check_state(self, state, {"rewards", "eps_prev", "updates"})
        rewards = state.get("rewards")
        self.rewards = None if rewards is None else [float(r) for r in rewards]
        self.eps_prev = None if state.get("eps_prev") is None else float(state["eps_prev"])
        self.updates = int(state.get("updates", 0))


# ----------------------------------------------------------------------------------------------
# DoReMi


class _AveragingMixer(Mixer):
    """A mixer that keeps the running average of its weights and its update count (JSON state)."""

    def state_dict(self) -> dict:
        return {"average": self.average, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        _check_state(self, state, {"average", "updates"})
        average = state.get("average")
        self.average = None if average is None else [float(a) for a in average]
        self.updates = int(state.get("updates", 0))


@dataclass
class DoReMiOptions(OptionGroup):
    """DoReMi's step size, uniform smoothing and reference model."""

    tikmix_doremi_eta: Annotated[float, number(above=0)] = option(
        1.0, "doremi: step size of the exponentiated-gradient update on the excess loss."
    )
    tikmix_doremi_smoothing: Annotated[float, number(at_least=0, at_most=1, fix="must lie in [0, 1]")] = option(
        1e-3, "doremi: weight c of the uniform distribution mixed into each update; in [0, 1]."
    )
    # Whether the folder exists is checked when DoReMi loads it, so that a saved config can be rebuilt anywhere.
    tikmix_reference_model: Annotated[
        str | None,
        text(optional=True, fix="must be the path of a local folder written by save_pretrained; or leave it unset "
                                "and give the model object to DoReMiMixer(reference_model=...)"),
    ] = option(None, "doremi: local folder of the reference model (AutoModelForCausalLM.from_pretrained).")


@register("doremi", options=DoReMiOptions)
class DoReMiMixer(_AveragingMixer):
    r"""DoReMi (Xie et al. 2023): Group DRO on the excess loss over a reference model.

    At every stage boundary, on the stage's probe batches (forward passes only):

    1. ``lambda_i = mean over domain i's probe tokens of max(l_model - l_ref, 0)``: the excess loss,
       clipped per token as in DoReMi, of the model being trained (DoReMi's "proxy") over the
       reference model;
    2. ``alpha_t = (1 - c) softmax(log alpha_{t-1} + eta lambda) + c / k`` (``tikmix_doremi_eta``,
       ``tikmix_doremi_smoothing``), with ``alpha_{t-1}`` the weights in effect; ``alpha_t`` is the
       next mixture;
    3. ``avg = mean_t alpha_t``, DoReMi's output, is kept in the state and reported
       (``history[...]["mixer"]["average_weights"]``).

    DoReMi trains a small proxy with these weights and then trains the real model on ``avg``; here
    the model being trained plays the proxy and the weights are applied online. To reproduce the
    paper's second phase, train a fresh model with ``--tikmix_solver static --tikmix_initial_weights
    '<avg as JSON>'``.

    Args:
        reference_model: the reference model itself (on any device; it is moved to the model's). If
            ``None``, ``tikmix_reference_model`` (a local folder) is loaded with
            ``AutoModelForCausalLM.from_pretrained`` at the first decision. The callback builds the mixer
            without arguments; to give a model object, set ``callback.mixer = DoReMiMixer(reference_model=ref)``.
    """

    def __init__(self, reference_model: torch.nn.Module | None = None,
                 options: DoReMiOptions | None = None) -> None:
        super().__init__(options)
        if reference_model is not None and not isinstance(reference_model, torch.nn.Module):
            raise TypeError(f"reference_model must be a torch.nn.Module, got {type(reference_model).__name__}")
        self.reference_model = reference_model
        self.average: list[float] | None = None
        self.updates = 0

    def check_ready(self, config: Any) -> None:
        path = self.configure(config).tikmix_reference_model
        if self.reference_model is not None:
            return
        if path is None:
            raise ValueError(
                "tikmix_solver='doremi' needs a reference model: set tikmix_reference_model to a local folder "
                "written by save_pretrained, or set callback.mixer = DoReMiMixer(reference_model=model)"
            )
        if not os.path.isdir(path):
            raise ValueError(
                f"tikmix_reference_model={path!r}: no such folder on this machine; give the folder that "
                "save_pretrained wrote for the reference model"
            )

    def _reference(self, inputs: StageInputs) -> torch.nn.Module:
        device = next(unwrap(inputs.model).parameters()).device
        if self.reference_model is None:
            self.check_ready(inputs.config)
            path = self.options.tikmix_reference_model
            from transformers import AutoModelForCausalLM

            try:
                self.reference_model = AutoModelForCausalLM.from_pretrained(path)
            except (OSError, ValueError) as err:
                raise ValueError(f"tikmix_reference_model={path!r} could not be loaded: {err}") from err
        ref = self.reference_model
        if next(ref.parameters()).device != device:
            ref.to(device)
        return ref

    def decide(self, inputs: StageInputs) -> Decision:
        options = self.configure(inputs.config)
        _check_domains(self, self.average, inputs.domains, "average weights")
        reference = self._reference(inputs)
        started = time.perf_counter()
        try:
            measured = probe_losses(inputs.model, inputs.domain_batches, reference, show_progress=inputs.show_progress)
        except FloatingPointError as err:
            return Decision(inputs.prior, "skipped", f"losses not measured, weights kept: {err}",
                            seconds_measure=time.perf_counter() - started)
        solve_started = time.perf_counter()
        assert measured.excess is not None  # measured against the reference model
        weights = doremi_update(inputs.prior, measured.excess, options.tikmix_doremi_eta,
                                options.tikmix_doremi_smoothing)
        average = running_average(self.average, self.updates, weights)
        self.average, self.updates = average.tolist(), self.updates + 1
        extra = {
            "excess_loss": _named(inputs.domains, measured.excess),
            "losses": _named(inputs.domains, measured.losses),
            "reference_losses": _named(inputs.domains, measured.reference),
            "average_weights": _named(inputs.domains, average),
            "updates": self.updates,
        }
        return Decision(weights, "converged", "DoReMi exponentiated-gradient step on the excess loss",
                        seconds_measure=measured.seconds, seconds_solve=time.perf_counter() - solve_started,
                        extra=extra)


# ----------------------------------------------------------------------------------------------
# DoGE


@dataclass
class DoGEOptions(OptionGroup):
    """DoGE's step size."""

    tikmix_doge_eta: Annotated[float, number(above=0)] = option(
        1.0, "doge: step size of the mirror-descent update on the normalised alignment scores."
    )


@register("doge", options=DoGEOptions)
class DoGEMixer(_AveragingMixer):
    r"""DoGE (Fan et al. 2023): up-weight the domains whose gradient aligns with the target's.

    At every stage boundary:

    1. ``S = group_influence(..., preconditioner="identity")``, so ``S_ij = <grad f_i, g_j>``: the
       alignment of domain ``j``'s probe gradient with validation task ``i``'s gradient (DoGE's
       out-of-domain mode, the validation tasks being the target); ``W_j = sum_i S_ij``;
    2. ``W_hat = clip(W / (mean_j ||g_j|| + 1e-6), 0, 5)``, DoGE's normalisation and clip;
    3. ``w = softmax(log w_prev + eta W_hat)`` (``tikmix_doge_eta``), the mirror-descent step, with
       ``w_prev`` the weights in effect; the running average of the weights is reported as well.

    DoGE takes this step every training step with ``eta = lr_t / mu``; here one step per stage, so
    ``eta`` is a per-stage step size. Cost: one forward+backward per probe and validation batch and
    ``m`` gradient-sized buffers (for the norms ``||g_j||``), as DoGE's own per-domain gradients.
    The influence matrix is logged like TiKMiX's (``tikmix/influence/...``).
    """

    def __init__(self, options: DoGEOptions | None = None) -> None:
        super().__init__(options)
        self.average: list[float] | None = None
        self.updates = 0

    def decide(self, inputs: StageInputs) -> Decision:
        options = self.configure(inputs.config)
        _check_domains(self, self.average, inputs.domains, "average weights")
        started = time.perf_counter()
        try:
            result = group_influence(
                inputs.model, inputs.domain_batches, inputs.validation_batches, preconditioner="identity",
                seed=inputs.config.tikmix_seed, show_progress=inputs.show_progress, keep_domain_gradients=True,
            )
        except FloatingPointError as err:
            return Decision(inputs.prior, "skipped", f"influence not measured, weights kept: {err}",
                            seconds_measure=time.perf_counter() - started)
        try:
            assert result.domain_gradients is not None  # kept: keep_domain_gradients=True
            norms = np.array([torch.linalg.vector_norm(row, dtype=torch.float64).item()
                              for row in result.domain_gradients])
        finally:
            result.domain_gradients = None  # free the m kept gradients
        measured = time.perf_counter()
        alignment = result.scores.sum(axis=0)
        weights, scores = doge_update(inputs.prior, alignment, norms, options.tikmix_doge_eta)
        average = running_average(self.average, self.updates, weights)
        self.average, self.updates = average.tolist(), self.updates + 1
        extra = {
            "alignment": _named(inputs.domains, alignment),
            "gradient_norms": _named(inputs.domains, norms),
            "scores": _named(inputs.domains, scores),
            "average_weights": _named(inputs.domains, average),
            "updates": self.updates,
        }
        return Decision(weights, "converged", "DoGE mirror-descent step on the gradient alignment", result,
                        seconds_measure=measured - started, seconds_solve=time.perf_counter() - measured,
                        extra=extra)
