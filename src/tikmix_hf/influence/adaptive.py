"""Group Influence with an adaptive probe budget: each domain drawn until its column of ``S`` is precise."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from .._distributed import all_reduce, rank_and_world, unwrap
from .._io import jsonable
from .._loss import labelled_targets, measurement_mode
from .checks import Batches, ParamFilter, batch_sets, check_batch, check_finite_scores
from .engine import InfluencePass
from .layout import ParameterLayout
from .preconditioners import check_preconditioner_name
from .result import InfluenceResult
from .sharding import local_piece, pad_batch, sharding_of
from .stats import BatchStats


def adaptive_group_influence(
    model: torch.nn.Module,
    domain_batch_source: Mapping[str, Callable[[int], Mapping | None] | Sequence[Mapping]],
    validation_batches: Batches,
    *,
    target_rse: float,
    max_batches: int,
    min_batches: int = 2,
    max_tokens: int | None = None,
    preconditioner: str = "identity",
    optimizer: torch.optim.Optimizer | None = None,
    param_filter: ParamFilter = None,
    show_progress: bool = False,
    buffer_dtype: torch.dtype | None = None,
) -> InfluenceResult:
    """Group Influence with an adaptive probe budget: draw a domain's batches until ``S_j`` is precise.

    For each domain ``j`` probe micro-batches ``k = 0, 1, 2, ...`` are taken from
    ``domain_batch_source[j]`` (a callable ``k -> batch``, returning ``None`` when exhausted, or a
    list of batches) and differentiated one by one; after each batch the column's relative standard
    error ``rse_j = ||SE[:, j]||_2 / ||S[:, j]||_2`` (ratio-estimator ``SE``, ``docs/uncertainty.md``)
    is checked. Drawing stops at the first of: ``rse_j <= target_rse`` with at least ``min_batches``
    batches (``"target"``); ``max_batches`` batches (``"max_batches"``); ``max_tokens`` labelled
    tokens (``"max_tokens"``); the source exhausted (``"exhausted"``).

    ``S`` means the same as in :func:`group_influence` (mean token loss over every drawn probe token of
    the domain, so identical to :func:`group_influence` on the drawn batches up to rounding).
    ``result.adaptive`` reports per domain ``batches``, ``tokens``, ``rse`` and ``stopped``, plus the
    totals (the cost: one forward+backward per drawn batch, as in :func:`group_influence`).

    Only ``identity`` and ``adam`` preconditioners (``diag_fisher`` needs every probe batch before it
    can precondition) and no projection. Under data parallelism each round draws ``world`` batches,
    rank ``r`` differentiating batch ``k + r``; the sums are all-reduced every round so that every rank
    takes the same stopping decision and returns the same result.
    """
    started = time.perf_counter()
    check_preconditioner_name(preconditioner)
    if preconditioner == "diag_fisher":
        raise ValueError(
            "adaptive_group_influence supports preconditioner 'identity' or 'adam': diag_fisher needs the "
            "Fisher diagonal of all probe batches before any can be scored"
        )
    target_rse = float(target_rse)
    if not math.isfinite(target_rse) or target_rse <= 0:
        raise ValueError(f"target_rse must be a finite number > 0, got {target_rse!r}")
    if not isinstance(min_batches, int) or min_batches < 2:
        raise ValueError(f"min_batches must be an integer >= 2 (a standard error needs two), got {min_batches!r}")
    if not isinstance(max_batches, int) or max_batches < min_batches:
        raise ValueError(f"max_batches must be an integer >= min_batches={min_batches}, got {max_batches!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    if not isinstance(domain_batch_source, Mapping) or not domain_batch_source:
        raise TypeError("domain_batch_source must be a non-empty mapping {domain name: callable k -> batch, or list}")
    module = unwrap(model, sharded=True)
    rank, world = rank_and_world()
    sharding = sharding_of(module, world)
    layout = ParameterLayout.select(module, param_filter, buffer_dtype, None if sharding is None else local_piece)
    tasks = batch_sets(validation_batches, "validation_batches", "task", layout.device)
    sources = {str(name): _as_source(src) for name, src in domain_batch_source.items()}
    domain_names, task_names = list(sources), list(tasks)
    pass_ = InfluencePass(module, layout, rank, world, show_progress, sharding)
    stats = BatchStats(len(tasks), len(sources), layout.device)
    loss_sums = torch.zeros(len(sources), dtype=torch.float64, device=layout.device)
    report: dict = {"target_rse": target_rse, "min_batches": min_batches, "max_batches": max_batches,
                    "max_tokens": max_tokens, "domains": {}}
    n_micro = sum(pass_.local_count(t) for t in tasks.values()) + max_batches * len(sources)
    grads_aside = contextlib.nullcontext() if sharding is None else sharding.own_gradients(pass_.ledger)
    first_task_batch = next(iter(tasks.values())).batches[0]
    with pass_.measure(), measurement_mode(module), pass_.progress(n_micro), grads_aside:
        precond, fallback = pass_.preconditioner(preconditioner, optimizer, None, None)
        task_side = pass_.validation(tasks, precond, None)
        for j, name in enumerate(domain_names):
            drawn, stopped = 0, None
            while stopped is None:
                k = drawn + rank
                batch = sources[name](k) if k < max_batches else None
                available = torch.zeros(1, dtype=torch.float64, device=layout.device)
                round_ = BatchStats(len(tasks), len(sources), layout.device)
                if sharding is not None:
                    # FSDP: every rank differentiates once per round; the round's gradient sums the
                    # ranks' batches, so the round is the unit of the statistics (one complete column).
                    if batch is not None:
                        check_batch(batch, f"domain {name!r} batch {k}", layout.device)
                        available += 1
                    step_batch = batch if batch is not None else pad_batch(first_task_batch)
                    tokens = labelled_targets(step_batch["labels"]).double().reshape(1)
                    with torch.enable_grad():
                        loss = pass_.summed_loss(step_batch)
                        grads = sharding.gradients(loss, layout.params, float(world))
                    column = pass_.dots(task_side, grads).double()
                    del grads
                    loss_sums[j] += loss.detach().double()
                    combined = all_reduce(torch.cat([column, tokens, available]), world)
                    round_tokens, available = int(round(float(combined[-2]))), combined[-1:]
                    if round_tokens > 0:
                        stats.add(j, drawn // world, round_tokens, combined[:-2])
                    if pass_.bar is not None:
                        pass_.bar.update(1)
                    drawn += min(world, int(available.item()))
                elif batch is not None:
                    check_batch(batch, f"domain {name!r} batch {k}", layout.device)
                    labelled = int(labelled_targets(batch["labels"]))
                    available += 1
                    if labelled > 0:
                        with torch.enable_grad():
                            loss = pass_.summed_loss(batch)
                            grads = torch.autograd.grad(loss, layout.params, allow_unused=True)
                        column = pass_.dots(task_side, grads)
                        del grads
                        round_.add(j, k, labelled, column)
                        loss_sums[j] += loss.detach().double()
                    if pass_.bar is not None:
                        pass_.bar.update(1)
                if sharding is None:
                    # Every rank must see the same sums to take the same decision: reduce this round's.
                    round_.reduce(world)
                    all_reduce(available, world)
                    stats.merge(round_)
                    drawn += min(world, int(available.item()))
                column_rse = stats.column_rse(j)
                batches, tokens_j = stats.batches(j), stats.tokens(j)
                if batches >= min_batches and column_rse <= target_rse:
                    stopped = "target"
                elif drawn >= max_batches or batches >= max_batches:
                    stopped = "max_batches"
                elif max_tokens is not None and tokens_j >= max_tokens:
                    stopped = "max_tokens"
                elif int(available.item()) < world:
                    stopped = "exhausted"
            if stats.tokens(j) == 0:
                raise ValueError(f"domain {name!r}: no labelled target token in the batches drawn")
            report["domains"][name] = {"batches": stats.batches(j), "tokens": stats.tokens(j),
                                       "rse": jsonable(stats.column_rse(j)), "stopped": stopped}
        del task_side
    all_reduce(loss_sums, world)
    report["total_batches"] = sum(d["batches"] for d in report["domains"].values())
    report["total_tokens"] = sum(d["tokens"] for d in report["domains"].values())
    scores = stats.scores()
    check_finite_scores(scores, task_names, domain_names)
    stderr, split_half, note = stats.finish(task_names, domain_names)
    domain_tokens = {name: stats.tokens(j) for j, name in enumerate(domain_names)}
    domain_losses = {name: float(loss_sums[j]) / domain_tokens[name] for j, name in enumerate(domain_names)}
    return pass_.result(
        started=started, tasks=tasks, scores=scores, task_names=task_names, domain_names=domain_names,
        preconditioner=precond.name, requested_preconditioner=preconditioner, preconditioner_fallback=fallback,
        damping=None, projection_dim=None, seed=0, domain_tokens=domain_tokens, domain_losses=domain_losses,
        stderr=stderr, split_half=split_half, probe_batches=stats.batch_counts(domain_names),
        uncertainty_note=note, adaptive=report,
    )


def _as_source(source):
    """A callable ``k -> batch or None`` from a callable or a sequence of batches."""
    if callable(source):
        return source
    if isinstance(source, Mapping) or torch.is_tensor(source):
        raise TypeError("a domain's source must be a callable k -> batch (None when exhausted) or a list of batches")
    items = list(source)
    return lambda k: items[k] if k < len(items) else None
