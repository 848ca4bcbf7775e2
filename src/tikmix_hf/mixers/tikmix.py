"""TiKMiX-D and TiKMiX-M: Group Influence (paper Eq. 8), then a solver (Eqs. 9-11 and Algorithm 1)."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import numpy as np

from .._io import jsonable
from .._loss import labelled_targets
from ..influence import InfluenceResult, Lookahead, adaptive_group_influence, group_influence
from ..influence.checks import first_sequences
from ..solvers import SolverResult, solve_direct, solve_surrogate
from ..solvers.decider import TrustRegionDecider
from .base import Decision, Mixer, StageInputs, register
from .tikmix_options import TiKMiXDOptions, TiKMiXMOptions

__all__ = ["TiKMiXDirect", "TiKMiXSurrogate", "measure_influence", "solver_kwargs"]


def solver_kwargs(inputs: StageInputs, tasks: list[str], options: TiKMiXDOptions | None = None) -> dict:
    """The keyword arguments of :func:`~tikmix_hf.solve_direct` for this stage: the objective's weights and
    guards from ``options`` (default: read from ``inputs.config``), and the names."""
    options = TiKMiXDOptions.from_config(inputs.config) if options is None else options
    return dict(
        alpha=options.tikmix_alpha, beta=options.tikmix_beta, gamma=options.tikmix_gamma, pareto=options.tikmix_pareto,
        floor=options.tikmix_floor or None, max_change=options.tikmix_max_change, domains=list(inputs.domains),
        tasks=tasks,
    )


def measure_influence(
    inputs: StageInputs, *, keep_domain_gradients: bool = False
) -> tuple[InfluenceResult | None, str]:
    """Group Influence of the probes on the validation tasks; ``(None, reason)`` on a NaN/inf loss.

    With ``tikmix_target_rse`` the adaptive budget draws the probes; the config allows it only where it
    applies (TiKMiX-D with the identity or adam preconditioner), so it is never silently skipped. With a
    training window (``inputs.window``) the probes only top up the domains the window saw too little of.
    """
    cfg = inputs.config
    try:
        if inputs.window is not None:
            return inputs.window.result(inputs.domain_batches, seed=cfg.tikmix_seed), ""
        if cfg.tikmix_target_rse is not None:
            # Adaptive budget: within this stage's draw, or up to tikmix_probe_max_sequences when the
            # callback hands over sources that draw further.
            if inputs.domain_sources is not None:
                sources = dict(inputs.domain_sources)
                assert inputs.max_probe_batches is not None  # the callback gives it with domain_sources
                cap = int(inputs.max_probe_batches)
            else:
                sources = {name: list(batches) for name, batches in inputs.domain_batches.items()}
                cap = max(len(b) for b in inputs.domain_batches.values())
            return adaptive_group_influence(
                inputs.model,
                sources,
                inputs.validation_batches,
                target_rse=cfg.tikmix_target_rse,
                max_batches=max(cap, cfg.tikmix_min_probe_batches),
                min_batches=cfg.tikmix_min_probe_batches,
                preconditioner=cfg.tikmix_preconditioner,
                optimizer=inputs.optimizer,
                show_progress=inputs.show_progress,
            ), ""
        result = group_influence(
            inputs.model,
            inputs.domain_batches,
            inputs.validation_batches,
            preconditioner=cfg.tikmix_preconditioner,
            optimizer=inputs.optimizer,
            damping=cfg.tikmix_damping if cfg.tikmix_preconditioner == "diag_fisher" else None,  # None: 0.1 mean(F)
            seed=cfg.tikmix_seed,
            show_progress=inputs.show_progress,
            keep_domain_gradients=keep_domain_gradients,
        )
    except FloatingPointError as err:
        return None, f"influence not measured, weights kept: {err}"
    return result, ""


class UncertaintyAware(Mixer):
    """What TiKMiX-D and TiKMiX-M share: the default decision of
    :class:`~tikmix_hf.solvers.decider.TrustRegionDecider`, built from this mixer's options.

    :meth:`decision_scores` turns the measured ``S`` into the matrix the solver sees: averaged over
    stages (``tikmix_smoothing``), then shrunk toward zero by ``tikmix_shrink_z`` standard errors
    (``docs/uncertainty.md``). With both switches off it returns ``result.scores`` itself, so the
    decisions with ``tikmix_objective="paper"`` are the paper's, bit for bit.
    """

    def __init__(self, options: TiKMiXDOptions | None = None) -> None:
        super().__init__(options)
        self._decider: TrustRegionDecider | None = None
        self._saved: dict = {}  # a checkpoint's state, until the options it is read with are known

    def decider(self) -> TrustRegionDecider:
        options = self.options  # configured by decide()
        if self._decider is None:
            self._decider = TrustRegionDecider(
                radius=options.tikmix_trust_radius, radius_min=options.tikmix_trust_radius_min,
                radius_max=options.tikmix_trust_radius_max, smoothing=options.smoothing(),
                shrink_z=options.tikmix_shrink_z, alpha=options.tikmix_alpha, pareto=options.tikmix_pareto,
                floor=options.tikmix_floor or None, max_change=options.tikmix_max_change)
            self._decider.load_state_dict(self._saved)
        return self._decider

    def decision_scores(self, result: InfluenceResult) -> tuple[np.ndarray, dict]:
        options = self.options  # configured by decide()
        z, decay = float(options.tikmix_shrink_z), options.smoothing()
        adaptive = {"adaptive_budget": result.adaptive} if result.adaptive is not None else {}
        if z == 0 and decay == 0:
            return result.scores, ({"uncertainty": adaptive} if adaptive else {})
        decider = self.decider()
        info: dict = {"shrink_z": z, "smoothing": decay, **adaptive}
        scores, stderr = decider.smooth(result.scores, result.stderr, tasks=result.task_names,
                                        domains=result.domain_names)
        if decay > 0 and decider.smoother is not None:  # a decider smooths exactly when decay > 0
            info["smoothed_stages"] = decider.smoother.stages
            info["smoothed_scores"] = jsonable(scores)
            info["smoothed_stderr"] = jsonable(stderr)
        if z > 0:
            if result.stderr is None:
                warnings.warn(f"tikmix_shrink_z={z}: S not shrunk, {result.uncertainty_note}", stacklevel=2)
                info["shrink_skipped"] = result.uncertainty_note
            else:
                shrunk = decider.shrink(scores, stderr)
                info["zeroed_entries"] = int((shrunk == 0).sum() - (result.scores == 0).sum())
                scores = shrunk
        info["scores_used"] = jsonable(scores)
        return scores, {"uncertainty": info}

    def trust_region_answer(self, inputs: StageInputs, result: InfluenceResult,
                            scores: np.ndarray) -> tuple[SolverResult, dict, np.ndarray | None]:
        """The scale-aware TiKMiX-D answer (:meth:`TrustRegionDecider.solve`), what the radius controller saw,
        and the per-domain upper bound it was solved under (``None`` without a repetition cap).

        The radius comes from :class:`~tikmix_hf.solvers.trust_radius.TrustRadius` (grown when the
        last decision's predicted loss drops were realised and the evidence agrees, shrunk when not,
        and scaled down by the standard error of ``S``); the repetition cap ``tikmix_max_epochs``
        becomes an upper bound per domain where sizes are known.
        """
        options = self.options  # configured by decide()
        decider = self.decider()
        losses = [result.task_losses[t] for t in result.task_names]
        step = (inputs.learning_rate or 1.0) * max(int(inputs.stage_steps or 1), 1)
        upper, cap_note = repetition_cap(inputs, options.tikmix_max_epochs)
        solved = decider.solve(result.scores, scores, inputs.prior, stderr=result.stderr, task_losses=losses,
                               step=step, upper=upper, domains=list(inputs.domains), tasks=result.task_names)
        info = {**decider.last["controller"], "step_length": step, "repetition_cap": cap_note,
                "predicted_gain_next": solved.details["predicted_gain"], "kl": solved.details["kl"]}
        return solved, {"trust_region": jsonable(dict(zip_tasks(info, result.task_names)))}, upper

    def state_dict(self) -> dict:
        return dict(self._saved) if self._decider is None else self._decider.state_dict()

    def load_state_dict(self, state: dict) -> None:
        state = dict(state or {})
        unknown = sorted(set(state) - {"smoother", "trust_radius"})
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown mixer state {unknown} in the checkpoint")
        self._decider, self._saved = None, state


def trust_region_metrics(extra: dict) -> dict:
    """What the trust-region objective logs: the radius used, and each task's predicted and realised drop."""
    trust = extra.get("trust_region")
    if not trust:
        return {}
    return {"trust_radius": trust["radius_used"], "predicted_gain": trust.get("predicted_gain_next") or {},
            "realised_gain": trust.get("realised_gain") or {}}


