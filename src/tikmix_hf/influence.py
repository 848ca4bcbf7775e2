"""Group Influence of data domains on validation tasks (paper Eq. 8), trainer-agnostic.

For domain ``j`` and validation task ``i``, at the current parameters ``theta``::

    S_ij = grad f_i(theta)^T  P^{-1}  g_j,      g_j = mean over probe tokens of domain j of grad loss

with ``f_i`` the mean token cross-entropy of task ``i`` and ``P^{-1}`` a diagonal stand-in for
``(H + lambda I)^{-1}`` (:mod:`tikmix_hf.preconditioners`). ``S_ij > 0`` means that up-weighting
domain ``j`` lowers the loss of task ``i`` (the paper's ``I_f`` has the opposite sign; TiKMiX
maximises the helpful direction, so that is the one stored).

The computation streams (``docs/influence.md`` has the full account):

1. the ``n`` validation gradients are accumulated once and preconditioned, ``p_i = P^{-1} grad f_i``;
2. every probe micro-batch ``b`` of domain ``j`` is differentiated once and ``<p_i, grad loss_b>``
   is added into the ``n x m`` table.

Memory is ``n + 1`` gradient-sized buffers plus the model, whatever the number of domains ``m``.
Nothing here imports ``transformers``: a custom training loop can call these functions directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tikmix_hf.preconditioners import (
    DiagonalPreconditioner,
    FisherPreconditioner,
    IdentityPreconditioner,
    PreconditionerFallbackWarning,
    adam_or_identity,
    check_preconditioner_name,
)

__all__ = [
    "InfluenceResult", "PreconditionerFallbackWarning", "adaptive_group_influence", "group_influence", "lookahead_gain",
]

IGNORE_INDEX = -100
# Rows of a projection block are generated together; bounding rows * k keeps each block at a few MB.
_PROJECTION_BLOCK_ELEMENTS = 1 << 20
# Slack allowed on the simplex when checking candidate mixtures.
_SIMPLEX_TOL = 1e-6

Batches = Mapping[str, "Sequence[Mapping[str, torch.Tensor]]"]
ParamFilter = Callable[[str, torch.nn.Parameter], bool] | Sequence[str] | None


@dataclasses.dataclass
class InfluenceResult:
    """What :func:`group_influence` measured.

    ``scores[i, j]`` is ``S_ij`` of paper Eq. 8 for task ``task_names[i]`` and domain
    ``domain_names[j]``; positive means up-weighting the domain lowers the task's loss.
    """

    scores: np.ndarray
    task_names: list[str]
    domain_names: list[str]
    preconditioner: str
    requested_preconditioner: str
    preconditioner_fallback: str | None
    damping: float | None
    projection_dim: int | None
    seed: int
    num_parameters: int
    domain_tokens: dict[str, int]
    task_tokens: dict[str, int]
    domain_losses: dict[str, float]
    task_losses: dict[str, float]
    seconds: float
    peak_memory_bytes: int
    buffer_bytes: int
    buffer_dtype: str
    memory_measure: str
    world_size: int
    parameter_names: list[str] = dataclasses.field(repr=False)
    domain_gradients: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    """``(m, P)``: the preconditioned domain gradients ``P^{-1} g_j`` (``keep_domain_gradients`` only)."""
    stderr: np.ndarray | None = None
    """``(n, m)`` standard error of every ``S_ij`` over probe batches (``docs/uncertainty.md``): the
    ratio estimator's, with batches as the sampling unit. ``nan`` for a domain with fewer than two
    probe batches; ``None`` when it could not be measured (``projection_dim``, or
    ``keep_domain_gradients`` with ``diag_fisher``). See ``uncertainty_note``."""
    split_half: dict[str, float] | None = None
    """Per task: Spearman rank correlation over domains between ``S`` from the even and from the odd
    probe batches (global batch index within each domain); ``nan`` when undefined."""
    probe_batches: dict[str, int] | None = None
    """Probe micro-batches with at least one labelled target, per domain (the sampling units)."""
    uncertainty_note: str | None = None
    """Why ``stderr`` is ``None`` or holds ``nan`` entries; ``None`` when every entry is measured."""
    adaptive: dict | None = None
    """:func:`adaptive_group_influence` only: per domain the batches and tokens drawn, the final
    relative standard error and why drawing stopped."""

    def to_dict(self) -> dict:
        """JSON-ready summary (lists, floats, ints, strings); the kept gradients are left out."""
        return {
            "scores": [[float(x) for x in row] for row in self.scores],
            "task_names": list(self.task_names),
            "domain_names": list(self.domain_names),
            "preconditioner": self.preconditioner,
            "requested_preconditioner": self.requested_preconditioner,
            "preconditioner_fallback": self.preconditioner_fallback,
            "damping": None if self.damping is None else float(self.damping),
            "projection_dim": self.projection_dim,
            "seed": int(self.seed),
            "num_parameters": int(self.num_parameters),
            "domain_tokens": {k: int(v) for k, v in self.domain_tokens.items()},
            "task_tokens": {k: int(v) for k, v in self.task_tokens.items()},
            "domain_losses": {k: float(v) for k, v in self.domain_losses.items()},
            "task_losses": {k: float(v) for k, v in self.task_losses.items()},
            "seconds": float(self.seconds),
            "peak_memory_bytes": int(self.peak_memory_bytes),
            "buffer_bytes": int(self.buffer_bytes),
            "buffer_dtype": self.buffer_dtype,
            "memory_measure": self.memory_measure,
            "world_size": int(self.world_size),
            "has_domain_gradients": self.domain_gradients is not None,
            "stderr": None if self.stderr is None else [[_json_float(x) for x in row] for row in self.stderr],
            "split_half": None if self.split_half is None else {k: _json_float(v) for k, v in self.split_half.items()},
            "probe_batches": None if self.probe_batches is None else {k: int(v) for k, v in self.probe_batches.items()},
            "uncertainty_note": self.uncertainty_note,
            "adaptive": self.adaptive,
        }


def _json_float(x) -> float | None:
    """A float for JSON; ``nan``/``inf`` (not allowed in strict JSON) become ``None``."""
    x = float(x)
    return x if math.isfinite(x) else None


def group_influence(
    model: torch.nn.Module,
    domain_batches: Batches,
    validation_batches: Batches,
    *,
    preconditioner: str = "identity",
    optimizer=None,
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
            all-reduce gradients. FSDP and DeepSpeed engines are refused (``ValueError``): their
            parameters are sharded and this function needs them whole.
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
    projection_dim = _check_projection_dim(projection_dim)
    damping = _check_damping(damping, preconditioner)
    keep_device = _check_keep(keep_domain_gradients)
    module = _unwrap(model)
    rank, world = _world()
    layout = _Layout.select(module, param_filter, buffer_dtype)
    domains = _batch_sets(domain_batches, "domain_batches", "domain", layout.device)
    tasks = _batch_sets(validation_batches, "validation_batches", "task", layout.device)

    pass_ = _Pass(module, layout, rank, world, show_progress)
    projector = None if projection_dim is None else _Projector(layout, projection_dim, seed, pass_.ledger)
    keep = keep_device is not None
    fisher_pass = preconditioner == "diag_fisher" and not keep
    probe_batches = sum(len(d.local(rank, world)) for d in domains.values())
    task_batches = sum(len(t.local(rank, world)) for t in tasks.values())
    n_micro = probe_batches * (2 if fisher_pass else 1) + task_batches

    stats = None if projector is not None else _BatchStats(len(tasks), len(domains), layout.device)
    with pass_.measure(), _influence_mode(module), pass_.progress(n_micro):
        if keep:
            # The kept gradients carry P^{-1} (the look-ahead steps along P^{-1} g_j), so the
            # validation side stays raw; diag_fisher gets F from this same single probe pass.
            task_side = pass_.validation(tasks, None, projector)
            early = None
            if preconditioner != "diag_fisher":
                # Known before the probe pass: per-batch contributions <P^{-1} v_i, g_b> can be taken
                # on the fly for the standard errors. diag_fisher's F needs the whole pass first.
                early = _build_preconditioner(preconditioner, layout, optimizer, None, damping)
            else:
                stats = None
            kept, fisher, domain_loss_sums = pass_.keep_domains(
                domains, keep_device, want_fisher=preconditioner == "diag_fisher",
                stats=stats, task_side=task_side, precond=None if early is None else early[0],
            )
            precond, fallback = early or _build_preconditioner(preconditioner, layout, optimizer, fisher, damping)
            pass_.precondition_rows(kept, precond)
            table = pass_.table_from_kept(task_side, kept, projector)
        else:
            # Streaming: precondition the n validation gradients once, then one dot product per
            # probe micro-batch. diag_fisher needs F first, hence its extra pass over the probe data.
            kept = None
            fisher = pass_.fisher(domains) if fisher_pass else None
            precond, fallback = _build_preconditioner(preconditioner, layout, optimizer, fisher, damping)
            task_side = pass_.validation(tasks, precond, projector)
            table, domain_loss_sums = pass_.stream_domains(domains, task_side, projector, stats)
        del task_side, fisher
        if stats is not None:
            stats.reduce(world)

    task_names, domain_names = list(tasks), list(domains)
    domain_losses = _finite_losses(domain_loss_sums, domains)
    task_losses = pass_.task_losses
    scores = table.cpu().numpy().astype(np.float64)
    _check_finite_scores(scores, task_names, domain_names)
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
    return InfluenceResult(
        scores=scores,
        task_names=task_names,
        domain_names=domain_names,
        preconditioner=precond.name,
        requested_preconditioner=preconditioner,
        preconditioner_fallback=fallback,
        damping=getattr(precond, "damping", None),
        projection_dim=projection_dim,
        seed=int(seed),
        num_parameters=layout.total,
        domain_tokens={name: d.tokens for name, d in domains.items()},
        task_tokens={name: t.tokens for name, t in tasks.items()},
        domain_losses=domain_losses,
        task_losses=task_losses,
        seconds=time.perf_counter() - started,
        peak_memory_bytes=pass_.peak_memory_bytes,
        buffer_bytes=pass_.ledger.peak,
        buffer_dtype=str(layout.dtype).removeprefix("torch."),
        memory_measure=pass_.memory_measure,
        world_size=world,
        parameter_names=list(layout.names),
        domain_gradients=kept,
        stderr=stderr,
        split_half=split_half,
        probe_batches=probe_counts,
        uncertainty_note=note,
    )


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
    optimizer=None,
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
    module = _unwrap(model)
    rank, world = _world()
    layout = _Layout.select(module, param_filter, buffer_dtype)
    tasks = _batch_sets(validation_batches, "validation_batches", "task", layout.device)
    sources = {str(name): _as_source(src) for name, src in domain_batch_source.items()}
    domain_names, task_names = list(sources), list(tasks)
    pass_ = _Pass(module, layout, rank, world, show_progress)
    stats = _BatchStats(len(tasks), len(sources), layout.device)
    loss_sums = torch.zeros(len(sources), dtype=torch.float64, device=layout.device)
    report: dict = {"target_rse": target_rse, "min_batches": min_batches, "max_batches": max_batches,
                    "max_tokens": max_tokens, "domains": {}}
    n_micro = sum(len(t.local(rank, world)) for t in tasks.values()) + max_batches * len(sources)
    with pass_.measure(), _influence_mode(module), pass_.progress(n_micro):
        precond, fallback = _build_preconditioner(preconditioner, layout, optimizer, None, None)
        task_side = pass_.validation(tasks, precond, None)
        for j, name in enumerate(domain_names):
            drawn, stopped = 0, None
            while stopped is None:
                k = drawn + rank
                batch = sources[name](k) if k < max_batches else None
                available = torch.zeros(1, dtype=torch.float64, device=layout.device)
                round_ = _BatchStats(len(tasks), len(sources), layout.device)
                if batch is not None:
                    _check_batch(batch, f"domain {name!r} batch {k}", layout.device)
                    tokens = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
                    available += 1
                    if tokens > 0:
                        with torch.enable_grad():
                            loss = pass_.summed_loss(batch)
                            grads = torch.autograd.grad(loss, layout.params, allow_unused=True)
                        column = torch.zeros(task_side.shape[0], dtype=layout.compute_dtype, device=layout.device)
                        for (start, stop), g in pass_.flat(grads):
                            column.add_(torch.mv(task_side[:, start:stop], g))
                        del grads
                        round_.add(j, k, tokens, column)
                        loss_sums[j] += loss.detach().double()
                    if pass_.bar is not None:
                        pass_.bar.update(1)
                # Every rank must see the same sums to take the same decision: reduce this round's.
                round_.reduce(world)
                _all_reduce(available, world)
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
                                       "rse": _json_float(stats.column_rse(j)), "stopped": stopped}
        del task_side
    _all_reduce(loss_sums, world)
    report["total_batches"] = sum(d["batches"] for d in report["domains"].values())
    report["total_tokens"] = sum(d["tokens"] for d in report["domains"].values())
    scores = stats.scores()
    _check_finite_scores(scores, task_names, domain_names)
    stderr, split_half, note = stats.finish(task_names, domain_names)
    domain_tokens = {name: stats.tokens(j) for j, name in enumerate(domain_names)}
    domain_losses = {name: float(loss_sums[j]) / domain_tokens[name] for j, name in enumerate(domain_names)}
    return InfluenceResult(
        scores=scores, task_names=task_names, domain_names=domain_names, preconditioner=precond.name,
        requested_preconditioner=preconditioner, preconditioner_fallback=fallback, damping=None,
        projection_dim=None, seed=0, num_parameters=layout.total, domain_tokens=domain_tokens,
        task_tokens={name: t.tokens for name, t in tasks.items()}, domain_losses=domain_losses,
        task_losses=pass_.task_losses, seconds=time.perf_counter() - started,
        peak_memory_bytes=pass_.peak_memory_bytes, buffer_bytes=pass_.ledger.peak,
        buffer_dtype=str(layout.dtype).removeprefix("torch."), memory_measure=pass_.memory_measure,
        world_size=world, parameter_names=list(layout.names), stderr=stderr, split_half=split_half,
        probe_batches=stats.batch_counts(domain_names), uncertainty_note=note, adaptive=report,
    )


def _as_source(source):
    """A callable ``k -> batch or None`` from a callable or a sequence of batches."""
    if callable(source):
        return source
    if isinstance(source, Mapping) or torch.is_tensor(source):
        raise TypeError("a domain's source must be a callable k -> batch (None when exhausted) or a list of batches")
    items = list(source)
    return lambda k: items[k] if k < len(items) else None


def lookahead_gain(
    model: torch.nn.Module,
    result: InfluenceResult,
    validation_batches: Batches,
    W,
    *,
    step_size: float,
    show_progress: bool = True,
) -> np.ndarray:
    """Validation-loss drop after one virtual preconditioned step along each candidate mixture.

    The TiKMiX-M target of ``docs/method.md`` §4: for each row ``w_k`` of ``W``::

        gain[k, i] = L_i(theta) - L_i(theta - step_size * P^{-1} sum_j W_kj g_j)

    with ``P^{-1} g_j`` the preconditioned domain gradients kept by
    ``group_influence(..., keep_domain_gradients=True)`` (same preconditioner, same parameters) and
    ``L_i`` the mean token cross-entropy of task ``i`` (the columns follow ``validation_batches``).
    Only forward passes run, under ``torch.no_grad()``. For small steps ``gain ~= step_size * S w``;
    for finite steps the gain is non-linear in ``w`` (curvature along the mixed direction), which is
    what makes it worth a regressor while ``S w`` is not.

    The parameters are moved in place and restored bitwise from a copy afterwards (one extra
    parameter-sized buffer, plus one for the mixed direction); the other guarantees of
    :func:`group_influence` hold too. Under data parallelism each rank evaluates its slice of the
    validation batches and the losses are all-reduced, so every rank returns the same array.

    Returns:
        ``(N, n_tasks)`` float64 array.
    """
    if not isinstance(result, InfluenceResult):
        raise TypeError(
            f"result must be an InfluenceResult from group_influence, got {type(result).__name__}"
        )
    if result.domain_gradients is None:
        raise ValueError(
            "result holds no domain gradients; call group_influence(..., keep_domain_gradients=True) "
            "to get a result that lookahead_gain can step along"
        )
    step_size = float(step_size)
    if not math.isfinite(step_size) or step_size <= 0:
        raise ValueError(f"step_size must be a finite positive number, got {step_size!r}")
    W = _check_mixtures(W, result.domain_names)
    module = _unwrap(model)
    rank, world = _world()
    layout = _Layout.by_names(module, result.parameter_names, result.domain_gradients.dtype)
    tasks = _batch_sets(validation_batches, "validation_batches", "task", layout.device)
    pass_ = _Pass(module, layout, rank, world, show_progress)
    gains = np.empty((W.shape[0], len(tasks)), dtype=np.float64)
    kept = result.domain_gradients
    n_micro = (W.shape[0] + 1) * sum(len(t.local(rank, world)) for t in tasks.values())
    with pass_.progress(n_micro), _influence_mode(module), torch.no_grad():
        originals = [p.detach().clone() for p in layout.params]
        try:
            base = _finite_losses(pass_.eval_losses(tasks), tasks)
            base = np.array([base[name] for name in tasks])
            weights = torch.as_tensor(W, dtype=kept.dtype, device=kept.device)
            for k in range(W.shape[0]):
                direction = (weights[k] @ kept).to(layout.device)
                for (start, stop), p, original in zip(layout.spans, layout.params, originals):
                    p.copy_(original - step_size * direction[start:stop].view_as(p))
                del direction
                losses = _finite_losses(
                    pass_.eval_losses(tasks), tasks,
                    context=f" after the virtual step of candidate {k} (step_size={step_size}); "
                    "try a smaller step_size",
                )
                gains[k] = base - np.array([losses[name] for name in tasks])
        finally:
            for p, original in zip(layout.params, originals):
                p.copy_(original)
    return gains


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_projection_dim(projection_dim):
    if projection_dim is None:
        return None
    is_integer = isinstance(projection_dim, (int, np.integer)) and not isinstance(projection_dim, bool)
    if not is_integer or projection_dim <= 0:
        raise ValueError(
            f"projection_dim must be a positive integer (the number of projected dimensions k) or None "
            f"for exact scores, got {projection_dim!r}"
        )
    return int(projection_dim)


def _check_damping(damping, preconditioner):
    """Only ``diag_fisher`` is damped: identity needs no damping and adam steps with the optimizer's eps."""
    if damping is None or preconditioner != "diag_fisher":
        return None
    damping = float(damping)
    if not math.isfinite(damping) or damping <= 0:
        raise ValueError(
            f"damping must be a finite positive number (it is added to the Fisher diagonal before "
            f"inverting) or None for 0.1 * mean(F), got {damping!r}"
        )
    return damping


