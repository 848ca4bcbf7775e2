"""A seeded random projection of gradients that is regenerated, never stored (``projection_dim``)."""

from __future__ import annotations

import math

import numpy as np
import torch

# Rows of a projection block are generated together; bounding rows * k keeps each block at a few MB.
_PROJECTION_BLOCK_ELEMENTS = 1 << 20


class Projector:
    """``x -> R^T x / sqrt(k)`` with ``R`` a ``P x k`` Rademacher matrix regenerated blockwise from the seed.

    Block ``(parameter t, block b)`` comes from its own generator seeded by ``(seed, t, b)``, so the
    same ``R`` is produced for every call, on every rank, without ever being stored.
    ``E[<R^T a, R^T b>] / k = <a, b>``: the projected inner products are unbiased.
    """

    def __init__(self, layout, k, seed, ledger):
        self.layout, self.k, self.seed, self.ledger = layout, k, int(seed), ledger
        self.block_rows = max(1, _PROJECTION_BLOCK_ELEMENTS // k)

    def _block(self, index, block, rows):
        state = np.random.SeedSequence([self.seed, index, block]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator(device=self.layout.device)
        generator.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
        shape, device, dtype = (rows, self.k), self.layout.device, self.layout.compute_dtype
        signs = torch.randint(0, 2, shape, generator=generator, device=device, dtype=dtype)
        return signs.mul_(2).sub_(1)

    def project(self, rows) -> torch.Tensor:
        """``(r, P)`` -> ``(r, k)`` in ``compute_dtype`` on the parameters' device."""
        layout = self.layout
        out = torch.zeros((rows.shape[0], self.k), dtype=layout.compute_dtype, device=layout.device)
        block_rows = min(self.block_rows, layout.largest)
        converts = rows.dtype != layout.compute_dtype or rows.device != layout.device
        nbytes = (block_rows * self.k + converts * rows.shape[0] * block_rows) * layout.compute_dtype.itemsize
        with self.ledger.transient(nbytes):
            for index, (start, stop) in enumerate(layout.spans):
                for block, first in enumerate(range(start, stop, self.block_rows)):
                    last = min(first + self.block_rows, stop)
                    chunk = rows[:, first:last].to(device=layout.device, dtype=layout.compute_dtype)
                    out.addmm_(chunk, self._block(index, block, last - first))
        return out.div_(math.sqrt(self.k))
