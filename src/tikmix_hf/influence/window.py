"""Group Influence from the training run's own micro-batches, collected in hooks (``docs/influence.md``).

:func:`group_influence` differentiates probe sequences drawn for the purpose; every probe token is
compute that training does not get. A :class:`TrainingWindow` instead reads the gradients that
training computes anyway: over the steps before a boundary, hooks on every ``nn.Linear``,
``nn.Embedding`` and Hugging Face ``Conv1D`` (GPT-2's layers) take, for each training sequence, the
dot product of its own gradient with the ``n`` preconditioned validation gradients, without forming
any per-sequence gradient of the whole model. Per layer, sequence ``b``'s weight gradient is
``sum_t G_bt A_bt^T`` (output gradient times input), so ``<V, grad_b> = <V, G_b^T A_b>``; for an
embedding it is ``sum_t <G_bt, V[id_bt]>``. Each layer's input is saved for its backward the way
autograd saves any activation (:class:`_Tap`), so activation checkpointing frees and recomputes it
like the rest.

The Trainer's loss scales every gradient by a constant of its own (one over the batch's labelled
tokens, the accumulation steps, the number of ranks...). The window recovers it exactly from the
logits: the gradient of the logits of a token-mean cross-entropy is ``c (softmax - onehot)``, so
``c`` is the least-squares fit of the two, and a loss of another form (label smoothing, z-loss,
soft-capped logits) is refused by the size of the misfit rather than measured wrongly.

The result is the same ratio estimator as the probes' (``S_ij`` is the summed dot products of
domain ``j``'s sequences over their labelled tokens), with sequences as the sampling units of the
standard errors, on the parameters the hooks see: those owned by ``Linear``, ``Embedding`` and
``Conv1D`` modules (normalisation weights are left out; ``result.parameter_names`` lists what counts).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .._distributed import all_reduce, rank_and_world, unwrap
from .._loss import IGNORE_INDEX, measurement_mode, shifted_targets
from .checks import Batches, BatchSet, batch_sets, check_finite_scores, finite_losses
from .engine import InfluencePass
from .layout import ParameterLayout
from .preconditioners import check_preconditioner_name
from .result import InfluenceResult
from .sharding import sharding_of
from .stats import BatchStats
from .timer import DeviceTimer

#: The modules whose parameters' per-sequence gradients the hooks can take (and Hugging Face's ``Conv1D``,
#: a linear layer with its weight stored transposed, recognised by :func:`is_conv1d`).
COVERED = (torch.nn.Linear, torch.nn.Embedding)
#: The largest misfit ``||G - c D|| / ||G||`` of the logits' gradient that still counts as the token
#: cross-entropy; float32 rounding is far below it, bfloat16 logits about a tenth of it.
LOSS_MISFIT = 0.05
#: The format of a window's checkpoint state (:meth:`TrainingWindow.state`).
WINDOW_FORMAT = "tikmix_hf.window/1"
#: Per-sequence weight gradients are formed for at most this many values at a time; a layer whose weight
#: alone is larger is scored task by task instead.
_CHUNK_VALUES = 1 << 24
_NO_LOGITS = (
    "the training forward never called the model's output layer (get_output_embeddings()) on the hidden states: a "
    "fused linear cross-entropy (Liger's kernels, or a forward that returns only the loss) computes the loss "
    "without the logits, from which the training window reads each sequence's gradient scale; measure with probes "
    "(tikmix_influence_source='probes'), which call the model without labels, or turn the fused loss off"
)


def is_conv1d(module: torch.nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 and its kin): ``x @ weight + bias`` with ``weight`` of shape (in, out).

    Recognised by its name and shape rather than imported, so that this layer imports no ``transformers``.
    """
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2
            and getattr(module, "nf", None) == weight.shape[1])


def _covered(module: torch.nn.Module) -> bool:
    return isinstance(module, COVERED) or is_conv1d(module)


