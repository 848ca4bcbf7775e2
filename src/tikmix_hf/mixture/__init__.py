"""The data plane: :class:`DomainMixture`, a training stream over named domains whose weights can
change while training runs, and :func:`interleave_datasets`, its ``datasets``-style front door.

- ``bijection.py``: the keyed permutation that shuffles map-style domains without storing one.
- ``sources.py``: map-style and sequentially read domains.
- ``sharded.py``: streamed domains read by shard, one share per (rank, DataLoader worker) reader.
- ``swaps.py``: the weight swaps (which weights apply from which sample index), in shared memory, and the
  validation of weights.
- ``choices.py``: the domain each sample index draws, the draws of each domain and reader by an index, and the
  reader layout (DataLoader workers x ranks, and their batch).
- ``control.py``: the control words the mixture shares with its DataLoader workers (how the stream is read,
  where it starts and ends), in shared memory.
- ``checkpoints.py``: where the readers of sharded domains resume: recorded and loaded block checkpoints.
- ``mixture.py``: the mixture itself (iteration, DataLoader binding, swaps, saved state).
- ``interleave.py``: ``interleave_datasets``.
"""

from .interleave import interleave_datasets
from .mixture import EXHAUSTED_POLICIES, STATE_FORMAT, DomainMixture

__all__ = ["EXHAUSTED_POLICIES", "STATE_FORMAT", "DomainMixture", "interleave_datasets"]