def _check_keep(keep):
    if keep is False or keep is None:
        return None
    if keep is True:
        return "params"
    if isinstance(keep, str) and keep == "cpu":
        return torch.device("cpu")
    raise ValueError(f"keep_domain_gradients must be False, True or 'cpu', got {keep!r}")


def _check_mixtures(W, domain_names):
    m = len(domain_names)
    try:
        W = np.asarray(W, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"W must be an (N, {m}) array of mixture weights, could not convert it: {error}"
        ) from None
    if W.ndim != 2 or W.shape[1] != m or W.shape[0] == 0:
        raise ValueError(
            f"W must have shape (N, {m}) with one column per domain {domain_names}, got shape {W.shape}; "
            f"a single mixture w goes in as W = w[None, :]"
        )
    off = (W.min(axis=1) < -_SIMPLEX_TOL) | (np.abs(W.sum(axis=1) - 1) > _SIMPLEX_TOL)
    bad = ~np.isfinite(W).all(axis=1) | off
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"row {k} of W is not on the simplex (weights >= 0 summing to 1): {W[k].tolist()} "
            f"(sum {W[k].sum():.6g}); normalise each row, e.g. W / W.sum(axis=1, keepdims=True)"
        )
    return W


@dataclasses.dataclass
class _BatchSet:
    """One domain or task: its batches and the labelled next-token count of each."""

    kind: str
    name: str
    batches: list
    counts: list[int]

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    def local(self, rank, world) -> list[tuple[Mapping, int]]:
        """This rank's slice (batch ``k`` with ``k % world == rank``), skipping batches with no target."""
        pairs = zip(self.batches[rank::world], self.counts[rank::world])
        return [(batch, count) for batch, count in pairs if count > 0]

    def local_indices(self, rank, world) -> list[int]:
        """Global indices ``k`` of :meth:`local`'s batches, in the same order (for the even/odd split)."""
        return [k for k in range(rank, len(self.batches), world) if self.counts[k] > 0]