def covered_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters that only ``Linear``, ``Embedding`` and ``Conv1D`` modules use (tied weights
    included)."""
    owners: dict[int, list[torch.nn.Module]] = {}
    for sub in module.modules():
        for p in sub.parameters(recurse=False):
            owners.setdefault(id(p), []).append(sub)
    return [(name, p) for name, p in module.named_parameters()
            if p.requires_grad and all(_covered(m) for m in owners[id(p)])]


class _Tap(torch.autograd.Function):
    """The identity on a layer's output whose backward hands the output's gradient, and the layer's input, to
    ``read``. The input is saved as autograd saves any activation: under activation checkpointing it is freed
    after the forward and recomputed for the backward like the rest of the layer's activations, where a hook's
    closure would keep it alive."""

    @staticmethod
    def forward(ctx, output, inp, read):
        ctx.read = read
        ctx.save_for_backward(inp)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        (inp,) = ctx.saved_tensors
        ctx.read(grad, inp)
        return grad, None, None


@dataclass
class _MicroBatch:
    """The training micro-batch whose forward and backward the hooks are reading: what its forward chose, and
    what the hooks have gathered of it so far. Recorded by :meth:`TrainingWindow._flush` once its backward ran."""

    rows: int  # the sequences read: the chosen rows
    all_rows: int  # the sequences of the micro-batch, on this rank
    keep: torch.Tensor | None  # the chosen rows' indices; None: every row
    ids: np.ndarray  # the domain id of each chosen sequence
    labels: torch.Tensor  # the chosen sequences' labels
    dots: torch.Tensor  # (rows, n): <V_i, each sequence's gradient>, summed over the layers read so far
    positions: int  # the labels' positions, all rows: the output layer must give logits for each
    logits: torch.Tensor | None = None  # the output layer's logits of the chosen sequences, from the forward
    # From the fit of the logits' gradient (_loss_scale), in the backward: per sequence, the Trainer's gradient
    # scale, the labelled tokens and the summed loss.
    scale: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    losses: torch.Tensor | None = None


class TrainingWindow:
    """Collects Group Influence from training micro-batches between :meth:`attach` and :meth:`close`.

    Args:
        model: the model the Trainer trains (a DDP wrapper is unwrapped; FSDP is refused, since the
            hooks need each layer's whole validation gradient).
        validation_batches: ``{task: batches}`` as for :func:`group_influence`; their gradients are
            measured now, at the window's start, and held (``n x P`` values) until :meth:`result`.
        domain_names: the mixture's domains, in the order of the ids ``domain_of`` returns.
        preconditioner: ``"identity"`` or ``"adam"`` (read from ``optimizer`` now, once).
        strict: raise ``ValueError`` when a batch cannot be read (no labels, a loss of another form, a row
            that is not one mixture example, an output layer the forward never calls): from the training step
            in one process, from :meth:`close` on every rank together with several (a raise inside one rank's
            backward would leave the others waiting in their gradient all-reduce). With ``False`` the window
            stops collecting instead and ``failure`` says why, so the caller can measure with probes.

    Use: ``attach(domain_of)`` before the window's first training step, where ``domain_of(k, rows)``
    gives the domain id of each of the ``rows`` sequences of this rank's ``k``-th training micro-batch
    since ``attach``; ``close()`` after its last step returns the sequences and tokens each domain
    contributed (all ranks); ``result(top_up)`` adds probe batches for domains the window saw too
    little of and returns the :class:`InfluenceResult`.
    """

    def __init__(self, model: torch.nn.Module, validation_batches: Batches, domain_names: list[str], *,
                 preconditioner: str = "identity", optimizer: torch.optim.Optimizer | None = None,
                 show_progress: bool = False, strict: bool = True, quota: int | None = None,
                 saved: tuple[dict, dict[str, torch.Tensor]] | None = None) -> None:
        check_preconditioner_name(preconditioner)
        if preconditioner == "diag_fisher":
            raise ValueError(
                "preconditioner='diag_fisher' needs the Fisher of probe batches before the window starts; use "
                "'adam' or 'identity' with the training window, or measure with probes"
            )
        if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 1):
            raise ValueError(f"quota must be a positive number of sequences per domain, or None; got {quota!r}")
        self._setup(model, validation_batches, domain_names, show_progress, strict)
        self.preconditioner_name = preconditioner
        self.quota = quota
        if saved is not None:
            self._load(*saved)
            return
        n_batches = sum(self.pass_.local_count(t) for t in self.tasks.values())
        with measurement_mode(self.module), self.pass_.progress(n_batches):
            precond, self.fallback = self.pass_.preconditioner(preconditioner, optimizer, None, None)
            self._hold(self.pass_.validation(self.tasks, precond, None))
        self.preconditioner_used = precond.name
        self.task_losses = dict(self.pass_.task_losses)
        self.validation_seconds = time.perf_counter() - self.started

    def _setup(self, model, validation_batches, domain_names, show_progress, strict) -> None:
        self.started = time.perf_counter()
        self.strict = bool(strict)
        self.failure: str | None = None  # why the window stopped reading (not strict)
        self.module = unwrap(model, sharded=True)
        self.rank, self.world = rank_and_world()
        if sharding_of(self.module, self.world) is not None:
            raise ValueError(
                "the training window needs each layer's whole validation gradient in its hooks, and this model is "
                "FSDP-sharded; measure with probes (tikmix_influence_source='probes'), which support sharding"
            )
        chosen = covered_parameters(self.module)
        if not chosen:
            raise ValueError(
                f"{type(self.module).__name__} has no trainable nn.Linear, nn.Embedding or Conv1D parameter for the "
                "training window's hooks to measure; measure with probes (tikmix_influence_source='probes')"
            )
        self.layout = ParameterLayout([n for n, _ in chosen], [p for _, p in chosen])
        self.domain_names = list(domain_names)
        self.tasks = batch_sets(validation_batches, "validation_batches", "task", self.layout.device)
        self.pass_ = InfluencePass(self.module, self.layout, self.rank, self.world, show_progress)
        n, m = len(self.tasks), len(self.domain_names)
        self.stats = BatchStats(n, m, self.layout.device)
        self.loss_sums = torch.zeros(m, dtype=torch.float64, device=self.layout.device)
        self.sequences = torch.zeros(m, dtype=torch.float64, device=self.layout.device)
        self.micro_batches = 0
        self.non_finite = 0  # sequences left out: their loss or gradient was not finite (an overflowed step)
        self.timer = DeviceTimer(self.layout.device)
        self._handles: list = []
        self._pending: _MicroBatch | None = None
        self._units = 0
        self._taken = np.zeros(m, dtype=np.int64)  # sequences chosen per domain so far, all ranks (the quota)
        self.full = False  # every domain has its quota: the hooks are off for the rest of the window

    @property
    def hook_seconds(self) -> float:
        """Time the hooks took (their device work included), since the window opened."""
        return self.timer.seconds

    def _hold(self, rows: torch.Tensor) -> None:
        """Keep the ``n`` preconditioned validation gradients, and each parameter's view of them."""
        self.rows: torch.Tensor | None = rows  # None once the result is out
        dtype = self.layout.compute_dtype
        self.views = {
            id(p): rows[:, a:b].to(dtype).reshape(len(self.tasks), *p.shape)
            for p, (a, b) in zip(self.layout.params, self.layout.spans)
        }

    # -- checkpoints -----------------------------------------------------------------------------

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What a checkpoint inside the window must keep: JSON-ready facts and this rank's tensors.

        Call between training steps (the last micro-batch's backward has run); :meth:`restore` with
        both continues the window exactly where it stood. A batch the window cannot read is refused here as
        in training (not ``strict``: the window stops, and its state says why), so a checkpoint never fails
        for it.
        """
        self._guarded(self._flush)
        meta = {
            "format": WINDOW_FORMAT, "micro_batches": self.micro_batches, "units": self._units,
            "failure": self.failure, "non_finite": self.non_finite,
            "quota": self.quota, "taken": self._taken.tolist(), "full": self.full,
            "hook_seconds": self.hook_seconds, "validation_seconds": self.validation_seconds,
            "preconditioner": self.preconditioner_name, "preconditioner_used": self.preconditioner_used,
            "fallback": self.fallback, "task_losses": self.task_losses, "parameters": list(self.layout.names),
            "domains": list(self.domain_names), "tasks": list(self.tasks), "rank": self.rank, "world": self.world,
        }
        if self.rows is None:
            raise RuntimeError("this TrainingWindow gave its result and let go of its validation gradients: no state")
        tensors = {"rows": self.rows, "cell": self.stats.cell, "dom": self.stats.dom, "loss_sums": self.loss_sums,
                   "sequences": self.sequences}
        return meta, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    @classmethod
    def restore(cls, model: torch.nn.Module, validation_batches: Batches, domain_names: list[str], meta: dict,
                tensors: dict[str, torch.Tensor], *, show_progress: bool = False,
                strict: bool = True) -> TrainingWindow:
        """The window :meth:`state` described, on this model and these validation batches (not yet attached)."""
        preconditioner = meta.get("preconditioner") if isinstance(meta, dict) else None
        if preconditioner not in ("identity", "adam"):
            raise ValueError(f"the saved training window names preconditioner {preconditioner!r}; it was written by "
                             "another version or has been modified")
        return cls(model, validation_batches, domain_names, preconditioner=preconditioner,
                   show_progress=show_progress, strict=strict, quota=meta.get("quota"), saved=(meta, tensors))

    def _load(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        expected = {"format": WINDOW_FORMAT, "parameters": list(self.layout.names), "domains": list(self.domain_names),
                    "tasks": list(self.tasks), "rank": self.rank, "world": self.world}
        wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
        if wrong:
            raise ValueError(
                f"the saved training window does not belong to this run: {wrong} (saved, now); resume with the same "
                "model, domains, validation tasks and number of processes"
            )
        device = self.layout.device
        self._hold(tensors["rows"].to(device))
        self.stats.cell.copy_(tensors["cell"])
        self.stats.dom.copy_(tensors["dom"])
        self.loss_sums.copy_(tensors["loss_sums"])
        self.sequences.copy_(tensors["sequences"])
        if meta.get("quota") != self.quota:
            raise ValueError(f"the saved training window read {meta.get('quota')} sequences per domain and this run "
                             f"reads {self.quota}; resume with the same tikmix_window_sequences and "
                             "tikmix_probe_sequences")
        self.micro_batches, self._units = int(meta["micro_batches"]), int(meta["units"])
        self.failure, self.non_finite = meta.get("failure"), int(meta.get("non_finite", 0))
        self._taken, self.full = np.asarray(meta["taken"], dtype=np.int64), bool(meta["full"])
        self.timer = DeviceTimer(self.layout.device, float(meta["hook_seconds"]))
        self.validation_seconds = float(meta["validation_seconds"])
        self.preconditioner_used = meta["preconditioner_used"]
        self.fallback, self.task_losses = meta["fallback"], dict(meta["task_losses"])
        self.pass_.task_losses = dict(self.task_losses)

    # -- the hooks -------------------------------------------------------------------------------

    def attach(self, domain_of: Callable[[int, int], tuple[np.ndarray, int]]) -> None:
        """Start collecting from the next training forward (a forward with gradients enabled).

        ``domain_of(k, rows)`` gives the domain ids of every sample of the ``k``-th training micro-step since
        the window opened (all ranks, in stream order) and where this rank's ``rows`` rows start among them.
        """
        if self._handles:
            raise RuntimeError("this TrainingWindow is already attached")
        self._domain_of = domain_of
        if self.full or self.failure is not None:
            return  # a window restored after it had every domain's quota, or had stopped: nothing more to read
        output = output_layer(self.module)
        self._handles.append(self.module.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        self._output = output
        self._names = {id(sub): name for name, sub in self.module.named_modules()}
        for sub in self.module.modules():
            # the output layer is read even when frozen (LoRA): its logits give the loss's scale
            if sub is output or (_covered(sub) and any(id(p) in self.views for p in sub.parameters(recurse=False))):
                self._handles.append(sub.register_forward_hook(self._on_layer))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _refuse(self, error: Exception) -> None:
        """A run the window cannot read: raise (``strict``, one process), or stop reading and keep why in
        ``failure`` (not ``strict``; or ``strict`` with several ranks, where :meth:`close` raises it on all).

        The hooks stay until the next forward: a backward under way may still recompute checkpointed layers,
        which must save what their first forward saved.
        """
        if self.strict and self.world == 1:
            raise error
        if self.failure is None:
            self.failure = str(error)

    def _guarded(self, work, *args) -> None:
        try:
            work(*args)
        except (ValueError, RuntimeError) as error:  # a RuntimeError too: auto must never crash training
            self._refuse(error)

    def _stop(self, error: Exception | None = None) -> None:
        """Before a forward (no backward under way): refuse ``error`` and take the hooks off."""
        if error is not None:
            self._refuse(error)
        self._pending = None
        self.detach()

    def _on_forward(self, module, args, kwargs):
        if self.failure is not None:
            return self._stop()  # stopped in the last micro-batch's backward
        if not torch.is_grad_enabled():
            return None  # evaluation and generation: no backward follows
        labels = kwargs.get("labels")
        if labels is None:
            return self._stop(ValueError(
                "the training window reads the labels from the model's forward, and this training forward got none "
                "(a label smoother or a custom compute_loss pops them); measure with probes "
                "(tikmix_influence_source='probes')"
            ))
        with self.timer.section():  # the hooks' whole cost counts, their bookkeeping included
            rows = int(labels.shape[0])
            try:
                self._flush()
                ids, keep = self._choose(rows)
            except ValueError as error:
                return self._stop(error)
            self.micro_batches += 1
            if keep is not None and keep.numel() == 0:
                if self.full:
                    self.detach()  # every domain has its quota: training runs without hooks from here
                return None
            chosen = rows if keep is None else int(keep.numel())
            self._pending = _MicroBatch(
                rows=chosen, all_rows=rows, keep=keep, ids=ids,
                labels=labels.detach() if keep is None else labels.detach().index_select(0, keep),
                dots=torch.zeros((chosen, len(self.tasks)), dtype=self.layout.compute_dtype, device=self.layout.device),
                positions=int(labels.numel()),
            )
        return None

    def _choose(self, rows: int) -> tuple[np.ndarray, torch.Tensor | None]:
        """This micro-batch's rows to read and their domains: all of them, or those within each domain's quota.

        The choice runs over the whole micro-step in stream order (every rank's rows), so it is the same
        whatever the number of ranks, and every rank keeps the same count.
        """
        every, offset = self._domain_of(self.micro_batches, rows)
        every = np.asarray(every, dtype=np.int64)
        if every.ndim != 1 or not 0 <= offset <= every.size - rows:
            raise RuntimeError(f"domain_of gave {every.shape} ids and offset {offset} for {rows} rows")
        if self.quota is None:
            return every[offset:offset + rows], None
        chosen = np.zeros(every.size, dtype=bool)
        for p, j in enumerate(every.tolist()):
            if self._taken[j] < self.quota:
                chosen[p] = True
                self._taken[j] += 1
        self.full = bool((self._taken >= self.quota).all())
        mine = np.flatnonzero(chosen[offset:offset + rows])
        return every[offset:offset + rows][mine], torch.as_tensor(mine, device=self.layout.device)

    def _on_layer(self, sub, inputs, output):
        pending = self._pending
        if pending is None or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        keep, ids = pending.keep, inputs[0]
        with self.timer.section():  # only the chosen rows' activations are saved
            if output.shape[0] != pending.all_rows:
                if not (isinstance(sub, torch.nn.Embedding) and output.shape[0] == ids.shape[0] == 1):
                    self._refuse(ValueError(
                        f"layer {self._names.get(id(sub), type(sub).__name__)!r} gave {output.shape[0]} rows for a "
                        f"micro-batch of {pending.all_rows} sequences (a layer on tokens gathered from several "
                        "sequences, as mixture-of-experts layers are): the training window reads each layer batch "
                        "first, one row per sequence; measure with probes (tikmix_influence_source='probes')"
                    ))
                    return None
                # a position embedding looked up once for the whole batch (GPT-2's wpe): read it per sequence from
                # its expansion, which training adds to the token embeddings with the same values and gradients
                output = output.expand(pending.all_rows, *output.shape[1:])
                ids = ids.expand(pending.all_rows, *ids.shape[1:])
            if sub is self._output:
                positions = output.numel() // output.shape[-1]
                if positions != pending.positions and self.failure is None:
                    self._refuse(ValueError(
                        f"the model's output layer gave logits for {positions} positions where the labels have "
                        f"{pending.positions} (logits_to_keep, or logits computed for part of the sequence): the "
                        "training window reads the loss's scale from every labelled position's logits; return the "
                        "logits of every position in training, or measure with probes "
                        "(tikmix_influence_source='probes')"
                    ))
                if self.failure is None:
                    pending.logits = _rows_of(output.detach(), keep, pending.all_rows)
            inp = _rows_of(ids.detach(), keep, pending.all_rows)

        def read(grad, inp, sub=sub, pending=pending):
            if self.failure is None:
                with self.timer.section(), torch.no_grad():
                    self._guarded(self._read, sub, pending, _rows_of(grad, keep, pending.all_rows), inp)

        return _Tap.apply(output, inp, read)

    def _read(self, sub, pending: _MicroBatch, grad, inp) -> None:
        """One layer's share of each chosen sequence's dot products, from its output gradient and input."""
        if sub is self._output:
            self._loss_scale(pending, grad)
        pending.dots += self._layer_dots(sub, inp, grad, pending.rows)

    def _layer_dots(self, sub, inp, grad, rows) -> torch.Tensor:
        """``(rows, n)``: each sequence's ``<V_i, its gradient>`` through this layer's parameters.

        Every temporary is bounded by ``_CHUNK_VALUES`` values or the layer's activations, whatever the
        width of the layer's output (a large vocabulary): the gradient is converted to the compute dtype a
        few sequences at a time.
        """
        dtype = self.layout.compute_dtype
        g = grad.reshape(rows, -1, grad.shape[-1])
        dots = torch.zeros((rows, len(self.tasks)), dtype=dtype, device=g.device)
        weight = self.views.get(id(sub.weight))
        bias = self.views.get(id(sub.bias)) if getattr(sub, "bias", None) is not None else None
        if isinstance(sub, torch.nn.Embedding):
            if weight is None:
                return dots
            ids = inp.reshape(rows, -1)
            step = max(1, _CHUNK_VALUES // g[0].numel())
            for lo in range(0, rows, step):
                gc, idc = g[lo:lo + step].to(dtype), ids[lo:lo + step]
                if sub.padding_idx is not None:  # the padding row gets no gradient
                    gc = gc * (idc != sub.padding_idx)[:, :, None]
                for i in range(weight.shape[0]):  # one task at a time: (rows, T, d), the activations' size
                    dots[lo:lo + step, i] += (gc * weight[i][idc]).sum(dim=(1, 2))
            return dots
        a = inp.reshape(rows, -1, inp.shape[-1])
        conv1d = is_conv1d(sub)  # weight (in, out): the transpose of a Linear's
        # The weight as (n, values) where one sequence's gradient of it is small enough to form, else None.
        per_sequence = weight is not None and weight[0].numel() <= _CHUNK_VALUES
        flat = weight.reshape(weight.shape[0], -1) if weight is not None and per_sequence else None
        width = max(g[0].numel(), a[0].numel(), flat.shape[1] if flat is not None else 0)
        step = max(1, _CHUNK_VALUES // width)
        for lo in range(0, rows, step):
            gc, ac = g[lo:lo + step].to(dtype), a[lo:lo + step].to(dtype)
            if flat is not None:
                # G_b^T A_b per sequence (the cost of the layer's weight gradient), then n dot products
                if conv1d:
                    product = torch.einsum("bti,bto->bio", ac, gc)
                else:
                    product = torch.einsum("bto,bti->boi", gc, ac)
                dots[lo:lo + step] += product.reshape(product.shape[0], -1) @ flat.T
            elif weight is not None:
                # A weight too large to form per sequence (a big output layer): sum_t <V_i^T G_bt, A_bt>, task
                # by task, in the activations' size (n times the weight gradient's cost instead of once)
                for i in range(weight.shape[0]):
                    back = gc @ (weight[i].T if conv1d else weight[i])
                    dots[lo:lo + step, i] += (back * ac).sum(dim=(1, 2))
            if bias is not None:
                dots[lo:lo + step] += gc.sum(dim=1) @ bias.T
        return dots

    def _loss_scale(self, pending: _MicroBatch, grad) -> None:
        """Fit ``grad = c (softmax - onehot)`` of the logits: ``c`` per sequence, tokens and losses too.

        With ``p = softmax(z)`` and ``d = p - onehot`` on labelled tokens, the fit needs ``<g, d>`` and
        ``<d, d>`` per token, from vocabulary-wide dot products; they are taken a few tokens at a time, so
        the probabilities and the compute-dtype copies are never the size of the logits.
        """
        logits, rows = pending.logits, pending.rows
        if logits is None:
            raise ValueError(_NO_LOGITS)
        targets = shifted_targets(pending.labels).reshape(-1)
        dtype = self.layout.compute_dtype
        width = logits.shape[-1]
        z_all, g_all = logits.reshape(-1, width), grad.reshape(-1, width)
        gd, dd, loss = (torch.zeros(targets.shape[0], dtype=dtype, device=z_all.device) for _ in range(3))
        gg = 0.0
        step = max(1, _CHUNK_VALUES // width)
        for lo in range(0, targets.shape[0], step):
            z, g = z_all[lo:lo + step].to(dtype), g_all[lo:lo + step].to(dtype)
            target = targets[lo:lo + step]
            on = (target != IGNORE_INDEX).to(dtype)
            safe = target.clamp(min=0)[:, None]
            lse = torch.logsumexp(z, dim=-1)
            z_t = z.gather(-1, safe)[:, 0]
            # the probabilities overwrite z where z is already a copy (logits of another dtype)
            p = z.sub_(lse[:, None]).exp_() if logits.dtype != dtype else (z - lse[:, None]).exp_()
            p_t, g_t = p.gather(-1, safe)[:, 0], g.gather(-1, safe)[:, 0]
            gd[lo:lo + step] = (torch.einsum("nv,nv->n", g, p) - g_t) * on
            dd[lo:lo + step] = (torch.einsum("nv,nv->n", p, p) - p_t * p_t + (1 - p_t) ** 2) * on
            loss[lo:lo + step] = (lse - z_t) * on
            gg += float(torch.dot(g.reshape(-1), g.reshape(-1)))
        num, den = gd.view(rows, -1).sum(dim=1), dd.view(rows, -1).sum(dim=1)
        scale = torch.where(den > 0, num / den.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(num))
        misfit = max(gg - float((num * scale).sum()), 0.0)
        if gg > 0 and math.isfinite(gg) and (misfit / gg) ** 0.5 > LOSS_MISFIT:
            raise ValueError(
                f"the training loss's gradient of the logits differs from the next-token cross-entropy's by "
                f"{(misfit / gg) ** 0.5:.1%} (at most {LOSS_MISFIT:.0%} counts as the same loss): the training window "
                "reads each sequence's gradient scale from that form (a label smoother, z-loss or soft-capped "
                "logits change it); measure with probes (tikmix_influence_source='probes')"
            )
        pending.scale = scale
        pending.tokens = (targets != IGNORE_INDEX).view(rows, -1).sum(dim=1)
        pending.losses = loss.view(rows, -1).sum(dim=1)

    def _flush(self) -> None:
        """Record the last micro-batch, whose backward has run by now, sequence by sequence."""
        pending, self._pending = self._pending, None
        if pending is None or self.failure is not None:
            return
        if pending.logits is None and pending.rows > 0:
            raise ValueError(_NO_LOGITS)
        scale, labelled, summed = pending.scale, pending.tokens, pending.losses
        if scale is None or labelled is None or summed is None:  # _loss_scale sets all three, or none
            return  # a forward with gradients but no backward: nothing to record
        ids = pending.ids
        # The gradients carry the Trainer's scale c; dividing gives those of each sequence's summed loss.
        column = (pending.dots / torch.where(scale != 0, scale, torch.ones_like(scale))[:, None]).double()
        tokens, scales, losses = labelled.tolist(), scale.tolist(), summed.double()
        finite = (torch.isfinite(column).all(dim=1) & torch.isfinite(losses) & torch.isfinite(scale)).tolist()
        for b, (t, c, j) in enumerate(zip(tokens, scales, ids.tolist())):
            if t == 0 or c == 0:
                continue  # no labelled token: no gradient, nothing to record
            if not finite[b]:  # an overflow (a step the loss scaler skips): left out, counted, said at the boundary
                self.non_finite += 1
                continue
            # Sequences alternate between the even and the odd half on every rank.
            self.stats.add(j, self._units, t, column[b], 1)
            self._units += 1
            self.loss_sums[j] += losses[b]
            self.sequences[j] += 1

    def close(self) -> dict[str, dict[str, int]]:
        """Stop collecting; the sequences and labelled tokens each domain contributed, summed over ranks.

        Not ``strict``: when any rank's window could not read its batches, ``failure`` says why on every rank.
        """
        self._guarded(self._flush)
        self.detach()
        self._pending = None
        failed, non_finite = all_reduce(torch.tensor([float(self.failure is not None), float(self.non_finite)],
                                                     device=self.layout.device), self.world).tolist()
        self.non_finite = int(non_finite)
        if failed and self.failure is None:
            self.failure = "another rank's training window could not read its batches (that rank's warning says why)"
        if self.failure is not None and self.strict:
            raise ValueError(self.failure)  # several ranks: every rank raises here, together
        self.stats.reduce(self.world)
        all_reduce(self.loss_sums, self.world)
        all_reduce(self.sequences, self.world)
        tokens = self.stats.dom[0].tolist()
        return {name: {"sequences": int(round(s)), "tokens": int(round(t))}
                for name, s, t in zip(self.domain_names, self.sequences.tolist(), tokens)}

    # -- the result ------------------------------------------------------------------------------

    def result(self, top_up: Mapping[str, list] | None = None, *, seed: int = 0) -> InfluenceResult:
        """``S`` from the window's sequences plus ``top_up`` probe batches (``{domain: batches}``), at the
        current parameters for the probes. Call after :meth:`close`, with the same ``top_up`` on every rank."""
        if self._handles:
            raise RuntimeError("close() the TrainingWindow before asking for its result")
        seen = {n: int(round(s)) for n, s in zip(self.domain_names, self.sequences.tolist())}
        top_up = {str(k): list(v) for k, v in (top_up or {}).items() if list(v)}
        unknown = sorted(set(top_up) - set(self.domain_names))
        if unknown:
            raise ValueError(f"top_up names domains {unknown} that are not among {self.domain_names}")
        probe_tokens = {}
        if top_up:
            probes = batch_sets(top_up, "top_up", "domain", self.layout.device)
            extra = BatchStats(len(self.tasks), len(probes), self.layout.device)
            with measurement_mode(self.module), self.pass_.progress(
                    sum(self.pass_.local_count(d) for d in probes.values())):
                _, loss_sums = self.pass_.stream_domains(probes, self.rows, None, extra)
            self.pass_.reduce_stats(extra)
            for jj, name in enumerate(probes):
                j = self.domain_names.index(name)
                self.stats.cell[..., j] += extra.cell[..., jj]
                self.stats.dom[:, j] += extra.dom[:, jj]
                self.loss_sums[j] += loss_sums[jj]
                probe_tokens[name] = probes[name].tokens
        empty = [name for name, t in zip(self.domain_names, self.stats.dom[0].tolist()) if t == 0]
        if empty:
            raise ValueError(
                f"domains {empty} have no labelled token in the training window and no top-up probes; give them "
                "probe batches in top_up"
            )
        scores = self.stats.scores()
        task_names = list(self.tasks)
        check_finite_scores(scores, task_names, self.domain_names)
        stderr, split_half, note = self.stats.finish(task_names, self.domain_names)
        domain_tokens = {n: int(round(t)) for n, t in zip(self.domain_names, self.stats.dom[0].tolist())}
        totals = {n: BatchSet("domain", n, [], [domain_tokens[n]]) for n in self.domain_names}
        losses = finite_losses(self.loss_sums, totals, " over the training window")
        self.rows = None
        self.views = {}
        return self.pass_.result(
            started=self.started,
            tasks=self.tasks,
            scores=scores,
            task_names=task_names,
            domain_names=list(self.domain_names),
            preconditioner=self.preconditioner_used,
            requested_preconditioner=self.preconditioner_name,
            preconditioner_fallback=self.fallback,
            damping=None,
            projection_dim=None,
            seed=int(seed),
            domain_tokens=domain_tokens,
            domain_losses=losses,
            stderr=stderr,
            split_half=split_half,
            probe_batches=self.stats.batch_counts(self.domain_names),
            uncertainty_note=note,
            window={
                "micro_batches": self.micro_batches,
                "non_finite_sequences": self.non_finite,
                "sequences": seen,
                "probe_tokens": probe_tokens,
                "validation_seconds": self.validation_seconds,
                "hook_seconds": self.hook_seconds,
                "parameters": self.layout.total,
            },
        )


def output_layer(module: torch.nn.Module) -> torch.nn.Linear:
    """The model's output layer (``get_output_embeddings()``), whose logits give the loss's scale."""
    get_output = getattr(module, "get_output_embeddings", None)
    output = get_output() if get_output is not None else None
    if not isinstance(output, torch.nn.Linear):
        raise ValueError(
            f"the training window needs the model's output layer as an nn.Linear (get_output_embeddings(), got "
            f"{type(output).__name__}) to read the loss's scale from the logits; measure with probes "
            "(tikmix_influence_source='probes')"
        )
    return output


def _rows_of(tensor: torch.Tensor, keep: torch.Tensor | None, rows: int) -> torch.Tensor:
    """The chosen sequences of a layer's input, output or output gradient (``rows`` sequences, batch first or
    flattened over the tokens); all of it when ``keep`` is ``None``."""
    if keep is None:
        return tensor
    return tensor.reshape(rows, -1, tensor.shape[-1]).index_select(0, keep)
