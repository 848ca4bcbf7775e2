"""Mixers: what happens at a stage boundary, behind one small interface the callback drives.

- :mod:`.base`: :class:`Mixer`, :class:`StageInputs`, :class:`Decision` and the registry
  (:data:`MIXERS`, :func:`register`, :func:`build_mixer`);
- :mod:`.tikmix`: TiKMiX-D (``direct``) and TiKMiX-M (``surrogate``), with their option groups in
  :mod:`.tikmix_options`;
- :mod:`.baselines`: ``static``, ``odm``, ``doremi`` and ``doge`` and their option groups, with
  :mod:`.probe_losses`;
- :mod:`.replay`: ``replay``, a schedule from a file or an earlier run's history, and its option group.

Each mixer declares the ``tikmix_*`` options it reads as an option group (:mod:`tikmix_hf.options`)
registered with it; :class:`~tikmix_hf.TiKMiXConfig` is composed of them.

Importing this package registers every built-in mixer; nothing here imports ``transformers``
(DoReMi loads its reference model with it only when asked to).
"""

# TiKMiX first, then the baselines: the registry lists the mixers in the order they register.
from .base import MIXERS, Decision, Mixer, StageInputs, StagePlan, build_mixer, register  # noqa: I001
from .tikmix import TiKMiXDirect, TiKMiXSurrogate, measure_influence, solver_kwargs
from .tikmix_options import TiKMiXDOptions, TiKMiXMOptions
from .baselines import (
    DoGEMixer, DoGEOptions, DoReMiMixer, DoReMiOptions, ODMMixer, ODMOptions, StaticMixer, StaticOptions,
)
from .probe_losses import ProbeLosses, probe_losses
from .replay import ReplayMixer, ReplayOptions

__all__ = [
    "MIXERS", "Decision", "DoGEMixer", "DoGEOptions", "DoReMiMixer", "DoReMiOptions", "Mixer", "ODMMixer",
    "ODMOptions", "ProbeLosses", "ReplayMixer", "ReplayOptions", "StageInputs", "StagePlan", "StaticMixer",
    "StaticOptions", "TiKMiXDOptions", "TiKMiXDirect", "TiKMiXMOptions", "TiKMiXSurrogate", "build_mixer",
    "measure_influence", "probe_losses", "register", "solver_kwargs",
]