def _batch_sets(batches, argument, kind, device) -> dict[str, _BatchSet]:
    """Check ``{name: batches}`` and count labelled targets on every rank from the full lists.

    Counting here, once and with one device sync per set, keeps the passes free of host syncs
    and needs no collective (every rank sees the full lists).
    """
    if not isinstance(batches, Mapping):
        raise TypeError(
            f"{argument} must be a mapping {{{kind} name: list of batches}}, got {type(batches).__name__}"
        )
    if not batches:
        raise ValueError(f"{argument} is empty; give at least one {kind} with at least one batch")
    sets = {}
    for name, value in batches.items():
        name = str(name)
        if isinstance(value, Mapping) or torch.is_tensor(value):
            raise TypeError(
                f"{kind} {name!r}: expected an iterable of batches (dicts of tensors), got a single "
                f"{type(value).__name__}; wrap it in a list"
            )
        items = list(value)
        if not items:
            raise ValueError(
                f"{kind} {name!r} has no batches; give it at least one batch or remove it from {argument}"
            )
        for index, batch in enumerate(items):
            _check_batch(batch, f"{kind} {name!r} batch {index}", device)
        counts = torch.stack([(b["labels"][..., 1:] != IGNORE_INDEX).sum() for b in items]).tolist()
        if sum(counts) == 0:
            raise ValueError(
                f"{kind} {name!r}: every label is {IGNORE_INDEX} (after the next-token shift), so its "
                f"loss is undefined; give it batches with at least one labelled target token"
            )
        sets[name] = _BatchSet(kind, name, items, counts)
    return sets


