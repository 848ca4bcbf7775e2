"""The data plane: :class:`DomainMixture`, a training stream over named domains whose weights can
change while training runs, and :func:`interleave_datasets`, its ``datasets``-style front door.

- ``bijection.py``: the keyed permutation that shuffles map-style domains without storing one.
- ``sources.py``: map-style and sequentially read domains.
- ``sharded.py``: streamed domains read by shard, one share per (rank, DataLoader worker) reader.
- ``mixture.py``: the mixture itself (schedule, stream, swaps, checkpoints).
- ``interleave.py``: ``interleave_datasets``.
"""

from .interleave import interleave_datasets
from .mixture import EXHAUSTED_POLICIES, STATE_FORMAT, DomainMixture

__all__ = ["EXHAUSTED_POLICIES", "STATE_FORMAT", "DomainMixture", "interleave_datasets"]
