"""The mixer interface and its registry: what happens at a stage boundary, behind one call.

A mixer takes a :class:`StageInputs` (the prior weights, probe and validation batches, the model
and optimizer) and returns a :class:`Decision` (the next weights and what happened). It knows
nothing about the Trainer, so a custom training loop can drive one too. Mixers with memory across
stages keep it in :meth:`Mixer.state_dict` (JSON), which the callback stores in every checkpoint.

Every mixer registers its name with :func:`register`, and with it the option group it reads its own
knobs from (a dataclass of ``tikmix_*`` fields, :mod:`tikmix_hf.options`); ``--tikmix_solver``
accepts exactly the registered names, and :func:`build_mixer` builds the one a config names, with
its options. What every measuring mixer shares (the probes, the preconditioner, the seed) is the
callback's and reaches the mixer in :attr:`StageInputs.config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ..options import OptionGroup

__all__ = ["MIXERS", "Decision", "Mixer", "StageInputs", "StagePlan", "build_mixer", "register"]


@dataclasses.dataclass
class StageInputs:
    """Everything a mixer may use at one stage boundary."""

    stage: int  # 0 for the first decision
    step: int
    domains: list[str]
    prior: np.ndarray  # the weights in effect, in the order of ``domains``
    model: Any
    optimizer: Any
    domain_batches: dict[str, list]  # probe batches per domain (this stage's draw)
    validation_batches: dict[str, list]
    # A TiKMiXConfig, read by attribute (mixers import no config): the measurement options every measuring
    # mixer shares; a mixer's own knobs are in its options (Mixer.options), read from this config by default.
    config: Any
    show_progress: bool = False
    learning_rate: float | None = None
    # The adaptive budget's draw beyond ``domain_batches`` (tikmix_probe_max_sequences): per domain a
    # callable ``k -> batch k`` (``None`` past the end) whose first batches are ``domain_batches``.
    domain_sources: dict[str, Any] | None = None
    max_probe_batches: int | None = None
    # What the scale-aware objective needs (docs/method.md): the coming stage's length in optimizer
    # steps, the training samples still to come, and each domain's size in examples (None: unknown).
    stage_steps: int | None = None
    remaining_samples: int | None = None
    domain_sizes: dict[str, int | None] | None = None
    tokens_seen: int | None = None  # training tokens so far, all ranks together, when they are counted
    # tikmix_influence_source="training": the closed TrainingWindow of the steps before this boundary, whose
    # result() takes ``domain_batches`` as the top-up probes of the domains it saw too little of.
    window: Any = None


@dataclasses.dataclass
class StagePlan:
    """When a mixer that fixes its own stage boundaries decides, and the weights it starts from.

    A mixer returns one from :meth:`Mixer.plan`; the callback then takes its boundaries from here
    instead of ``tikmix_stage_*``. Every value is computed from the run's length and the mixer's
    own inputs, so it is the same on every rank and on resume.
    """

    steps: list[int] = dataclasses.field(default_factory=list)  # decide at the end of these optimizer steps
    # decide at the end of the first step by which this many training tokens (all ranks) have been seen
    tokens: list[int] = dataclasses.field(default_factory=list)
    initial: dict[str, float] | None = None  # the weights from sample 0 (None: tikmix_initial_weights)


@dataclasses.dataclass
class Decision:
    """A mixer's answer: the next weights and an account of how they came about."""

    weights: np.ndarray
    status: str  # converged | restarted | fallback | skipped | replayed
    message: str
    influence: Any = None  # the InfluenceResult, when the mixer measured one
    solver_result: Any = None  # the SolverResult, when a solver ran
    seconds_measure: float = 0.0
    seconds_solve: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)  # JSON-ready, mixer-specific
    # Scalar diagnostics to log as tikmix/<name> (a number) or tikmix/<name>/<key> (a {key: number} mapping)
    metrics: dict = dataclasses.field(default_factory=dict)


