"""Options of the TiKMiX callback: one flat dataclass whose fields are command-line flags.

Every field is prefixed ``tikmix_`` so :class:`TiKMiXConfig` can sit beside any
``TrainingArguments`` subclass in one ``HfArgumentParser``, or be mixed in through
:class:`TiKMiXTrainingArguments`::

    parser = HfArgumentParser(TiKMiXTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses()   # --tikmix_solver direct --tikmix_stage_steps 500 ...
    callback = TiKMiXCallback(mixture, validation, config=args.tikmix_config())

:class:`TiKMiXConfig` is composed of option groups (:mod:`tikmix_hf.options`): the callback's own,
declared here (which mixer, when it decides, what is measured, what is reported), and each
registered mixer's, declared beside the mixer. Each field declares its check; the rules between
groups are :meth:`TiKMiXConfig.check_rules`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

from .influence import PRECONDITIONERS
from .mixers import MIXERS
from .mixers.baselines import DoGEOptions, DoReMiOptions, ODMOptions, StaticOptions
from .mixers.replay import ReplayOptions
from .mixers.tikmix_options import DEFAULT_SMOOTHING, OBJECTIVES, TiKMiXMOptions
from .options import OptionGroup, check_options, choice, custom, fail, flag, integer, number, numbers, option
from .validation import check_weights

__all__ = [
    "DEFAULT_FRACTIONS", "DEFAULT_SMOOTHING", "INFLUENCE_SOURCES", "INITIAL_KEYWORDS", "OBJECTIVES", "SOLVERS",
    "MeasurementOptions", "MixerChoice", "ReportingOptions", "StageOptions", "TiKMiXConfig", "validate_config",
    "window_obstacle",
]

#: ``--tikmix_solver`` choices: every registered mixer.
SOLVERS = tuple(MIXERS)
#: ``--tikmix_influence_source`` choices: probe sequences, or the training window's own micro-batches.
INFLUENCE_SOURCES = ("auto", "probes", "training")
#: ``--tikmix_initial_weights`` keywords (anything else is a JSON mapping domain -> weight).
INITIAL_KEYWORDS = ("keep", "natural", "uniform", "aligned")
#: Where decisions fall when no schedule is given: early for the default objective, the paper's otherwise.
DEFAULT_FRACTIONS = {"trust_region": (0.05, 0.25, 0.5, 0.75), "paper": (0.25, 0.5, 0.75)}


def _registered_mixers() -> tuple[str, ...]:
    """The mixers registered now: one registered after this module was imported is a valid choice too."""
    return tuple(MIXERS)


def _check_initial_weights(name: str, value) -> None:
    """Unset, a keyword of :data:`INITIAL_KEYWORDS`, or the JSON text of a mapping domain -> weight."""
    if value is None or isinstance(value, str) and value in INITIAL_KEYWORDS:
        return
    fix = 'use keep, natural, uniform, aligned, or a JSON mapping such as \'{"code": 0.6, "web": 0.4}\''
    try:
        parsed = json.loads(value) if isinstance(value, str) else None
    except (json.JSONDecodeError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        fail(name, value, fix)
    try:
        check_weights(parsed, "the mapping")
    except ValueError as err:
        fail(name, value, f"{fix} ({err})")


@dataclass
class MixerChoice(OptionGroup):
    """Which mixer decides, the weights training starts from (and the aligned start's budget), and the seed of
    every random draw."""

    # A Literal of the runtime tuple, for HfArgumentParser's choices; mypy takes literal values only.
    tikmix_solver: Annotated[Literal[SOLVERS], choice(_registered_mixers)] = option(  # type: ignore[valid-type]
        "direct",
        "direct: TiKMiX-D (SLSQP with the Pareto constraint); surrogate: TiKMiX-M (LightGBM search). "
        "Baselines (docs/baselines.md): static (fixed weights, see tikmix_initial_weights and "
        "tikmix_temperature); odm (Online Data Mixing, EXP3 bandit on per-domain loss); doremi "
        "(excess loss over tikmix_reference_model); doge (gradient alignment with the validation tasks). "
        "replay: follow tikmix_schedule (docs/schedules.md), no influence pass.",
    )
    tikmix_initial_weights: Annotated[str | None, custom(_check_initial_weights, optional=True)] = option(
        None,
        "keep (the mixture's own weights), natural, uniform, aligned (the mixture's own weights, half of them "
        "moved to the domains whose token statistics best match each validation task, computed before step 0 "
        "from tikmix_alignment_sequences examples per domain; docs/method.md), or a JSON mapping domain -> "
        "weight. Unset: aligned for TiKMiX-D and TiKMiX-M with the default objective, keep otherwise.",
    )
    tikmix_alignment_share: Annotated[
        float, number(at_least=0, at_most=1, fix="must lie in [0, 1], e.g. 0.5")
    ] = option(
        0.5,
        "initial_weights=aligned: the share of the starting mixture given to the tasks' token matches; the rest "
        "keeps the mixture's own weights.",
    )
    tikmix_alignment_sequences: Annotated[
        int, integer(at_least=1, fix="must be a positive integer, e.g. 256")
    ] = option(
        256, "initial_weights=aligned: examples per domain and per task whose tokens are counted."
    )
    tikmix_seed: Annotated[int, integer(at_least=0)] = option(
        0, "Seed of the probe draws and of the surrogate search."
    )



@dataclass
class StageOptions(OptionGroup):
    """When the mixture is re-decided: every N steps or tokens, or at fractions of training (one of them)."""

    tikmix_stage_steps: Annotated[int | None, integer(at_least=1, optional=True)] = option(
        None, "Re-decide the mixture every N optimizer steps."
    )
    tikmix_stage_tokens: Annotated[int | None, integer(at_least=1, optional=True)] = option(
        None, "Re-decide the mixture every N training tokens (all ranks together)."
    )
    tikmix_stage_fractions: Annotated[
        list[float] | None,
        numbers(above=0, below=1, optional=True, fix="give increasing fractions strictly between 0 and 1, e.g. 0.5"),
    ] = option(None, "Re-decide at these fractions of max_steps, e.g. 0.5 (the paper's single switch).")
    tikmix_warmup_steps: Annotated[int | None, integer(at_least=1, optional=True)] = option(
        None, "Take the first decision after this many steps, then follow the regular stages."
    )

    def check_rules(self) -> None:
        given = [n for n in ("tikmix_stage_steps", "tikmix_stage_tokens", "tikmix_stage_fractions") if getattr(self, n)]
        if len(given) > 1:
            fail(given[1], getattr(self, given[1]), f"give only one of {given} to set the stage boundaries")


@dataclass
class MeasurementOptions(OptionGroup):
    """What the callback measures at a stage boundary, for every mixer that measures: the probe and validation
    sequences, where the domain gradients come from, the curvature, and the adaptive probe budget."""

    tikmix_probe_sequences: Annotated[int, integer(at_least=1)] = option(
        16, "Probe sequences drawn per domain at each stage (equal budget per domain)."
    )
    # A Literal of the runtime tuple, for HfArgumentParser's choices; mypy takes literal values only.
    tikmix_influence_source: Annotated[Literal[INFLUENCE_SOURCES], choice(INFLUENCE_SOURCES)] = option(  # type: ignore[valid-type]
        "auto",
        "Where TiKMiX-D takes the domain gradients of S from: probes (sequences drawn for the purpose at each "
        "boundary) or training (the training micro-batches of the tikmix_window_steps steps before it, read in "
        "hooks; a domain the window saw fewer than tikmix_probe_sequences times is topped up with probes). "
        "auto: training wherever the run allows it, probes elsewhere and with tikmix_objective=paper.",
    )
    tikmix_window_steps: Annotated[
        int, integer(at_least=1, fix="must be a positive number of optimizer steps, e.g. 64")
    ] = option(
        64,
        "influence_source=training: optimizer steps before each boundary whose micro-batches the window may read "
        "(at most the second half of the stage); the hooks stop once every domain has tikmix_window_sequences.",
    )
    tikmix_general_sequences: Annotated[
        int, integer(at_least=0, fix="must be 0 (off) or a positive number of sequences, e.g. 16")
    ] = option(
        0,
        "A guard for general ability: one more validation task, 'general', of this many sequences drawn from every "
        "domain in proportion to its natural weight (from the mixture's probe stream). Its gradient enters S like "
        "any task's, so the Pareto constraint keeps every decision from predicting a rise of its loss; 0 = off.",
    )
    tikmix_window_sequences: Annotated[
        int | None,
        integer(at_least=0, optional=True,
                fix="must be 0 (every sequence) or a positive number of sequences per domain, or unset"),
    ] = option(
        None,
        "influence_source=training: the sequences of each domain a window reads in its hooks, all ranks together, "
        "the first ones in stream order (unset: tikmix_probe_sequences; 0: every sequence of the window). Training "
        "itself is unchanged; the hooks cost less the fewer they read.",
    )
    tikmix_validation_sequences: Annotated[int, integer(at_least=1)] = option(
        16, "Sequences per validation task used for its gradient."
    )
    tikmix_probe_batch_size: Annotated[int | None, integer(at_least=1, optional=True)] = option(
        None, "Micro-batch size of the influence pass (default: per_device_train_batch_size)."
    )
    # A Literal of the runtime tuple, for HfArgumentParser's choices; mypy takes literal values only.
    tikmix_preconditioner: Annotated[Literal[PRECONDITIONERS], choice(PRECONDITIONERS)] = option(  # type: ignore[valid-type]
        "identity",
        "Curvature in S = grad f^T (H + lambda I)^-1 g: identity, adam (the optimizer's v_hat) or diag_fisher.",
    )
    tikmix_damping: Annotated[
        float | None, number(above=0, optional=True, fix="must be a finite number > 0 (or unset for 0.1 x mean "
                                                          "diagonal)")
    ] = option(None, "diag_fisher only: lambda added to the diagonal (default 0.1 x mean of the diagonal).")
    tikmix_target_rse: Annotated[
        float | None, number(above=0, optional=True, fix="must be a finite number > 0, e.g. 0.2 (or unset for the "
                                                          "full budget)")
    ] = option(
        None,
        "direct with the identity or adam preconditioner: adaptive probe budget; stop differentiating a "
        "domain's probe micro-batches once its relative standard error |SE_j| / |S_j| is below this target "
        "(the cap: tikmix_probe_max_sequences). Unset = use every probe sequence.",
    )
    tikmix_probe_max_sequences: Annotated[
        int | None, integer(at_least=1, optional=True, fix="must be a positive integer >= tikmix_probe_sequences, "
                                                            "or unset")
    ] = option(
        None,
        "Adaptive probe budget: the most probe sequences one domain may take at a stage, drawn beyond "
        "tikmix_probe_sequences while its standard error is above tikmix_target_rse (default: "
        "tikmix_probe_sequences, so the budget can only save).",
    )
    tikmix_min_probe_batches: Annotated[
        int, integer(at_least=2, fix="must be an integer >= 2 (a standard error needs two batches)")
    ] = option(4, "Adaptive probe budget: micro-batches per domain before the target may stop it (>= 2).")

    def check_rules(self) -> None:
        rse, cap = self.tikmix_target_rse, self.tikmix_probe_max_sequences
        if rse is not None and self.tikmix_preconditioner == "diag_fisher":
            fail("tikmix_target_rse", rse,
                 "the adaptive probe budget needs the preconditioner before the first probe batch, and diag_fisher "
                 "is built from all of them; use tikmix_preconditioner='identity' or 'adam', or unset it")
        if cap is not None and cap < self.tikmix_probe_sequences:
            fail("tikmix_probe_max_sequences", cap,
                 f"must be an integer >= tikmix_probe_sequences ({self.tikmix_probe_sequences}), or unset")
        if cap is not None and rse is None:
            fail("tikmix_probe_max_sequences", cap, "only applies with tikmix_target_rse set (the adaptive budget)")


@dataclass
class ReportingOptions(OptionGroup):
    """What the callback reports besides the history: the matrix to the loggers, a collapse warning, progress."""

    tikmix_log_matrix: Annotated[bool, flag()] = option(
        True,
        "Also log every influence entry as tikmix/influence/<task>/<domain> to the report_to integrations "
        "(the console shows one short line per stage either way).",
    )
    tikmix_entropy_warning: Annotated[float, number(at_least=0, at_most=1, fix="must lie in [0, 1]")] = option(
        0.5, "Warn when the weights' entropy falls below this fraction of log(number of domains)."
    )
    tikmix_show_progress: Annotated[bool, flag()] = option(True, "Show a progress bar during the influence pass.")


@dataclass
class ReliabilityOptions(OptionGroup):
    """How long TiKMiX's own collectives wait for a rank that may be lost (``docs/reliability.md``)."""

    tikmix_collective_timeout: Annotated[
        float | None,
        number(above=0, at_most=1e9, optional=True,
               fix="must be a number of seconds in (0, 1e9], e.g. 600 (or unset for the process group's own timeout, "
                   "TrainingArguments.ddp_timeout)"),
    ] = option(
        600.0,
        "Seconds TiKMiX's own collectives (the all-reduces of the influence pass and the training window, the "
        "decision's broadcast) wait for every rank; past it, or at once where a rank died, every rank stops with "
        "an error naming the collective and the ranks that may be lost. Unset: the process group's timeout "
        "(TrainingArguments.ddp_timeout, 30 minutes by default). The Trainer's own collectives keep ddp_timeout.",
    )


# The first base's fields come last: the flags are listed mixer, stages, measurement, TiKMiX-D/M, replay,
# baselines, reporting.
@dataclass
class TiKMiXConfig(ReliabilityOptions, ReportingOptions, DoGEOptions, DoReMiOptions, ODMOptions, StaticOptions,
                   ReplayOptions, TiKMiXMOptions, MeasurementOptions, StageOptions, MixerChoice):
    """How and when TiKMiX re-mixes the training domains (see docs/method.md of the project).

    The fields, by the option group that declares them (``--help`` of any script that parses them gives
    each one's text):

    - **The mixer** (:class:`MixerChoice`): ``tikmix_solver`` (any registered mixer: TiKMiX-D, TiKMiX-M
      or a baseline), ``tikmix_initial_weights`` (with ``tikmix_alignment_share`` and
      ``tikmix_alignment_sequences`` for the aligned start), ``tikmix_seed``.
    - **When** (:class:`StageOptions`): ``tikmix_stage_steps``, ``tikmix_stage_tokens`` or
      ``tikmix_stage_fractions`` (exactly one; with none, at 5, 25, 50 and 75 percent of training, or 25,
      50 and 75 with ``tikmix_objective="paper"``), and ``tikmix_warmup_steps`` for an earlier first decision.
    - **What is measured** (:class:`MeasurementOptions`): ``tikmix_probe_sequences``,
      ``tikmix_validation_sequences``, ``tikmix_probe_batch_size``, ``tikmix_preconditioner``,
      ``tikmix_damping``, where the domain gradients come from, ``tikmix_influence_source`` (probes, or the
      training window of ``tikmix_window_steps`` steps, reading up to ``tikmix_window_sequences`` per domain),
      the guard for general ability ``tikmix_general_sequences``, and the adaptive budget ``tikmix_target_rse``,
      ``tikmix_probe_max_sequences``, ``tikmix_min_probe_batches`` (``docs/uncertainty.md``).
    - **TiKMiX-D** (:class:`~tikmix_hf.mixers.tikmix_options.TiKMiXDOptions`): ``tikmix_objective``
      (``trust_region`` or the paper's Eq. 10), ``tikmix_trust_radius`` with its bounds
      ``tikmix_trust_radius_min``/``_max``, ``tikmix_max_epochs``; Eq. 10's ``tikmix_beta``,
      ``tikmix_gamma``; both use ``tikmix_alpha``, ``tikmix_pareto`` and the guards ``tikmix_floor``,
      ``tikmix_max_change``; the uncertainty switches ``tikmix_shrink_z``, ``tikmix_smoothing``.
    - **TiKMiX-M** (:class:`~tikmix_hf.mixers.tikmix_options.TiKMiXMOptions`):
      ``tikmix_surrogate_candidates``, ``tikmix_lookahead_sequences``, ``tikmix_lookahead_lr``.
    - **Replay** (:class:`~tikmix_hf.mixers.replay.ReplayOptions`, ``docs/schedules.md``):
      ``tikmix_schedule``, ``tikmix_schedule_domains``.
    - **Baselines** (``tikmix_hf.mixers.baselines``, ``docs/baselines.md``): ``tikmix_temperature``,
      ``tikmix_odm_*``, ``tikmix_doremi_*``, ``tikmix_reference_model``, ``tikmix_doge_eta``.
    - **Reporting** (:class:`ReportingOptions`): ``tikmix_log_matrix``, ``tikmix_entropy_warning``,
      ``tikmix_show_progress``.
    - **Reliability** (:class:`ReliabilityOptions`, ``docs/reliability.md``): ``tikmix_collective_timeout``.

    Bad values raise ``ValueError`` naming the field, the value and the fix.
    """

    def check_rules(self) -> None:
        """The rules between groups: replay against the stage options, the adaptive budget and the training
        window against the mixer that measures."""
        solver = self.tikmix_solver
        if solver == "replay":
            if self.tikmix_schedule is None:
                fail("tikmix_schedule", None,
                     "tikmix_solver='replay' needs the path of a history.json or a schedule file (docs/schedules.md)")
            for name in ("tikmix_stage_steps", "tikmix_stage_tokens", "tikmix_stage_fractions", "tikmix_warmup_steps"):
                if getattr(self, name):
                    fail(name, getattr(self, name), "the schedule's positions are the stage boundaries of a replay; "
                                                    "unset it")
        else:
            for name in ("tikmix_schedule", "tikmix_schedule_domains"):
                if getattr(self, name) is not None:
                    fail(name, getattr(self, name), f"only used with tikmix_solver='replay' (this run uses "
                                                    f"{solver!r}); unset it or switch the solver")
        rse = self.tikmix_target_rse
        if rse is not None and solver != "direct":
            fail("tikmix_target_rse", rse,
                 f"the adaptive probe budget applies to tikmix_solver='direct' only (TiKMiX-M keeps every domain's "
                 f"gradient for its look-ahead); unset it for tikmix_solver={solver!r}")
        obstacle = window_obstacle(self)
        if self.tikmix_influence_source == "training" and obstacle is not None:
            name, fix = obstacle
            fail(name, getattr(self, name), fix)

    def initial_weights(self) -> str | dict[str, float]:
        """``tikmix_initial_weights`` parsed (a keyword or a mapping); unset, ``"aligned"`` for TiKMiX-D and
        TiKMiX-M with the default objective, ``"keep"`` for the paper's objective and every other mixer."""
        value = self.tikmix_initial_weights
        if value is None:
            default = self.tikmix_solver in ("direct", "surrogate") and self.tikmix_objective == "trust_region"
            return "aligned" if default else "keep"
        return value if value in INITIAL_KEYWORDS else json.loads(value)

    def window_quota(self) -> int | None:
        """The sequences of each domain a training window reads: ``tikmix_window_sequences``, the probe budget
        when it is unset, and every sequence (``None``) when it is 0."""
        quota = self.tikmix_window_sequences
        if quota is None:
            return self.tikmix_probe_sequences
        return quota or None

    def influence_source(self) -> str:
        """Where this run measures the domain side of ``S``: ``"training"`` (the window) or ``"probes"``.

        ``auto`` takes the window wherever this config allows one (:func:`window_obstacle`), and probes
        elsewhere and with ``tikmix_objective="paper"``, which reproduces the paper's method.
        """
        source = self.tikmix_influence_source
        if source == "auto":
            usable = window_obstacle(self) is None and self.tikmix_objective != "paper"
            return "training" if usable else "probes"
        return source


def window_obstacle(c) -> tuple[str, str] | None:
    """Why a training window cannot measure for this config, as ``(field to name, fix)``; ``None`` when it can."""
    if c.tikmix_solver != "direct":
        return "tikmix_influence_source", (
            f"the training window measures for tikmix_solver='direct' only (TiKMiX-M keeps every domain's whole "
            f"gradient, which the hooks never form); use 'probes' with tikmix_solver={c.tikmix_solver!r}")
    if c.tikmix_preconditioner == "diag_fisher":
        return "tikmix_influence_source", (
            "diag_fisher is built from probe batches before their gradients are scored; use "
            "tikmix_preconditioner='identity' or 'adam' with the training window")
    if c.tikmix_target_rse is not None:
        return "tikmix_target_rse", (
            "the adaptive probe budget draws probes, the training window reads training batches; unset one")
    if c.tikmix_stage_tokens:
        return "tikmix_influence_source", (
            "the window opens tikmix_window_steps before a boundary, so boundaries must be known in steps; set "
            "tikmix_stage_steps or tikmix_stage_fractions instead of tikmix_stage_tokens")
    return None


def validate_config(c) -> None:
    """Every rule a :class:`TiKMiXConfig` (or a :class:`~tikmix_hf.TiKMiXTrainingArguments`) must satisfy: each
    field's declared check, then the rules between fields; the error names the field, the value and the fix."""
    check_options(c)