def _check_batch(batch, where, device):
    if not isinstance(batch, Mapping):
        raise TypeError(f"{where} is a {type(batch).__name__}; a batch must be a dict of tensors")
    if "labels" not in batch or not torch.is_tensor(batch["labels"]):
        raise ValueError(
            f"{where} has no 'labels' tensor (keys: {sorted(batch)}); add labels, e.g. labels = "
            f"input_ids with prompt and padding positions set to {IGNORE_INDEX}"
        )
    for key, value in batch.items():
        if torch.is_tensor(value) and value.device != device:
            raise ValueError(
                f"{where}: tensor {key!r} is on {value.device} but the model's parameters are on "
                f"{device}; move the batches first, e.g. "
                f"{{k: v.to({str(device)!r}) for k, v in batch.items()}}"
            )


def _finite_losses(loss_sums, sets, context="") -> dict[str, float]:
    losses = {}
    for (name, bset), total in zip(sets.items(), loss_sums.tolist()):
        loss = total / bset.tokens
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the mean loss of {bset.kind} {name!r} is {loss}{context}; check its batches (token ids "
                f"within the vocabulary) and the model's numerics (fp16 overflow, a diverged checkpoint)"
            )
        losses[name] = loss
    return losses


def _check_finite_scores(scores, task_names, domain_names):
    bad = np.argwhere(~np.isfinite(scores))
    if len(bad):
        i, j = bad[0]
        raise FloatingPointError(
            f"S[{task_names[i]!r}, {domain_names[j]!r}] = {scores[i, j]} (non-finite gradient); check the "
            f"batches of domain {domain_names[j]!r} and task {task_names[i]!r} and the model's numerics"
        )


# --------------------------------------------------------------------------------------------
# Model, parameters, distributed
# --------------------------------------------------------------------------------------------