class Mixer:
    """Base class: subclasses implement :meth:`decide`; stateful ones also the two state methods.

    A mixer with an option group (``register(name, options=Group)``) reads its own knobs from
    :attr:`options`: the group instance it was built with (``Mixer(options=Group(...))``, or
    :func:`build_mixer`), or else, for a mixer built without one, the group read from the config it
    is handed (:meth:`configure`, which a mixer calls first wherever it is handed a config).
    """

    name = "mixer"
    #: False for mixers that decide without the model or data: the callback draws no probe or
    #: validation batches for them at a stage boundary.
    measures = True
    #: The option group this mixer reads its own knobs from (set by :func:`register`); ``None``: it has none.
    options_group: type[OptionGroup] | None = None
    #: The options in effect (an ``options_group`` instance); ``None`` until given or configured.
    options: Any = None
    _options_given = False

    def __init__(self, options: Any = None) -> None:
        if options is not None:
            group = type(self).options_group
            if group is None or not isinstance(options, group):
                wanted = "no options" if group is None else f"a {group.__name__}"
                raise ValueError(f"options={options!r}: the {type(self).__name__} mixer takes {wanted}")
            self.options, self._options_given = options, True

    def configure(self, config: Any) -> Any:
        """The options this mixer decides with: those it was built with, else its group read from ``config``."""
        if not self._options_given and self.options_group is not None:
            self.options = self.options_group.from_config(config)
        return self.options

    def decide(self, inputs: StageInputs) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} must implement decide(inputs)")

    def check_ready(self, config: Any) -> None:
        """Raise a clear error now, before training starts, for anything :meth:`decide` would fail on."""

    def plan(self, config: Any, max_steps: int, domains: list[str]) -> StagePlan | None:
        """The stage boundaries this mixer fixes itself for a run of ``max_steps``, or ``None`` to follow
        the config's ``tikmix_stage_*`` schedule. Called before training starts (after :meth:`check_ready`),
        so that anything wrong with the plan fails then."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)}")


#: name -> mixer class, in the order the names are listed to users.
MIXERS: dict[str, type[Mixer]] = {}
_M = TypeVar("_M", bound=Mixer)


def register(name: str, options: type[OptionGroup] | None = None) -> Callable[[type[_M]], type[_M]]:
    """Class decorator: make a :class:`Mixer` subclass available as ``--tikmix_solver <name>``.

    ``options``: the option group (an :class:`~tikmix_hf.options.OptionGroup` dataclass of ``tikmix_*``
    fields with their defaults, help and checks) the mixer reads its own knobs from; without it the
    mixer keeps the group it inherits, if any. :func:`build_mixer` passes an instance as ``options=``
    to its constructor. A config that lacks the group's fields gets their defaults; to make them flags
    too, add the group to a subclass of the config (``class MyConfig(TiKMiXConfig, MyOptions)``).

    Example::

        @dataclass
        class BanditOptions(OptionGroup):
            tikmix_bandit_eta: Annotated[float, number(above=0)] = option(0.5, "bandit: step size.")

        @register("bandit", options=BanditOptions)
        class BanditMixer(Mixer):
            def decide(self, inputs):
                eta = self.configure(inputs.config).tikmix_bandit_eta
                ...
    """
    if options is not None and not (isinstance(options, type) and issubclass(options, OptionGroup)):
        raise TypeError(f"register({name!r}, options=...) takes an OptionGroup subclass, got {options!r}")

    def add(cls: type[_M]) -> type[_M]:
        if not (isinstance(cls, type) and issubclass(cls, Mixer)):
            raise TypeError(f"register({name!r}) decorates Mixer subclasses, got {cls!r}")
        if name in MIXERS and MIXERS[name] is not cls:
            raise ValueError(
                f"a mixer named {name!r} is already registered ({MIXERS[name].__name__}); pick another name"
            )
        cls.name = name
        if options is not None:
            cls.options_group = options
        MIXERS[name] = cls
        return cls

    return add


def build_mixer(config: Any, options: Any = None) -> Mixer:
    """The mixer named by ``config.tikmix_solver``, with its own option group: ``options`` if given, else the
    group read from ``config``'s fields."""
    try:
        cls = MIXERS[config.tikmix_solver]
    except KeyError:
        raise ValueError(f"tikmix_solver={config.tikmix_solver!r}: use one of {list(MIXERS)}") from None
    if cls.options_group is None:
        return cls(options=options) if options is not None else cls()
    return cls(options=cls.options_group.from_config(config) if options is None else options)