def zip_tasks(info: dict, tasks: list[str]):
    """The controller's per-task lists as ``{task: value}`` mappings, the rest as they are."""
    for key, value in info.items():
        if key in ("predicted_gain", "realised_gain", "predicted_gain_next") and isinstance(value, list):
            yield key, dict(zip(tasks, value))
        else:
            yield key, value


def repetition_cap(inputs: StageInputs, max_epochs: float | None) -> tuple[np.ndarray | None, str | None]:
    """``w_j <= max_epochs * n_j / remaining samples``: no domain read more than ``max_epochs`` times more.

    Applied only where every domain's size and the remaining training are known, and where the caps
    leave a mixture at all (their sum >= 1); otherwise ``None`` and a note that says why.
    """
    if max_epochs is None:
        return None, None
    sizes = [None if inputs.domain_sizes is None else inputs.domain_sizes.get(d) for d in inputs.domains]
    if any(n is None for n in sizes) or not inputs.remaining_samples:
        return None, "not applied: a domain's size or the remaining training is unknown"
    caps = np.minimum(max_epochs * np.asarray(sizes, dtype=np.float64) / float(inputs.remaining_samples), 1.0)
    if caps.sum() < 1.0:
        return None, (f"not applied: the remaining {inputs.remaining_samples} samples exceed {max_epochs:g} epochs "
                      "of every domain together")
    return caps, f"applied: at most {max_epochs:g} epochs of any domain over the remaining training"


