"""Options of the TiKMiX callback: one dataclass whose fields are command-line flags.

Every field is prefixed ``tikmix_`` so :class:`TiKMiXConfig` can sit beside any
``TrainingArguments`` subclass in one ``HfArgumentParser``, or be mixed in through
:class:`TiKMiXTrainingArguments`::

    parser = HfArgumentParser(TiKMiXTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses()   # --tikmix_solver direct --tikmix_stage_steps 500 ...
    callback = TiKMiXCallback(mixture, validation, config=args.tikmix_config())
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Literal

from .influence import PRECONDITIONERS
from .mixers import MIXERS
from .schedule import parse_domain_map

#: ``--tikmix_solver`` choices: every registered mixer.
SOLVERS = tuple(MIXERS)
#: ``--tikmix_objective`` choices of TiKMiX-D (and of TiKMiX-M's anchor).
OBJECTIVES = ("trust_region", "paper")
#: ``--tikmix_influence_source`` choices: probe sequences, or the training window's own micro-batches.
INFLUENCE_SOURCES = ("auto", "probes", "training")
#: ``--tikmix_initial_weights`` keywords (anything else is a JSON mapping domain -> weight).
INITIAL_KEYWORDS = ("keep", "natural", "uniform", "aligned")
#: Where decisions fall when no schedule is given: early for the default objective, the paper's otherwise.
DEFAULT_FRACTIONS = {"trust_region": (0.05, 0.25, 0.5, 0.75), "paper": (0.25, 0.5, 0.75)}
#: The decay of S's average over stages when none is given: evidence accumulates under the default objective;
#: the paper's uses each stage's own S.
DEFAULT_SMOOTHING = {"trust_region": 0.5, "paper": 0.0}


def _help(text: str) -> dict:
    return {"help": text.replace("%", "%%")}


@dataclass
class TiKMiXConfig:
    """How and when TiKMiX re-mixes the training domains (see docs/method.md of the project).

    The fields, by what they control (``--help`` of any script that parses them gives each one's text):

    - **The mixer**: ``tikmix_solver`` (any registered mixer: TiKMiX-D, TiKMiX-M or a baseline),
      ``tikmix_initial_weights``, ``tikmix_seed``.
    - **When**: ``tikmix_stage_steps``, ``tikmix_stage_tokens`` or ``tikmix_stage_fractions`` (exactly
      one; with none, at 5, 25, 50 and 75 percent of training, or 25, 50 and 75 with
      ``tikmix_objective="paper"``), and
      ``tikmix_warmup_steps`` for an earlier first decision.
    - **What is measured**: ``tikmix_probe_sequences``, ``tikmix_validation_sequences``,
      ``tikmix_probe_batch_size``, ``tikmix_preconditioner``, ``tikmix_damping``, and where the domain
      gradients come from, ``tikmix_influence_source`` (probes, or the training window of
      ``tikmix_window_steps`` steps).
    - **TiKMiX-D's objective**: ``tikmix_objective`` (``trust_region`` or the paper's Eq. 10),
      ``tikmix_trust_radius`` with its bounds ``tikmix_trust_radius_min``/``_max``,
      ``tikmix_max_epochs``; Eq. 10's ``tikmix_beta``, ``tikmix_gamma``; both use ``tikmix_alpha``,
      ``tikmix_pareto`` and the guards ``tikmix_floor``, ``tikmix_max_change``.
    - **TiKMiX-M**: ``tikmix_surrogate_candidates``, ``tikmix_lookahead_sequences``, ``tikmix_lookahead_lr``.
    - **Uncertainty** (``docs/uncertainty.md``): ``tikmix_shrink_z``, ``tikmix_smoothing``, and the
      adaptive budget ``tikmix_target_rse``, ``tikmix_probe_max_sequences``, ``tikmix_min_probe_batches``.
    - **Reporting**: ``tikmix_log_matrix``, ``tikmix_entropy_warning``, ``tikmix_show_progress``.
    - **Reliability** (``docs/reliability.md``): ``tikmix_collective_timeout``.
    - **Replay** (``docs/schedules.md``): ``tikmix_schedule``, ``tikmix_schedule_domains``.
    - **Baselines** (``docs/baselines.md``): ``tikmix_temperature``, ``tikmix_odm_*``,
      ``tikmix_doremi_*``, ``tikmix_reference_model``, ``tikmix_doge_eta``.

    Bad values raise ``ValueError`` naming the field, the value and the fix.
    """

    tikmix_solver: Literal[SOLVERS] = field(
        default="direct",
        metadata=_help(
            "direct: TiKMiX-D (SLSQP with the Pareto constraint); surrogate: TiKMiX-M (LightGBM search). "
            "Baselines (docs/baselines.md): static (fixed weights, see tikmix_initial_weights and "
            "tikmix_temperature); odm (Online Data Mixing, EXP3 bandit on per-domain loss); doremi "
            "(excess loss over tikmix_reference_model); doge (gradient alignment with the validation tasks). "
            "replay: follow tikmix_schedule (docs/schedules.md), no influence pass."
        ),
    )
    tikmix_stage_steps: int | None = field(
        default=None, metadata=_help("Re-decide the mixture every N optimizer steps.")
    )
    tikmix_stage_tokens: int | None = field(
        default=None,
        metadata=_help("Re-decide the mixture every N training tokens (all ranks together)."),
    )
    tikmix_stage_fractions: list[float] | None = field(
        default=None,
        metadata=_help("Re-decide at these fractions of max_steps, e.g. 0.5 (the paper's single switch)."),
    )
    tikmix_warmup_steps: int | None = field(
        default=None,
        metadata=_help("Take the first decision after this many steps, then follow the regular stages."),
    )
    tikmix_probe_sequences: int = field(
        default=16, metadata=_help("Probe sequences drawn per domain at each stage (equal budget per domain).")
    )
    tikmix_influence_source: Literal[INFLUENCE_SOURCES] = field(
        default="auto",
        metadata=_help(
            "Where TiKMiX-D takes the domain gradients of S from: probes (sequences drawn for the purpose at each "
            "boundary) or training (the training micro-batches of the tikmix_window_steps steps before it, read in "
            "hooks; a domain the window saw fewer than tikmix_probe_sequences times is topped up with probes). "
            "auto: training wherever the run allows it, probes elsewhere and with tikmix_objective=paper."
        ),
    )
    tikmix_window_steps: int = field(
        default=32,
        metadata=_help("influence_source=training: optimizer steps before each boundary whose micro-batches count."),
    )
    tikmix_window_sequences: int | None = field(
        default=None,
        metadata=_help(
            "influence_source=training: the sequences of each domain a window reads in its hooks, all ranks "
            "together, the first ones in stream order (unset: every sequence of the window). Training itself is "
            "unchanged; the hooks cost less the fewer they read."
        ),
    )
    tikmix_validation_sequences: int = field(
        default=16, metadata=_help("Sequences per validation task used for its gradient.")
    )
    tikmix_probe_batch_size: int | None = field(
        default=None, metadata=_help("Micro-batch size of the influence pass (default: per_device_train_batch_size).")
    )
    tikmix_preconditioner: Literal[PRECONDITIONERS] = field(
        default="identity",
        metadata=_help(
            "Curvature in S = grad f^T (H + lambda I)^-1 g: identity, adam (the optimizer's v_hat) or diag_fisher."
        ),
    )
    tikmix_damping: float | None = field(
        default=None,
        metadata=_help("diag_fisher only: lambda added to the diagonal (default 0.1 x mean of the diagonal)."),
    )
    tikmix_objective: Literal[OBJECTIVES] = field(
        default="trust_region",
        metadata=_help(
            "direct/surrogate: trust_region (the default; the largest predicted validation-loss drop within a KL "
            "trust region around the previous mixture, docs/method.md) or paper (Eq. 10 as published: normalised "
            "gain, std and entropy)."
        ),
    )
    tikmix_trust_radius: float = field(
        default=0.1,
        metadata=_help("trust_region: initial radius, the largest KL(w || w_prev) in nats one decision may move."),
    )
    tikmix_trust_radius_min: float = field(
        default=0.01, metadata=_help("trust_region: the radius never shrinks below this (nats).")
    )
    tikmix_trust_radius_max: float = field(
        default=1.0, metadata=_help("trust_region: the radius never grows above this (nats).")
    )
    tikmix_max_epochs: float | None = field(
        default=4.0,
        metadata=_help(
            "trust_region: repetition cap; no domain is weighted to be read more than this many times over the "
            "remaining training, where domain sizes are known. Unset = no cap."
        ),
    )
    tikmix_alpha: float = field(default=1.0, metadata=_help("Weight of std(P_hat), the spread across tasks (Eq. 10)."))
    tikmix_beta: float = field(default=1.0, metadata=_help("Weight of sum(P_hat), the total normalised gain (Eq. 10)."))
    tikmix_gamma: float = field(default=1.0, metadata=_help("Weight of the entropy H(w), data diversity (Eq. 10)."))
    tikmix_pareto: bool = field(
        default=True, metadata=_help("Require S w >= S w_prev: no task worse than under the previous mixture.")
    )
    tikmix_floor: float = field(default=0.0, metadata=_help("Lowest weight any domain may get (0 = no floor)."))
    tikmix_max_change: float | None = field(
        default=None, metadata=_help("Largest change of one domain's weight per stage (none by default).")
    )
    tikmix_initial_weights: str = field(
        default="keep",
        metadata=_help(
            "keep (the mixture's own weights), natural, uniform, aligned (the mixture's own weights tilted toward "
            "the domains whose token statistics best match each validation task, computed before step 0 from "
            "tikmix_alignment_sequences examples per domain; docs/method.md), or a JSON mapping domain -> weight."
        ),
    )
    tikmix_alignment_share: float = field(
        default=0.5,
        metadata=_help("initial_weights=aligned: the share of the starting mixture given to the tasks' token "
                       "matches; the rest keeps the mixture's own weights."),
    )
    tikmix_alignment_sequences: int = field(
        default=64,
        metadata=_help("initial_weights=aligned: examples per domain and per task whose tokens are counted."),
    )
    tikmix_surrogate_candidates: int = field(
        default=32, metadata=_help("TiKMiX-M: mixtures evaluated by the look-ahead to train the surrogate.")
    )
    tikmix_lookahead_sequences: int | None = field(
        default=8,
        metadata=_help(
            "TiKMiX-M: the look-ahead scores each candidate on at most this many of each task's validation "
            "sequences (one forward pass over them per candidate; unset = all tikmix_validation_sequences)."
        ),
    )
    tikmix_lookahead_lr: float | None = field(
        default=None,
        metadata=_help(
            "TiKMiX-M: step size of the virtual look-ahead step (default: the best of a grid of learning-rate "
            "multiples along the TiKMiX-D direction)."
        ),
    )
    tikmix_seed: int = field(default=0, metadata=_help("Seed of the probe draws and of the surrogate search."))
    # Uncertainty of the influence matrix (docs/uncertainty.md)
    tikmix_shrink_z: float = field(
        default=0.0,
        metadata=_help(
            "direct/surrogate: shrink S toward zero by z standard errors, sign(S) max(|S| - z SE, 0), before "
            "solving, so that noise cannot move weight or bind the Pareto constraint; 0 = the paper's plain "
            "S (1.0 is a sensible choice). Needs >= 2 probe micro-batches per domain."
        ),
    )
    tikmix_smoothing: float | None = field(
        default=None,
        metadata=_help(
            "direct/surrogate: decay in [0, 1) of a precision-weighted (1/SE^2) average of S over stages, kept in "
            "the checkpoint; 0 = off (each stage uses its own S). Unset: 0.5 with tikmix_objective=trust_region, "
            "0 with paper."
        ),
    )
    tikmix_target_rse: float | None = field(
        default=None,
        metadata=_help(
            "direct with the identity or adam preconditioner: adaptive probe budget; stop differentiating a "
            "domain's probe micro-batches once its relative standard error |SE_j| / |S_j| is below this target "
            "(the cap: tikmix_probe_max_sequences). Unset = use every probe sequence."
        ),
    )
    tikmix_probe_max_sequences: int | None = field(
        default=None,
        metadata=_help(
            "Adaptive probe budget: the most probe sequences one domain may take at a stage, drawn beyond "
            "tikmix_probe_sequences while its standard error is above tikmix_target_rse (default: "
            "tikmix_probe_sequences, so the budget can only save)."
        ),
    )
    tikmix_min_probe_batches: int = field(
        default=4,
        metadata=_help("Adaptive probe budget: micro-batches per domain before the target may stop it (>= 2)."),
    )
    tikmix_log_matrix: bool = field(
        default=True,
        metadata=_help(
            "Also log every influence entry as tikmix/influence/<task>/<domain> to the report_to integrations "
            "(the console shows one short line per stage either way)."
        ),
    )
    tikmix_entropy_warning: float = field(
        default=0.5,
        metadata=_help("Warn when the weights' entropy falls below this fraction of log(number of domains)."),
    )
    tikmix_show_progress: bool = field(default=True, metadata=_help("Show a progress bar during the influence pass."))
    tikmix_collective_timeout: float | None = field(
        default=600.0,
        metadata=_help(
            "Seconds TiKMiX's own collectives (the all-reduces of the influence pass and the training window, the "
            "decision's broadcast) wait for every rank; past it, or at once where a rank died, every rank stops with "
            "an error naming the collective and the ranks that may be lost. Unset: the process group's timeout "
            "(TrainingArguments.ddp_timeout, 30 minutes by default). The Trainer's own collectives keep ddp_timeout."
        ),
    )
    # Replay (docs/schedules.md)
    tikmix_schedule: str | None = field(
        default=None,
        metadata=_help(
            "replay: a history.json of an earlier run, or a YAML/JSON list of {at: <fraction | {steps: N} | "
            "{tokens: N}>, weights: {domain: w}}; its positions are this run's stage boundaries."
        ),
    )
    tikmix_schedule_domains: str | None = field(
        default=None,
        metadata=_help("replay: JSON mapping of the schedule's domain names to this run's, e.g. '{\"web\": \"cc\"}'."),
    )
    # Baseline mixers (docs/baselines.md)
    tikmix_temperature: float = field(
        default=1.0,
        metadata=_help(
            "static: w proportional to w0^(1/T), w0 the weights in effect at the first stage boundary "
            "(with tikmix_initial_weights=natural: size^(1/T)); 1 keeps them."
        ),
    )
    tikmix_odm_alpha: float = field(
        default=0.9, metadata=_help("odm: smoothing of the mean reward, R <- alpha R + (1 - alpha) loss; in [0, 1).")
    )
    tikmix_odm_exploration: float | None = field(
        default=None,
        metadata=_help(
            "odm: initial exploration rate eps_0 (at most 1/K); eps_t = min(eps_0, sqrt(ln K / (K t))). Default 1/K."
        ),
    )
    tikmix_doremi_eta: float = field(
        default=1.0, metadata=_help("doremi: step size of the exponentiated-gradient update on the excess loss.")
    )
    tikmix_doremi_smoothing: float = field(
        default=1e-3, metadata=_help("doremi: weight c of the uniform distribution mixed into each update; in [0, 1].")
    )
    tikmix_reference_model: str | None = field(
        default=None,
        metadata=_help("doremi: local folder of the reference model (AutoModelForCausalLM.from_pretrained)."),
    )
    tikmix_doge_eta: float = field(
        default=1.0, metadata=_help("doge: step size of the mirror-descent update on the normalised alignment scores.")
    )

    def __post_init__(self) -> None:
        validate_config(self)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TiKMiXConfig)}

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

    def smoothing(self) -> float:
        """``tikmix_smoothing``, or the objective's default (:data:`DEFAULT_SMOOTHING`) when it is unset."""
        if self.tikmix_smoothing is None:
            return DEFAULT_SMOOTHING[self.tikmix_objective]
        return float(self.tikmix_smoothing)

    def initial_weights(self) -> str | dict[str, float]:
        """``tikmix_initial_weights`` parsed: a keyword or a mapping."""
        value = self.tikmix_initial_weights
        return value if value in INITIAL_KEYWORDS else json.loads(value)


