"""tikmix_hf: TiKMiX dynamic data mixing as a drop-in Hugging Face ``Trainer`` callback.

TiKMiX (arXiv 2508.17677) re-weights the domains of a pre-training mixture at stage
boundaries from their Group Influence on validation tasks. This package is layered so that
each piece can be used alone:

- :class:`DomainMixture` (``mixture/``): the data plane, a training stream over named
  domains whose sampling weights can change while training runs.
- :func:`group_influence` (``influence/``): the n_tasks x n_domains influence matrix of a
  model, trainer-agnostic.
- The solvers (``solvers/``), pure numpy/scipy/lightgbm: :func:`solve_trust_region`, the default
  TiKMiX-D objective, with its radius controller :class:`TrustRadius` and the average of ``S``
  over stages :class:`PrecisionSmoother`, all three stage after stage in :class:`TrustRegionDecider`
  for a custom training loop; :func:`solve_direct`, the paper's Eq. 10; and
  :func:`solve_surrogate` (TiKMiX-M).
- :class:`Mixer` and :func:`register` (``mixers/``): what happens at a stage boundary, and the
  extension point for a mixer of your own.
- :class:`TiKMiXCallback` / :class:`TiKMiXConfig` (``callback.py``, ``config.py``): the thin
  adapter that drives the above from inside ``transformers.Trainer``; :func:`load_history` reads
  the ``history.json`` it writes.

Heavy modules are imported on first use so that ``import tikmix_hf`` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "DomainMixture": "tikmix_hf.mixture",
    "interleave_datasets": "tikmix_hf.mixture",
    "group_influence": "tikmix_hf.influence",
    "InfluenceResult": "tikmix_hf.influence",
    "solve_trust_region": "tikmix_hf.solvers",
    "TrustRadius": "tikmix_hf.solvers",
    "PrecisionSmoother": "tikmix_hf.solvers",
    "TrustRegionDecider": "tikmix_hf.solvers",
    "solve_direct": "tikmix_hf.solvers",
    "solve_surrogate": "tikmix_hf.solvers",
    "SolverResult": "tikmix_hf.solvers",
    "Mixer": "tikmix_hf.mixers",
    "register": "tikmix_hf.mixers",
    "TiKMiXConfig": "tikmix_hf.config",
    "TiKMiXTrainingArguments": "tikmix_hf.training_args",
    "TiKMiXCallback": "tikmix_hf.callback",
    "load_history": "tikmix_hf.history",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tikmix_hf' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
