"""Mixers: what happens at a stage boundary, behind one small interface the callback drives.

- :mod:`.base`: :class:`Mixer`, :class:`StageInputs`, :class:`Decision` and the registry
  (:data:`MIXERS`, :func:`register`, :func:`build_mixer`);
- :mod:`.tikmix`: TiKMiX-D (``direct``) and TiKMiX-M (``surrogate``);
- :mod:`.baselines`: ``static``, ``odm``, ``doremi`` and ``doge``, with :mod:`.probe_losses`;
- :mod:`.replay`: ``replay``, a schedule from a file or an earlier run's history.

Importing this package registers every built-in mixer; nothing here imports ``transformers``
(DoReMi loads its reference model with it only when asked to).
"""

# TiKMiX first, then the baselines: the registry lists the mixers in the order they register.
from .base import MIXERS, Decision, Mixer, StageInputs, StagePlan, build_mixer, register  # noqa: I001
from .tikmix import TiKMiXDirect, TiKMiXSurrogate, measure_influence, solver_kwargs
from .baselines import DoGEMixer, DoReMiMixer, ODMMixer, StaticMixer
from .probe_losses import ProbeLosses, probe_losses
from .replay import ReplayMixer

__all__ = [
    "MIXERS", "Decision", "DoGEMixer", "DoReMiMixer", "Mixer", "ODMMixer", "ProbeLosses", "ReplayMixer",
    "StageInputs", "StagePlan", "StaticMixer", "TiKMiXDirect", "TiKMiXSurrogate", "build_mixer", "measure_influence",
    "probe_losses", "register", "solver_kwargs",
]