def _fail(name: str, value, fix: str) -> None:
    raise ValueError(f"{name}={value!r}: {fix}")


def _validate_replay(c) -> None:
    """The replay fields; whether the file is a good schedule is checked when training starts."""
    schedule = c.tikmix_schedule
    if c.tikmix_solver == "replay":
        if not (isinstance(schedule, (str, os.PathLike)) and str(schedule)):
            _fail("tikmix_schedule", schedule,
                  "tikmix_solver='replay' needs the path of a history.json or a schedule file (docs/schedules.md)")
        for name in ("tikmix_stage_steps", "tikmix_stage_tokens", "tikmix_stage_fractions", "tikmix_warmup_steps"):
            if getattr(c, name):
                _fail(name, getattr(c, name), "the schedule's positions are the stage boundaries of a replay; unset it")
    else:
        for name in ("tikmix_schedule", "tikmix_schedule_domains"):
            if getattr(c, name) is not None:
                _fail(name, getattr(c, name), f"only used with tikmix_solver='replay' (this run uses "
                                              f"{c.tikmix_solver!r}); unset it or switch the solver")
    parse_domain_map(c.tikmix_schedule_domains)


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


def _validate_window(c) -> None:
    """The training window's fields (docs/influence.md, Training window)."""
    source = c.tikmix_influence_source
    if source not in INFLUENCE_SOURCES:
        _fail("tikmix_influence_source", source, f"use one of {INFLUENCE_SOURCES}")
    steps = c.tikmix_window_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        _fail("tikmix_window_steps", steps, "must be a positive number of optimizer steps, e.g. 32")
    quota = c.tikmix_window_sequences
    if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 1):
        _fail("tikmix_window_sequences", quota, "must be a positive number of sequences per domain, or unset")
    obstacle = window_obstacle(c)
    if source == "training" and obstacle is not None:
        name, fix = obstacle
        _fail(name, getattr(c, name), fix)


