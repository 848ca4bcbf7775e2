"""Per-domain token losses on probe batches, forward passes only: what the loss-driven baselines measure."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping

import numpy as np
import torch

from .._distributed import all_reduce, rank_and_world, unwrap
from .._loss import forward_extras, measurement_mode, token_losses

__all__ = ["ProbeLosses", "probe_losses"]


@dataclasses.dataclass
class ProbeLosses:
    """Mean next-token losses per domain on the stage's probe batches (all ranks together).

    ``losses``: the model's; with a reference model also ``reference`` (its losses on the same
    tokens) and ``excess``, DoReMi's per-token clipped excess ``mean_tokens max(l - l_ref, 0)``.
    """

    domains: list[str]
    losses: np.ndarray
    tokens: np.ndarray
    reference: np.ndarray | None = None
    excess: np.ndarray | None = None
    seconds: float = 0.0


def probe_losses(model: torch.nn.Module, domain_batches: Mapping[str, list],
                 reference_model: torch.nn.Module | None = None, *,
                 show_progress: bool = False) -> ProbeLosses:
    """Per-domain mean token loss of ``model`` (and of ``reference_model``) on probe batches.

    Forward passes only, under ``torch.no_grad()`` with dropout off. Under data parallelism rank
    ``r`` takes batches ``k % world == r`` and the sums are all-reduced, so every rank returns the
    same numbers. Raises ``FloatingPointError`` on a non-finite loss and ``ValueError`` for a
    domain with no labelled target token.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    module = unwrap(model)
    reference = None if reference_model is None else unwrap(reference_model)
    rank, world = rank_and_world()
    device = next(module.parameters()).device
    names = list(domain_batches)
    extras = forward_extras(module)
    reference_extras = None if reference is None else forward_extras(reference)
    sums = torch.zeros(4, len(names), dtype=torch.float64, device=device)  # tokens, loss, ref loss, excess
    local = {name: list(domain_batches[name])[rank::world] for name in names}
    bar = tqdm(total=sum(len(b) for b in local.values()), desc="probe losses", unit="batch",
               disable=not show_progress or rank != 0)
    with torch.no_grad(), measurement_mode(module, reference), bar:
        for j, name in enumerate(names):
            for batch in local[name]:
                losses = token_losses(module, batch, extras)
                sums[0, j] += losses.numel()
                sums[1, j] += losses.sum()
                if reference is not None:
                    ref = token_losses(reference, batch, reference_extras)
                    sums[2, j] += ref.sum()
                    sums[3, j] += (losses - ref).clamp(min=0).sum()
                bar.update(1)
    all_reduce(sums, world)
    table = sums.cpu().numpy()
    tokens = table[0]
    empty = [name for name, n in zip(names, tokens) if n == 0]
    if empty:
        raise ValueError(
            f"domains {empty} have no labelled target token in their probe batches; their loss is undefined"
        )
    means = table[1:] / tokens
    if not np.all(np.isfinite(means[: 3 if reference is not None else 1])):
        bad = [name for name, v in zip(names, means[0]) if not math.isfinite(v)]
        raise FloatingPointError(f"non-finite probe loss for domains {bad or names}; check the model's numerics")
    return ProbeLosses(
        domains=names, losses=means[0], tokens=tokens.astype(np.int64),
        reference=means[1] if reference is not None else None,
        excess=means[2] if reference is not None else None,
        seconds=time.perf_counter() - started,
    )