def _unwrap(model):
    """The module to differentiate: DDP is unwrapped (its reducer only arms in ``DDP.forward``)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__) or any(
        hasattr(p, "ds_id") for p in model.parameters()
    ):
        raise ValueError(
            "DeepSpeed engines are not supported: ZeRO partitions gradients and optimizer state into its own "
            "buffers. Compute influence on a DDP or single-process copy of the model."
        )
    if torch.distributed.is_available():
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            model = model.module
        sharded = _fsdp_types()
        for name, sub in model.named_modules():
            if sharded and isinstance(sub, sharded):
                raise ValueError(
                    f"FSDP is not supported (module {name or '<root>'!r} is {type(sub).__name__}): "
                    f"parameters are sharded and group_influence needs them whole. Use DDP or a single "
                    f"process."
                )
        from torch.distributed.tensor import DTensor

        for name, p in model.named_parameters():
            if isinstance(p, DTensor):
                raise ValueError(
                    f"parameter {name!r} is a sharded DTensor (FSDP2 / tensor parallel), which is not "
                    f"supported; use DDP or a single process"
                )
    return model


def _fsdp_types() -> tuple:
    types = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    except ImportError:
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        types.append(FSDPModule)
    except ImportError:
        pass
    return tuple(types)


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(tensor, world):
    if world > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


class _Layout:
    """The selected parameters laid end to end: parameter ``t`` owns ``[spans[t][0], spans[t][1])``.

    ``dtype`` is the dtype of the gradient-sized buffers; ``compute_dtype`` (float32 or wider) is
    the dtype in which dot products, projections and preconditioners are evaluated.
    """

    def __init__(self, names, params, buffer_dtype=None):
        self.names, self.params = list(names), list(params)
        self.spans, start = [], 0
        for p in self.params:
            self.spans.append((start, start + p.numel()))
            start += p.numel()
        self.total = start
        self.offsets = [s for s, _ in self.spans] + [self.total]
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(
                f"the selected parameters are spread over {sorted(map(str, devices))}; group_influence "
                f"needs them on one device (restrict param_filter to one device, or run data parallel "
                f"instead of a device_map)"
            )
        self.device = devices.pop()
        widest = max((p.dtype for p in self.params), key=lambda d: d.itemsize)
        if buffer_dtype is None:
            # Gradient-sized buffers; float16's range cannot hold sums of squared gradients.
            buffer_dtype = widest if widest != torch.float16 else torch.float32
        if not isinstance(buffer_dtype, torch.dtype) or not buffer_dtype.is_floating_point:
            raise ValueError(f"buffer_dtype must be a floating torch.dtype or None, got {buffer_dtype!r}")
        self.dtype = buffer_dtype
        self.compute_dtype = torch.promote_types(buffer_dtype, torch.float32)
        self.gradient_bytes = sum(p.numel() * p.element_size() for p in self.params)
        self.largest = max(p.numel() for p in self.params)
        self.converts = any(p.dtype != buffer_dtype for p in self.params)

    @classmethod
    def select(cls, module, param_filter, buffer_dtype=None):
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(
                f"{type(module).__name__} has no parameter with requires_grad=True, so there is no "
                f"gradient to measure influence with; unfreeze the parameters to score "
                f"(e.g. p.requires_grad_(True))"
            )
        keep = _filter_predicate(param_filter)
        chosen = [(n, p) for n, p in trainable if keep(n, p)]
        if not chosen:
            raise ValueError(
                f"param_filter={param_filter!r} kept none of the {len(trainable)} trainable parameters (e.g. "
                f"{trainable[0][0]!r}); loosen it"
            )
        return cls([n for n, _ in chosen], [p for _, p in chosen], buffer_dtype)

    @classmethod
    def by_names(cls, module, names, buffer_dtype):
        available = dict(module.named_parameters())
        params = []
        for name in names:
            if name not in available:
                raise ValueError(
                    f"parameter {name!r} of the influence result is not in this model; pass the model that "
                    f"group_influence measured"
                )
            params.append(available[name])
        return cls(names, params, buffer_dtype)


def _filter_predicate(param_filter):
    if param_filter is None:
        return lambda name, param: True
    if callable(param_filter):
        return param_filter
    if isinstance(param_filter, str):
        substrings = [param_filter]
    else:
        substrings = list(param_filter)
        if not substrings or not all(isinstance(s, str) for s in substrings):
            raise TypeError(
                f"param_filter must be a callable (name, param) -> bool or a non-empty list of name "
                f"substrings, got {param_filter!r}"
            )
    return lambda name, param: any(s in name for s in substrings)


# --------------------------------------------------------------------------------------------
# Side-effect-free mode
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _influence_mode(module):
    """Dropout off, checkpointing untouched, and every mode flag and RNG stream restored on exit.

    Switching the whole model to eval would silently disable gradient checkpointing in Hugging
    Face models (layers checkpoint only when ``self.training``). So when checkpointing is on, the
    modules that gate it keep their mode and every other module (``nn.Dropout``, and attention
    modules that drop out functionally on ``self.training``) is set to eval. The flags are set
    directly, not through ``.train()``, so that restoring them is exact.
    """
    modes = [(m, m.training) for m in module.modules()]
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())
    rng = _rng_state()
    try:
        for m in module.modules():
            if not (checkpointing and getattr(m, "gradient_checkpointing", False) is True):
                m.training = False
        yield
    finally:
        for m, training in modes:
            m.training = training
        _restore_rng(rng)


def _rng_state():
    cuda_live = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda = torch.cuda.get_rng_state_all() if cuda_live else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _restore_rng(state):
    cpu, cuda, python, numpy_state = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)
    np.random.set_state(numpy_state)


# --------------------------------------------------------------------------------------------
# The passes
# --------------------------------------------------------------------------------------------


class _BatchStats:
    """Sums over probe micro-batches from which the standard error of ``S`` follows.

    Batch ``b`` of domain ``j`` contributes ``c_ijb = <p_i, grad of b's summed token loss>`` and has
    ``t_b`` labelled tokens; ``S_ij = sum_b c_ijb / T_j`` with ``T_j = sum_b t_b``. Only sums are kept
    (``sum c``, ``sum c^2``, ``sum c t`` per entry; ``sum t``, ``sum t^2``, the batch count, and the even
    half's ``sum c`` and ``sum t``), so that under data parallelism one all-reduce of two small float64
    tensors combines the ranks, whatever batches each rank held.
    """

    def __init__(self, n, m, device):
        self.cell = torch.zeros((4, n, m), dtype=torch.float64, device=device)  # c, c^2, c t, c (even)
        self.dom = torch.zeros((4, m), dtype=torch.float64, device=device)  # t, t^2, batches, t (even)

    def add(self, j, k, tokens, column, total_tokens=1):
        """Record batch ``k`` (global index) of domain ``j``: ``column`` holds ``c_ib / total_tokens``."""
        c = column.double() * total_tokens
        t = float(tokens)
        self.cell[0, :, j] += c
        self.cell[1, :, j] += c * c
        self.cell[2, :, j] += c * t
        self.dom[:3, j] += torch.tensor([t, t * t, 1.0], dtype=torch.float64, device=self.dom.device)
        if k % 2 == 0:
            self.cell[3, :, j] += c
            self.dom[3, j] += t

    def reduce(self, world):
        _all_reduce(self.cell, world)
        _all_reduce(self.dom, world)

    def merge(self, other):
        """Add another set of sums (e.g. one all-reduced round of the adaptive budget)."""
        self.cell += other.cell
        self.dom += other.dom

    def batches(self, j) -> int:
        return int(round(float(self.dom[2, j])))

    def tokens(self, j) -> int:
        return int(round(float(self.dom[0, j])))

    def column_rse(self, j) -> float:
        """``||SE[:, j]|| / ||S[:, j]||`` (``inf`` with < 2 batches; ``0`` when both are zero)."""
        se, S = self.stderr()[:, j], self.scores()[:, j]
        if not np.isfinite(se).all():
            return float("inf")
        num, den = float(np.linalg.norm(se)), float(np.linalg.norm(S))
        if num == 0:
            return 0.0
        return num / den if den > 0 else float("inf")

    def batch_counts(self, domain_names) -> dict[str, int]:
        return {name: int(round(b)) for name, b in zip(domain_names, self.dom[2].tolist())}

    def scores(self) -> np.ndarray:
        """``S = sum c / T`` from the sums alone (equal to the table up to rounding)."""
        cell, dom = self.cell.cpu().numpy(), self.dom.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return cell[0] / dom[0][None, :]

    def stderr(self) -> np.ndarray:
        """Ratio-estimator standard error of ``S_ij`` (``nan`` where a domain has fewer than 2 batches).

        ``Var(S_ij) = B/(B-1) * sum_b (c_ijb - S_ij t_b)^2 / T_j^2``, the residual sum expanded in the
        accumulated sums: ``sum c^2 - 2 S sum c t + S^2 sum t^2`` (clipped at 0 against rounding).
        """
        cell, dom = self.cell.cpu().numpy(), self.dom.cpu().numpy()
        T, T2, B = dom[0][None, :], dom[1][None, :], dom[2][None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            S = cell[0] / T
            resid = cell[1] - 2.0 * S * cell[2] + S * S * T2
            # Rounding of the expansion is relative to sum c^2; below that the spread is zero.
            resid = np.where(resid > 1e-13 * cell[1], resid, 0.0)
            var = B / (B - 1.0) * resid / (T * T)
        return np.where(np.broadcast_to(B, var.shape) >= 2, np.sqrt(var), np.nan)

    def split_half(self, task_names) -> dict[str, float]:
        cell, dom = self.cell.cpu().numpy(), self.dom.cpu().numpy()
        t_even, t_odd = dom[3], dom[0] - dom[3]
        with np.errstate(invalid="ignore", divide="ignore"):
            even = cell[3] / t_even[None, :]
            odd = (cell[0] - cell[3]) / t_odd[None, :]
        return {name: _spearman(even[i], odd[i]) for i, name in enumerate(task_names)}

    def finish(self, task_names, domain_names):
        stderr = self.stderr()
        split = self.split_half(task_names)
        counts = self.batch_counts(domain_names)
        thin = [name for name, b in counts.items() if b < 2]
        note = None
        if thin:
            note = (
                f"standard error undefined (nan) for domain(s) {thin}: fewer than 2 probe micro-batches "
                f"{ {n: counts[n] for n in thin} }; draw more probe sequences or use a smaller probe batch size"
            )
        return stderr, split, note


def _spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); ``nan`` with < 2 points, a nan, or no spread."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    ra, rb = rankdata(a) - (a.size + 1) / 2, rankdata(b) - (a.size + 1) / 2
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / denom) if denom > 0 else float("nan")


class _Ledger:
    """Bytes of the buffers the pass allocates (the CPU memory measure), current and peak."""

    def __init__(self):
        self.now = self.peak = 0

    def hold(self, nbytes):
        self.now += int(nbytes)
        self.peak = max(self.peak, self.now)

    def release(self, nbytes):
        self.now -= int(nbytes)

    @contextlib.contextmanager
    def transient(self, nbytes):
        self.hold(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)


def _buffer(shape, dtype, device, ledger):
    tensor = torch.zeros(shape, dtype=dtype, device=device)
    ledger.hold(tensor.numel() * tensor.element_size())
    return tensor


class _Pass:
    """Shared machinery of one call: the loss, micro-batch gradients, collectives, accounting."""

    def __init__(self, module, layout, rank, world, show_progress):
        self.module, self.layout, self.rank, self.world = module, layout, rank, world
        self.show_progress = show_progress
        self.ledger = _Ledger()
        self.bar = None
        self.task_losses: dict[str, float] = {}
        self.peak_memory_bytes = 0
        self.memory_measure = "cpu_buffers"
        forward = inspect.signature(module.forward).parameters
        # A KV cache is never wanted here; eval-mode HF models would otherwise build one.
        self.forward_extra = {"use_cache": False} if "use_cache" in forward else {}
        # Per-micro-batch gradient (autograd's output) plus, when the buffers have another dtype,
        # one converted parameter-sized slice at a time.
        converted = layout.largest * layout.dtype.itemsize if layout.converts else 0
        self.micro_batch_bytes = layout.gradient_bytes + converted
        self._span_index = {span: index for index, span in enumerate(layout.spans)}

    # -- bookkeeping ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def measure(self):
        device = self.layout.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        try:
            yield
        finally:
            if device.type == "cuda":
                self.peak_memory_bytes = torch.cuda.max_memory_allocated(device) - before
                self.memory_measure = "cuda_max_memory_allocated"
            else:
                self.peak_memory_bytes = self.ledger.peak

    @contextlib.contextmanager
    def progress(self, total):
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            desc="group influence",
            unit="batch",
            disable=not self.show_progress or self.rank != 0,
        )
        try:
            yield
        finally:
            self.bar.close()
            self.bar = None

    # -- one micro-batch -----------------------------------------------------------------------

    def summed_loss(self, batch) -> torch.Tensor:
        """Sum of next-token cross-entropies over the labelled targets of one batch."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        output = self.module(**inputs, **self.forward_extra)
        logits = output.logits if hasattr(output, "logits") else output[0]
        # Padding labels on the right and dropping the first is HF's shift; it keeps logits a view.
        targets = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]
        logits = logits.reshape(-1, logits.shape[-1])
        if logits.dtype.itemsize < 4:
            logits = logits.float()
        return F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")

    def micro_batches(self, bset: _BatchSet) -> Iterator:
        """``(tokens, summed_loss, grads)`` per local micro-batch; grads of ``summed_loss / bset.tokens``.

        Summing per-token losses and dividing by the set's total count makes the accumulated gradient
        the gradient of the mean over the whole domain or task, not a mean of batch means.
        """
        for batch, tokens in bset.local(self.rank, self.world):
            with torch.enable_grad():
                loss = self.summed_loss(batch)
                try:
                    grads = torch.autograd.grad(loss / bset.tokens, self.layout.params, allow_unused=True)
                except RuntimeError as error:
                    if "reentrant" in str(error):
                        raise RuntimeError(
                            "group_influence differentiates with torch.autograd.grad, which reentrant "
                            "gradient checkpointing does not support; enable checkpointing with "
                            "gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers "
                            "default)"
                        ) from error
                    raise
            with self.ledger.transient(self.micro_batch_bytes):
                yield tokens, loss.detach(), grads
            del grads
            if self.bar is not None:
                self.bar.update(1)

    def flat(self, grads):
        """``(span, flattened gradient)`` per parameter in buffer dtype, skipping unused parameters."""
        for span, g in zip(self.layout.spans, grads):
            if g is not None:
                yield span, g.reshape(-1).to(self.layout.dtype)

    # -- passes ----------------------------------------------------------------------------------

    def fisher(self, domains) -> torch.Tensor:
        """``F = mean over probe micro-batches b of (grad of b's mean loss)^2``, all domains and ranks."""
        fisher = _buffer(self.layout.total, self.layout.dtype, self.layout.device, self.ledger)
        for domain in domains.values():
            for tokens, _, grads in self.micro_batches(domain):
                self._add_fisher(fisher, grads, domain.tokens / tokens)
        return self._finish_fisher(fisher, domains)

    def _add_fisher(self, fisher, grads, rescale):
        # grads are of (summed loss / domain tokens); rescaling gives the batch-mean gradient.
        for (start, stop), g in self.flat(grads):
            fisher[start:stop].addcmul_(g, g, value=rescale**2)

    def _finish_fisher(self, fisher, domains):
        _all_reduce(fisher, self.world)
        n_batches = sum(1 for domain in domains.values() for count in domain.counts if count > 0)
        return fisher.div_(n_batches)

    def validation(self, tasks, precond, projector):
        """The ``n`` task gradients, all-reduced, preconditioned if ``precond`` is given, maybe projected."""
        n, layout = len(tasks), self.layout
        loss_sums = torch.zeros(n, dtype=torch.float64, device=layout.device)
        if projector is None:
            rows = _buffer((n, layout.total), layout.dtype, layout.device, self.ledger)
        else:
            rows = _buffer((n, projector.k), layout.compute_dtype, layout.device, self.ledger)
            accumulator = _buffer(layout.total, layout.dtype, layout.device, self.ledger)
        for i, task in enumerate(tasks.values()):
            target = rows[i] if projector is None else accumulator.zero_()
            for _, loss, grads in self.micro_batches(task):
                loss_sums[i] += loss.double()
                for (start, stop), g in self.flat(grads):
                    target[start:stop].add_(g)
            if projector is not None:
                # P^{-1} and the projection are linear and identical on every rank, so the local
                # partial sums can be transformed before the all-reduce of the small k-vectors.
                if precond is not None:
                    self.precondition_rows(accumulator[None], precond)
                rows[i] = projector.project(accumulator[None])[0]
        if projector is not None:
            del accumulator
            self.ledger.release(layout.total * layout.dtype.itemsize)
        _all_reduce(rows, self.world)
        _all_reduce(loss_sums, self.world)
        self.task_losses = _finite_losses(loss_sums, tasks)
        # A row sum is non-finite when any entry is (gradients never come near the overflow
        # threshold), and unlike isfinite(rows) it allocates n numbers, not an n x P mask.
        bad = (~torch.isfinite(rows.sum(dim=1, dtype=layout.compute_dtype))).nonzero()
        if len(bad):
            raise FloatingPointError(
                f"the gradient of task {list(tasks)[int(bad[0])]!r} is not finite; check its batches and the "
                f"model's numerics"
            )
        if projector is None and precond is not None:
            self.precondition_rows(rows, precond)
        return rows

    def precondition_rows(self, rows, precond: DiagonalPreconditioner):
        """Apply ``P^{-1}`` in place to each row of an ``(r, P)`` buffer, one row and parameter at a time.

        The scaling runs in ``compute_dtype`` on the parameters' device; a row slice is converted
        (and copied back) only when the buffer has another dtype or lives in host memory.
        """
        if isinstance(precond, IdentityPreconditioner):
            return
        layout = self.layout
        # One temporary for the diagonal, plus the converted slice when a conversion is needed.
        converts = rows.dtype != layout.compute_dtype or rows.device != layout.device
        with self.ledger.transient((1 + converts) * layout.largest * layout.compute_dtype.itemsize):
            for row in rows:
                for index, (start, stop) in enumerate(layout.spans):
                    block = row[start:stop]
                    work = block.to(device=layout.device, dtype=layout.compute_dtype)
                    precond.scale_(index, work)
                    if work is not block:
                        block.copy_(work)

    def stream_domains(self, domains, task_side, projector, stats=None):
        """Accumulate ``<p_i, grad loss_b>`` over probe micro-batches into the ``n x m`` table.

        With ``stats`` (no projection) each micro-batch's own column of contributions is also
        recorded in :class:`_BatchStats`; the table is accumulated exactly as without it.
        """
        layout = self.layout
        table = torch.zeros((task_side.shape[0], len(domains)), dtype=torch.float64, device=layout.device)
        loss_sums = torch.zeros(len(domains), dtype=torch.float64, device=layout.device)
        if projector is not None:
            # Projecting each micro-batch would regenerate the P x k blocks per batch; projecting
            # the domain's sum once costs one more gradient-sized buffer instead.
            accumulator = _buffer(layout.total, layout.dtype, layout.device, self.ledger)
        for j, domain in enumerate(domains.values()):
            column = torch.zeros(task_side.shape[0], dtype=layout.compute_dtype, device=layout.device)
            if projector is not None:
                accumulator.zero_()
            indices = domain.local_indices(self.rank, self.world)
            for k, (tokens, loss, grads) in zip(indices, self.micro_batches(domain)):
                loss_sums[j] += loss.double()
                own = None if stats is None else torch.zeros_like(column)
                for (start, stop), g in self.flat(grads):
                    if projector is None:
                        # One matrix-vector product per parameter: the n dot products with p_i.
                        dots = torch.mv(task_side[:, start:stop], g)
                        column.add_(dots)
                        if own is not None:
                            own.add_(dots)
                    else:
                        accumulator[start:stop].add_(g)
                if own is not None:
                    stats.add(j, k, tokens, own, domain.tokens)
            if projector is not None:
                column = task_side @ projector.project(accumulator[None])[0]
            table[:, j] = column.double()
        _all_reduce(table, self.world)
        _all_reduce(loss_sums, self.world)
        return table, loss_sums

    def keep_domains(self, domains, keep_device, want_fisher, stats=None, task_side=None, precond=None):
        """Accumulate each domain's gradient ``g_j`` (m buffers), and ``F`` in the same pass if wanted.

        With ``stats`` (and the preconditioner known up front) each micro-batch's contributions
        ``<v_i, P^{-1} grad loss_b>`` are recorded too; ``task_side`` holds the raw ``v_i``.
        """
        layout = self.layout
        device = layout.device if keep_device == "params" else keep_device
        kept = _buffer((len(domains), layout.total), layout.dtype, device, self.ledger)
        fisher = _buffer(layout.total, layout.dtype, layout.device, self.ledger) if want_fisher else None
        loss_sums = torch.zeros(len(domains), dtype=torch.float64, device=layout.device)
        for j, domain in enumerate(domains.values()):
            indices = domain.local_indices(self.rank, self.world)
            for k, (tokens, loss, grads) in zip(indices, self.micro_batches(domain)):
                loss_sums[j] += loss.double()
                if fisher is not None:
                    self._add_fisher(fisher, grads, domain.tokens / tokens)
                own = None
                if stats is not None:
                    own = torch.zeros(task_side.shape[0], dtype=layout.compute_dtype, device=layout.device)
                for index, ((start, stop), g) in enumerate(self.flat(grads)):
                    kept[j, start:stop].add_(g.to(device))
                    if own is not None:
                        work = g.to(layout.compute_dtype, copy=True)
                        if not isinstance(precond, IdentityPreconditioner):
                            precond.scale_(self._span_index[(start, stop)], work)
                        own.add_(torch.mv(task_side[:, start:stop].to(layout.compute_dtype), work))
                if own is not None:
                    stats.add(j, k, tokens, own, domain.tokens)
        if kept.device == layout.device:
            _all_reduce(kept, self.world)
        else:
            # Host-memory copies: reduce one domain at a time through the parameters' device, which
            # every backend (NCCL included) can all-reduce.
            for row in kept:
                row.copy_(_all_reduce(row.to(layout.device), self.world))
        _all_reduce(loss_sums, self.world)
        if fisher is not None:
            fisher = self._finish_fisher(fisher, domains)
        return kept, fisher, loss_sums

    def table_from_kept(self, task_side, kept, projector):
        if projector is not None:
            # The kept gradients are full-size (the look-ahead steps along them); the scores still use
            # the projection so that S means the same with and without keep_domain_gradients.
            return (task_side @ projector.project(kept).T).double()
        layout = self.layout
        table = torch.empty((task_side.shape[0], kept.shape[0]), dtype=torch.float64, device=layout.device)
        for j in range(kept.shape[0]):
            column = torch.zeros(task_side.shape[0], dtype=layout.compute_dtype, device=layout.device)
            for start, stop in layout.spans:
                column.add_(torch.mv(task_side[:, start:stop], kept[j, start:stop].to(layout.device)))
            table[:, j] = column.double()
        return table

    def eval_losses(self, tasks) -> torch.Tensor:
        """Summed token losses per task over all ranks (forward only)."""
        loss_sums = torch.zeros(len(tasks), dtype=torch.float64, device=self.layout.device)
        with torch.no_grad():
            for i, task in enumerate(tasks.values()):
                for batch, _ in task.local(self.rank, self.world):
                    loss_sums[i] += self.summed_loss(batch).double()
                    if self.bar is not None:
                        self.bar.update(1)
        return _all_reduce(loss_sums, self.world)


def _build_preconditioner(name, layout, optimizer, fisher, damping):
    if name == "adam":
        return adam_or_identity(layout.names, layout.params, optimizer)
    if name == "diag_fisher":
        if damping is None:
            mean = float(fisher.mean())
            damping = 0.1 * mean if mean > 0 else 1.0
        return FisherPreconditioner(fisher, layout.offsets, damping), None
    return IdentityPreconditioner(), None


class _Projector:
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
