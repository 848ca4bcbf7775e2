"""Group Influence of data domains on validation tasks (paper Eq. 8): the streaming measurement."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from .._distributed import rank_and_world, unwrap
from .._loss import measurement_mode
from .checks import (
    Batches,
    ParamFilter,
    batch_sets,
    check_damping,
    check_finite_scores,
    check_keep,
    check_projection_dim,
    finite_losses,
)
from .engine import InfluencePass
from .layout import ParameterLayout
from .preconditioners import check_preconditioner_name
from .projection import Projector
from .result import InfluenceResult
from .sharding import local_piece, sharding_of
from .stats import BatchStats


def group_influence(
    model: torch.nn.Module,
    domain_batches: Batches,
    validation_batches: Batches,
    *,
    preconditioner: str = "identity",
    optimizer: torch.optim.Optimizer | None = None,
    damping: float | None = None,
    param_filter: ParamFilter = None,
    projection_dim: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
    keep_domain_gradients: bool | str = False,
    buffer_dtype: torch.dtype | None = None,
) -> InfluenceResult:
    """Group Influence matrix ``S`` (n_tasks x n_domains) of paper Eq. 8 at the model's current parameters.

    ``S_ij = grad f_i^T P^{-1} g_j``, where ``f_i`` is the mean token cross-entropy of task ``i`` over
    all its labelled tokens and ``g_j`` the gradient of the mean token cross-entropy over all probe
    tokens of domain ``j`` (labels ``-100`` ignored, next-token shift as in Hugging Face causal LMs).
    Means are over the whole domain or task, not means of batch means.

    Args:
        model: a causal LM returning ``logits`` (or a tuple whose first item is the logits). A
            ``DistributedDataParallel`` wrapper is unwrapped so that probe backward passes do not
            all-reduce gradients. A model sharded with FSDP2 (``fully_shard``) or FSDP1
            (``use_orig_params=True``) is measured on its local shards (see "Sharded" below).
            DeepSpeed engines are refused (``ValueError``).
        domain_batches: ``{domain name: list of batches}``; a batch is a dict of tensors on the
            model's device with ``labels`` and whatever the model's forward takes (``input_ids``,
            ``attention_mask``, ...).
        validation_batches: ``{task name: list of batches}``, same format.
        preconditioner: ``"identity"`` (``P = I``), ``"adam"`` (``1/(sqrt(v_hat)+eps)`` from
            ``optimizer``; falls back to identity with a :class:`PreconditionerFallbackWarning` when the
            optimizer has no usable ``exp_avg_sq``) or ``"diag_fisher"`` (``1/(F + damping)``, ``F`` the
            mean squared probe micro-batch gradient). ``result.preconditioner`` says which was used.
        optimizer: the training optimizer (torch or accelerate's ``AcceleratedOptimizer``), read only.
        damping: ``diag_fisher`` only (ignored otherwise: identity needs none, adam uses the optimizer's
            ``eps``); ``None`` means ``0.1 * mean(F)``. The value used is ``result.damping``.
        param_filter: restricts the parameters whose gradients count: a callable
            ``(name, param) -> bool`` or a list of name substrings (any match keeps the parameter).
        projection_dim: ``k`` for a seeded random Rademacher projection of both gradient sides,
            scaled by ``1/sqrt(k)`` so that inner products are unbiased (relative error about
            ``sqrt(2/k)`` of ``|grad f_i| |g_j|``). Blocks are regenerated from ``seed``; no ``P x k``
            matrix is stored.
        seed: seed of the projection.
        show_progress: a tqdm bar over micro-batches (rank 0 only).
        keep_domain_gradients: also return ``result.domain_gradients`` (the ``m`` preconditioned domain
            gradients, needed by :func:`lookahead_gain`). Costs ``m`` gradient-sized buffers (in
            ``buffer_dtype``) on the parameters' device, or in host memory with ``"cpu"``; under data
            parallelism they are all-reduced (``m x P`` values of traffic). The scores are then
            computed from them, which also lets ``diag_fisher`` finish in one probe pass.
        buffer_dtype: dtype of the gradient-sized buffers. ``None``: the gradients' own dtype
            (float32 for float32 models, bfloat16 for bfloat16 models, so that the buffers are
            "gradient-sized"), but float32 for float16 models, whose range cannot hold summed
            squared gradients. Dot products always accumulate in float32 or wider and the table
            in float64. ``torch.float32`` on a bfloat16 model doubles the buffer memory and removes
            the bfloat16 rounding of the accumulated validation gradients (relative 2^-9 per
            addition, the same as bfloat16 gradient accumulation in training).

    Returns:
        :class:`InfluenceResult` with ``scores`` (numpy float64), names, token counts, losses,
        ``seconds`` and ``peak_memory_bytes`` (CUDA: growth of ``max_memory_allocated`` over the pass,
        whose peak statistic is reset; CPU: the bytes of the buffers this function allocated, not
        activations, which are those of a training step at the same micro-batch size).

    Cost: one forward+backward per validation and probe micro-batch, plus ``n`` dot products of
    length ``P`` per probe micro-batch. ``diag_fisher`` needs ``F`` before it can precondition, so
    without ``keep_domain_gradients`` it makes two passes over the probe data (one more buffer,
    twice the probe compute); with ``keep_domain_gradients`` one pass suffices.

    Data parallel (``torch.distributed`` initialised, world size > 1): rank ``r`` takes batches
    ``k`` with ``k % world == r`` of every list, the validation gradients (or their projections),
    the table and the losses are all-reduced, and every rank returns the same result.

    Sharded (FSDP): every forward and backward runs through the sharded module, all ranks on the
    same domain or task at a time, ``world`` batches per step, a rank without a batch in the last
    step running an all-ignored-labels pad batch. Gradient-sized buffers hold this rank's shards
    (``(n + 1) x P / world`` bytes), dot products of shards are completed by one all-reduce of the
    table, ``diag_fisher``'s pass has every rank differentiate every probe batch, and the standard
    errors are over steps of ``world`` batches. ``projection_dim`` is refused. ``docs/influence.md``,
    section Sharding, has the details and costs.

    Side effects: none. Parameters, ``.grad`` (including ``None``), ``requires_grad``, optimizer
    state, the ``training`` flag of every submodule and the RNG streams (torch CPU/CUDA, ``random``,
    ``numpy``) are as before the call. During the pass dropout is off: every submodule is put in
    eval mode except, when gradient checkpointing is on, the modules that gate it (eval mode would
    silently disable checkpointing in Hugging Face models).

    Example::

        result = group_influence(model, {"code": code_batches, "law": law_batches},
                                 {"arc": arc_batches}, preconditioner="adam", optimizer=optimizer)
        result.scores          # (1, 2) numpy array; result.task_names, result.domain_names
    """
    started = time.perf_counter()
    check_preconditioner_name(preconditioner)
    projection_dim = check_projection_dim(projection_dim)
    damping = check_damping(damping, preconditioner)
    keep_device = check_keep(keep_domain_gradients)
    module = unwrap(model, sharded=True)
    rank, world = rank_and_world()
    sharding = sharding_of(module, world)
    if sharding is not None and projection_dim is not None:
        raise ValueError(
            f"projection_dim={projection_dim} is not supported for a {sharding.kind}-sharded model (the projection "
            f"is defined on whole gradients); pass projection_dim=None: the sharded buffers already cost "
            f"(n_tasks + 1) x P / world_size per rank"
        )
    layout = ParameterLayout.select(module, param_filter, buffer_dtype, None if sharding is None else local_piece)
    domains = batch_sets(domain_batches, "domain_batches", "domain", layout.device)
    tasks = batch_sets(validation_batches, "validation_batches", "task", layout.device)

    pass_ = InfluencePass(module, layout, rank, world, show_progress, sharding)
    projector = None if projection_dim is None else Projector(layout, projection_dim, seed, pass_.ledger)
    keep = keep_device is not None
    # Sharded, F needs a pass of its own even when the domain gradients are kept (engine.fisher).
    fisher_pass = preconditioner == "diag_fisher" and (not keep or sharding is not None)
    probe_batches = sum(pass_.local_count(d) for d in domains.values())
    fisher_batches = sum(1 for d in domains.values() for c in d.counts if c > 0) if sharding else probe_batches
    task_batches = sum(pass_.local_count(t) for t in tasks.values())
    n_micro = probe_batches + fisher_batches * fisher_pass + task_batches

    stats = None if projector is not None else BatchStats(len(tasks), len(domains), layout.device)
    grads_aside = contextlib.nullcontext() if sharding is None else sharding.own_gradients(pass_.ledger)
    with pass_.measure(), measurement_mode(module), pass_.progress(n_micro), grads_aside:
        if keep:
            # The kept gradients carry P^{-1} (the look-ahead steps along P^{-1} g_j), so the
            # validation side stays raw; diag_fisher gets F from this same single probe pass.
            fisher = pass_.fisher(domains) if fisher_pass else None
            task_side = pass_.validation(tasks, None, projector)
            early = None
            if preconditioner != "diag_fisher" or fisher is not None:
                # Known before the probe pass: per-batch contributions <P^{-1} v_i, g_b> can be taken
                # on the fly for the standard errors. diag_fisher's F needs the whole pass first.
                early = pass_.preconditioner(preconditioner, optimizer, fisher, damping)
            else:
                stats = None
            kept, fisher_kept, domain_loss_sums = pass_.keep_domains(
                domains, keep_device, want_fisher=preconditioner == "diag_fisher" and fisher is None,
                stats=stats, task_side=task_side, precond=None if early is None else early[0],
            )
            fisher = fisher if fisher is not None else fisher_kept
            precond, fallback = early or pass_.preconditioner(preconditioner, optimizer, fisher, damping)
            pass_.precondition_rows(kept, precond)
            table = pass_.table_from_kept(task_side, kept, projector)
        else:
            # Streaming: precondition the n validation gradients once, then one dot product per
            # probe micro-batch. diag_fisher needs F first, hence its extra pass over the probe data.
            kept = None
            fisher = pass_.fisher(domains) if fisher_pass else None
            precond, fallback = pass_.preconditioner(preconditioner, optimizer, fisher, damping)
            task_side = pass_.validation(tasks, precond, projector)
            table, domain_loss_sums = pass_.stream_domains(domains, task_side, projector, stats)
        del task_side, fisher
        if stats is not None:
            pass_.reduce_stats(stats)

    task_names, domain_names = list(tasks), list(domains)
    domain_losses = finite_losses(domain_loss_sums, domains)
    scores = table.cpu().numpy().astype(np.float64)
    check_finite_scores(scores, task_names, domain_names)
    if stats is not None:
        stderr, split_half, note = stats.finish(task_names, domain_names)
        probe_counts = stats.batch_counts(domain_names)
    else:
        stderr = split_half = probe_counts = None
        note = (
            "standard errors are not measured with projection_dim (each probe batch would need its own "
            "projection)" if projector is not None else
            "standard errors are not measured with keep_domain_gradients and diag_fisher (F, hence P^-1, "
            "is only known after the probe pass)"
        )
    return pass_.result(
        started=started,
        tasks=tasks,
        scores=scores,
        task_names=task_names,
        domain_names=domain_names,
        preconditioner=precond.name,
        requested_preconditioner=preconditioner,
        preconditioner_fallback=fallback,
        damping=getattr(precond, "damping", None),
        projection_dim=projection_dim,
        seed=int(seed),
        domain_tokens={name: d.tokens for name, d in domains.items()},
        domain_losses=domain_losses,
        domain_gradients=kept,
        stderr=stderr,
        split_half=split_half,
        probe_batches=probe_counts,
        uncertainty_note=note,
    )