def validate_config(c) -> None:
    """Every rule a :class:`TiKMiXConfig` must satisfy; the error names the field, the value and the fix."""
    if c.tikmix_solver not in SOLVERS:
        _fail("tikmix_solver", c.tikmix_solver, f"use one of {SOLVERS}")
    if c.tikmix_objective not in OBJECTIVES:
        _fail("tikmix_objective", c.tikmix_objective, f"use one of {OBJECTIVES}")
    for name in ("tikmix_trust_radius", "tikmix_trust_radius_min", "tikmix_trust_radius_max"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            _fail(name, value, "must be a finite number of nats > 0, e.g. 0.1")
    if not c.tikmix_trust_radius_min <= c.tikmix_trust_radius <= c.tikmix_trust_radius_max:
        _fail("tikmix_trust_radius", c.tikmix_trust_radius,
              f"must lie between tikmix_trust_radius_min={c.tikmix_trust_radius_min} and "
              f"tikmix_trust_radius_max={c.tikmix_trust_radius_max}")
    epochs = c.tikmix_max_epochs
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not math.isfinite(epochs) or epochs <= 0
    ):
        _fail("tikmix_max_epochs", epochs, "must be a number of epochs > 0, e.g. 4 (or unset for no cap)")
    if c.tikmix_preconditioner not in PRECONDITIONERS:
        _fail("tikmix_preconditioner", c.tikmix_preconditioner, f"use one of {PRECONDITIONERS}")
    _validate_replay(c)
    given = [n for n in ("tikmix_stage_steps", "tikmix_stage_tokens", "tikmix_stage_fractions") if getattr(c, n)]
    if len(given) > 1:
        _fail(given[1], getattr(c, given[1]), f"give only one of {given} to set the stage boundaries")
    for name in ("tikmix_stage_steps", "tikmix_stage_tokens", "tikmix_warmup_steps"):
        value = getattr(c, name)
        if value is not None and (not isinstance(value, int) or value <= 0):
            _fail(name, value, "must be a positive integer (or unset)")
    if c.tikmix_stage_fractions is not None:
        fr = list(c.tikmix_stage_fractions)
        if not fr or any(not (0.0 < f < 1.0) for f in fr) or fr != sorted(set(fr)):
            _fail("tikmix_stage_fractions", fr, "give increasing fractions strictly between 0 and 1, e.g. 0.5")
    for name in ("tikmix_probe_sequences", "tikmix_validation_sequences", "tikmix_surrogate_candidates"):
        value = getattr(c, name)
        if not isinstance(value, int) or value < 1:
            _fail(name, value, "must be a positive integer")
    if c.tikmix_surrogate_candidates < 10:  # solve_surrogate's own minimum (MIN_CANDIDATES)
        _fail("tikmix_surrogate_candidates", c.tikmix_surrogate_candidates,
              "the surrogate needs at least 10 candidates")
    n = c.tikmix_lookahead_sequences
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        _fail("tikmix_lookahead_sequences", n, "must be a positive integer (or unset for every validation sequence)")
    if c.tikmix_probe_batch_size is not None and c.tikmix_probe_batch_size < 1:
        _fail("tikmix_probe_batch_size", c.tikmix_probe_batch_size, "must be a positive integer (or unset)")
    if c.tikmix_damping is not None and not (
        isinstance(c.tikmix_damping, (int, float)) and math.isfinite(c.tikmix_damping) and c.tikmix_damping > 0
    ):
        _fail("tikmix_damping", c.tikmix_damping, "must be a finite number > 0 (or unset for 0.1 x mean diagonal)")
    for name in ("tikmix_alpha", "tikmix_beta", "tikmix_gamma", "tikmix_floor"):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            _fail(name, value, "must be a finite number >= 0")
    if c.tikmix_floor >= 1:
        _fail("tikmix_floor", c.tikmix_floor, "must be below 1 (it is a per-domain minimum weight)")
    if c.tikmix_max_change is not None and not (0 < c.tikmix_max_change <= 1):
        _fail("tikmix_max_change", c.tikmix_max_change, "must lie in (0, 1] (or unset)")
    if c.tikmix_lookahead_lr is not None and not (c.tikmix_lookahead_lr > 0 and math.isfinite(c.tikmix_lookahead_lr)):
        _fail("tikmix_lookahead_lr", c.tikmix_lookahead_lr, "must be a positive number (or unset)")
    if not (0 <= c.tikmix_entropy_warning <= 1):
        _fail("tikmix_entropy_warning", c.tikmix_entropy_warning, "must lie in [0, 1]")
    z = c.tikmix_shrink_z
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z < 0:
        _fail("tikmix_shrink_z", z, "must be a finite number >= 0 (standard errors; 0 = no shrinkage)")
    decay = c.tikmix_smoothing
    if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1):
        _fail("tikmix_smoothing", decay, "must lie in [0, 1) (0 = off; 1 would never forget a stage), or be unset "
              "for the objective's default")
    rse = c.tikmix_target_rse
    if rse is not None and (
        isinstance(rse, bool) or not isinstance(rse, (int, float)) or not math.isfinite(rse) or rse <= 0
    ):
        _fail("tikmix_target_rse", rse, "must be a finite number > 0, e.g. 0.2 (or unset for the full budget)")
    if rse is not None and c.tikmix_solver != "direct":
        _fail("tikmix_target_rse", rse,
              f"the adaptive probe budget applies to tikmix_solver='direct' only (TiKMiX-M keeps every domain's "
              f"gradient for its look-ahead); unset it for tikmix_solver={c.tikmix_solver!r}")
    if rse is not None and c.tikmix_preconditioner == "diag_fisher":
        _fail("tikmix_target_rse", rse,
              "the adaptive probe budget needs the preconditioner before the first probe batch, and diag_fisher "
              "is built from all of them; use tikmix_preconditioner='identity' or 'adam', or unset it")
    _validate_window(c)
    cap = c.tikmix_probe_max_sequences
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < c.tikmix_probe_sequences:
            _fail("tikmix_probe_max_sequences", cap,
                  f"must be an integer >= tikmix_probe_sequences ({c.tikmix_probe_sequences}), or unset")
        if rse is None:
            _fail("tikmix_probe_max_sequences", cap, "only applies with tikmix_target_rse set (the adaptive budget)")
    mb = c.tikmix_min_probe_batches
    if isinstance(mb, bool) or not isinstance(mb, int) or mb < 2:
        _fail("tikmix_min_probe_batches", mb, "must be an integer >= 2 (a standard error needs two batches)")
    timeout = c.tikmix_collective_timeout
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 1e9
    ):
        _fail("tikmix_collective_timeout", timeout, "must be a number of seconds in (0, 1e9], e.g. 600 (or unset for "
              "the process group's own timeout, TrainingArguments.ddp_timeout)")
    if not isinstance(c.tikmix_seed, int) or c.tikmix_seed < 0:
        _fail("tikmix_seed", c.tikmix_seed, "must be a non-negative integer")
    for name in ("tikmix_temperature", "tikmix_doremi_eta", "tikmix_doge_eta"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            _fail(name, value, "must be a finite number > 0")
    if isinstance(c.tikmix_odm_alpha, bool) or not isinstance(c.tikmix_odm_alpha, (int, float)) or not (
        0 <= c.tikmix_odm_alpha < 1
    ):
        _fail("tikmix_odm_alpha", c.tikmix_odm_alpha, "must lie in [0, 1) (1 would never update the reward)")
    explore = c.tikmix_odm_exploration
    if explore is not None and (
        isinstance(explore, bool) or not isinstance(explore, (int, float)) or not 0 < explore <= 1
    ):
        _fail("tikmix_odm_exploration", explore, "must lie in (0, 1/number of domains] (or unset for 1/K)")
    smoothing = c.tikmix_doremi_smoothing
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing <= 1:
        _fail("tikmix_doremi_smoothing", smoothing, "must lie in [0, 1]")
    ref = c.tikmix_reference_model
    # Whether the folder exists is checked when DoReMi loads it, so that a saved config can be rebuilt anywhere.
    if ref is not None and not (isinstance(ref, str) and ref):
        _fail(
            "tikmix_reference_model",
            ref,
            "must be the path of a local folder written by save_pretrained; or leave it unset and give the "
            "model object to DoReMiMixer(reference_model=...)",
        )
    share = c.tikmix_alignment_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        _fail("tikmix_alignment_share", share, "must lie in [0, 1], e.g. 0.5")
    n = c.tikmix_alignment_sequences
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        _fail("tikmix_alignment_sequences", n, "must be a positive integer, e.g. 64")
    value = c.tikmix_initial_weights
    if value not in INITIAL_KEYWORDS:
        try:
            parsed = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            parsed = None
        if not isinstance(parsed, dict) or not all(isinstance(v, (int, float)) for v in parsed.values()):
            _fail(
                "tikmix_initial_weights",
                value,
                'use keep, natural, uniform, aligned, or a JSON mapping such as \'{"code": 0.6, "web": 0.4}\'',
            )
