"""``interleave_datasets``: the ``datasets`` function's signature, a :class:`DomainMixture` as result.

An existing pipeline switches with one line::

    from tikmix_hf import interleave_datasets   # was: from datasets import interleave_datasets
    train = interleave_datasets([web, code, books], probabilities=[0.6, 0.3, 0.1], seed=42)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .mixture import DomainMixture

STOPPING_STRATEGIES = {"first_exhausted": "stop", "all_exhausted": "cycle"}


#: ``info.dataset_name`` of a dataset loaded from local files is its builder's name, not a name of its own.
FILE_BUILDERS = frozenset({"arrow", "audiofolder", "cache", "csv", "generator", "hdf5", "imagefolder", "json",
                           "pandas", "parquet", "spark", "sql", "text", "videofolder", "webdataset", "xml"})
#: Split names that say nothing about a domain.
PLAIN_SPLITS = frozenset({"train", "validation", "test", "all"})


def _names_of(datasets_: Sequence[Any], named) -> list[str] | None:
    names = [named(ds) for ds in datasets_]
    return names if all(names) and len(set(names)) == len(names) else None


def _dataset_name(ds: Any) -> str | None:
    info = getattr(ds, "info", None)
    name, config = getattr(info, "dataset_name", None), getattr(info, "config_name", None)
    if not name or name in FILE_BUILDERS:
        return None
    return f"{name}/{config}" if config and config != "default" else name


def _split_name(ds: Any) -> str | None:
    split = str(getattr(ds, "split", None) or "")
    return split if split and split not in PLAIN_SPLITS else None


def _default_names(datasets_: Sequence[Any]) -> list[str]:
    """The datasets' own names where each has a distinct one: ``info.dataset_name`` (with its config) of a
    hub dataset, else the split name ``load_dataset(..., data_files={"code": ...})`` gives; otherwise
    ``domain_0, domain_1, ...``, with a warning (``history.json`` and the logs will show those)."""
    names = _names_of(datasets_, _dataset_name) or _names_of(datasets_, _split_name)
    if names is not None:
        return names
    names = [f"domain_{i}" for i in range(len(datasets_))]
    warnings.warn(
        f"interleave_datasets: the datasets carry no distinct names of their own (datasets read from local files "
        f"are all named after their builder), so the domains are called {', '.join(names)} in history.json and the "
        "logs; pass names=[...] or a mapping {name: dataset}",
        stacklevel=3,
    )
    return names


def interleave_datasets(
    datasets: Sequence[Any],
    probabilities: Sequence[float] | None = None,
    seed: int | None = None,
    info: Any = None,
    split: Any = None,
    stopping_strategy: str = "first_exhausted",
    *,
    names: Sequence[str] | None = None,
    **mixture_kwargs: Any,
) -> DomainMixture:
    """Mix ``datasets`` like ``datasets.interleave_datasets``, into a :class:`DomainMixture` whose
    weights TiKMiX can change while training runs.

    Args:
        datasets: the domains, ``datasets.Dataset`` or ``IterableDataset`` (mixing both is allowed here); or a
            mapping ``{name: dataset}`` (a ``DatasetDict`` too), whose keys name the domains.
        probabilities: sampling probability per dataset (normalised); ``None`` samples them uniformly.
        seed: the mixture's seed (``None``: 0, so that every rank draws the same stream).
        info, split: accepted for signature compatibility and ignored: the mixture yields the source
            examples unchanged.
        stopping_strategy: ``"first_exhausted"`` maps to ``exhausted="stop"`` (the stream ends at the first
            sample that would need a new pass of any dataset), ``"all_exhausted"`` to ``exhausted="cycle"``.
        names: the domain names; by default each dataset's ``info.dataset_name`` (plus its config) where it
            has one of its own, else its split name where that is not ``train``/``validation``/``test``, else
            ``domain_0, domain_1, ...`` with a warning.
        **mixture_kwargs: passed to :class:`DomainMixture` (``shuffle_buffer``, ``num_samples``, ...).

    Where the semantics differ from ``datasets.interleave_datasets``:

    - ``probabilities=None`` draws each sample's dataset at random with equal weights; ``datasets``
      alternates them in a fixed round-robin order.
    - ``all_exhausted`` never ends: the mixture cycles every dataset (a new shuffle per pass) until the
      Trainer's ``max_steps``, or for ``num_samples`` samples an epoch. ``datasets`` stops once every
      dataset has been seen in full.
    - Map-style datasets are shuffled (``shuffle=False`` keeps their order); streamed ones are shuffled in
      blocks of ``shuffle_buffer`` rows.
    - The order of examples differs from the ``datasets`` function even for the same seed; the
      probabilities are the same.
    """
    if isinstance(datasets, Mapping) and datasets and names is None:
        names, datasets = [str(k) for k in datasets], list(datasets.values())
    if not isinstance(datasets, Sequence) or isinstance(datasets, (str, bytes)) or not datasets:
        raise ValueError(f"datasets must be a non-empty list of datasets (or a mapping name -> dataset), got "
                         f"{datasets!r:.80}")
    if stopping_strategy not in STOPPING_STRATEGIES:
        raise ValueError(
            f"stopping_strategy={stopping_strategy!r} is not one of {sorted(STOPPING_STRATEGIES)}"
        )
    if names is None:
        names = _default_names(datasets)
    names = list(names)
    if len(names) != len(datasets) or len(set(names)) != len(names):
        raise ValueError(
            f"names={names!r} must give {len(datasets)} distinct names, one per dataset"
        )
    if probabilities is None:
        weights: Any = "uniform"
    else:
        probabilities = list(probabilities)
        if len(probabilities) != len(datasets):
            raise ValueError(
                f"probabilities has {len(probabilities)} entries for {len(datasets)} datasets; give one per dataset"
            )
        for i, p in enumerate(probabilities):
            if not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
                raise ValueError(f"probabilities[{i}] = {p!r} must be a finite number >= 0")
        if sum(probabilities) <= 0:
            raise ValueError(f"probabilities are all zero ({probabilities}); at least one must be positive")
        weights = dict(zip(names, map(float, probabilities)))
    if seed is not None and (not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed={seed!r} must be a non-negative int or None")
    return DomainMixture(
        dict(zip(names, datasets)),
        weights=weights,
        seed=0 if seed is None else seed,
        exhausted=STOPPING_STRATEGIES[stopping_strategy],
        **mixture_kwargs,
    )