@register("direct", options=TiKMiXDOptions)
class TiKMiXDirect(UncertaintyAware):
    """TiKMiX-D: Group Influence (Eq. 8), then the trust-region solver, or SLSQP on the paper's objective with
    the Pareto constraint (Eqs. 9-11)."""

    def decide(self, inputs: StageInputs) -> Decision:
        options = self.configure(inputs.config)
        started = time.perf_counter()
        result, reason = measure_influence(inputs)
        measured = time.perf_counter()
        if result is None:
            return Decision(inputs.prior, "skipped", reason, seconds_measure=measured - started)
        scores, extra = self.decision_scores(result)
        if options.tikmix_objective == "paper":
            solved = solve_direct(scores, inputs.prior, **solver_kwargs(inputs, result.task_names, options))
        else:
            solved, more, _ = self.trust_region_answer(inputs, result, scores)
            extra = {**extra, **more}
        return Decision(solved.weights, solved.status, solved.message, result, solved,
                        seconds_measure=measured - started, seconds_solve=time.perf_counter() - measured,
                        extra=extra, metrics=trust_region_metrics(extra))


@register("surrogate", options=TiKMiXMOptions)
class TiKMiXSurrogate(UncertaintyAware):
    """TiKMiX-M: a LightGBM surrogate of the look-ahead validation gain around the TiKMiX-D answer."""

    #: the look-ahead steps :meth:`calibrate_step` may try: ``learning_rate * 4**k`` for k in this range
    STEP_EXPONENTS = range(-6, 9)

    def __init__(self, options: TiKMiXMOptions | None = None) -> None:
        super().__init__(options)
        self._step_exponent: int | None = None  # where the last calibration peaked; the next one starts there

    def decide(self, inputs: StageInputs) -> Decision:
        options = self.configure(inputs.config)
        started = time.perf_counter()
        result, reason = measure_influence(inputs, keep_domain_gradients=True)
        measured = time.perf_counter()
        if result is None:
            return Decision(inputs.prior, "skipped", reason, seconds_measure=measured - started)
        kwargs = solver_kwargs(inputs, result.task_names, options)
        scores, uncertainty = self.decision_scores(result)
        if options.tikmix_objective == "paper":
            direct = solve_direct(scores, inputs.prior, **kwargs)  # the surrogate's anchor
        else:
            # The surrogate searches within the repetition cap the anchor was solved under, so its answer
            # obeys it too and both measure the Pareto constraint from the same reference.
            direct, more, kwargs["upper"] = self.trust_region_answer(inputs, result, scores)
            uncertainty = {**uncertainty, **more}
        lookahead_seconds = [0.0]
        step, grid = options.tikmix_lookahead_lr, None
        scored = first_sequences(inputs.validation_batches, options.tikmix_lookahead_sequences,
                                 "tikmix_lookahead_sequences")
        tokens_per_forward = sum(int(labelled_targets(b["labels"])) for bs in scored.values() for b in bs)

        def lookahead(W: np.ndarray, step_size: float) -> np.ndarray:
            t0 = time.perf_counter()
            try:
                return stepper.gains(W, step_size=step_size)
            finally:
                lookahead_seconds[0] += time.perf_counter() - t0

        def evaluate(W: np.ndarray) -> np.ndarray:
            gains = lookahead(W, step)
            scale = np.abs(gains).max(axis=0) + 1e-12  # each task in units of its largest drop
            return (gains / scale).sum(axis=1)

        try:
            # One Lookahead for the decision: the unmoved model is scored once, and the anchor at the chosen
            # step (the climb's last look-ahead) is not run again as the candidates' first row.
            stepper = Lookahead(inputs.model, result, scored, show_progress=False)
            if step is None:
                step, grid = self.calibrate_step(
                    inputs.learning_rate, lambda size: float(lookahead(direct.weights[None, :], size).sum()))
            solved = solve_surrogate(scores, inputs.prior, evaluate, n_candidates=options.tikmix_surrogate_candidates,
                                     seed=inputs.config.tikmix_seed + inputs.stage, direct=direct, **kwargs)
        except FloatingPointError as err:
            # A look-ahead that diverges says nothing about the mixture: keep the weights, as TiKMiX-D does
            # when the influence pass itself is not finite.
            return Decision(inputs.prior, "skipped", f"look-ahead not finite, weights kept: {err}", result,
                            seconds_measure=measured - started + lookahead_seconds[0],
                            seconds_solve=time.perf_counter() - measured - lookahead_seconds[0],
                            extra={"lookahead_step": step, "lookahead_step_grid": grid, **uncertainty})
        finally:
            result.domain_gradients = None  # free the m kept gradients
        solve = time.perf_counter() - measured
        return Decision(solved.weights, solved.status, solved.message, result, solved,
                        seconds_measure=measured - started + lookahead_seconds[0],
                        seconds_solve=solve - lookahead_seconds[0],
                        extra={"lookahead_step": step, "lookahead_step_grid": grid,
                               "lookahead_seconds": lookahead_seconds[0], "lookahead_forwards": stepper.forwards,
                               "lookahead_tokens": stepper.forwards * tokens_per_forward, **uncertainty},
                        metrics=trust_region_metrics(uncertainty))

    def calibrate_step(self, learning_rate: float | None, drop: Callable[[float], float]) -> tuple[float, dict]:
        """The look-ahead step size, when ``tikmix_lookahead_lr`` is unset.

        The useful step depends on the preconditioner's scale (Adam's ``1/sqrt(v)`` makes the direction
        hundreds of times longer than the raw gradient): too small and the look-ahead is just ``S w``
        again, too large and every candidate gets worse. So climb the grid ``learning_rate * 4**k``
        (``k`` in :attr:`STEP_EXPONENTS`; the current learning rate, 1e-3 when unknown) along the TiKMiX-D
        direction, with forward passes only (``drop(step)`` is the summed validation-loss drop there), to
        the step whose drop is largest:
        up while the drop grows, and down from the start when the first step up does not help. Near that
        step the gain curves, which is what the surrogate is there to learn. The first stage starts at
        the learning rate, later stages where the last calibration peaked (the peak moves little from
        stage to stage, so a later stage usually costs three look-aheads). A step whose look-ahead loss
        is not finite counts as no drop at all; when no step in the grid is finite the error propagates.
        """
        lr = learning_rate if learning_rate and learning_rate > 0 else 1e-3
        lowest, highest = self.STEP_EXPONENTS[0], self.STEP_EXPONENTS[-1]
        drops: dict[int, float] = {}
        failure: list[FloatingPointError] = []

        def at(k: int) -> float:
            if k not in drops:
                try:
                    drops[k] = drop(lr * 4.0**k)
                except FloatingPointError as err:
                    failure.append(err)
                    drops[k] = -math.inf
            return drops[k]

        start = self._step_exponent if self._step_exponent is not None else 0
        best = start
        while best < highest and at(best) < at(best + 1):
            best += 1
        if best == start:
            while best > lowest and at(best) < at(best - 1):
                best -= 1
        if not math.isfinite(at(best)):
            raise failure[-1]
        self._step_exponent = best
        return lr * 4.0**best, {f"{lr * 4.0**k:.3g}": v for k, v in sorted(drops.items()) if math.isfinite(v)}

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._step_exponent is not None:
            state["lookahead_step_exponent"] = self._step_exponent
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state or {})
        exponent = state.pop("lookahead_step_exponent", None)
        super().load_state_dict(state)
        self._step_exponent = None if exponent is None else int(exponent)
