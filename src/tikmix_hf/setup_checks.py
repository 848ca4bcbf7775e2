"""What a run's training set-up lets the training window read, found where the setting is first visible.

The training window (:mod:`tikmix_hf.influence.window`) reads the training forward and backward in hooks.
Some set-ups hide them from it or change what it reads. Each is found as early as it can be seen:

- when training starts, from the arguments and the model: ``torch_compile`` (the compiled graph runs
  without the hooks), reentrant activation checkpointing (the layers run without gradients, then again
  inside the backward), FSDP sharding, a label smoother or a ``compute_loss_func`` (the forward gets
  no labels), an output layer that is not an ``nn.Linear``, no layer the hooks can read;
- at the first training forward, by hooks that come off after it: a fused linear cross-entropy that
  never calls the output layer (Liger's kernels, a forward returning only the loss), logits of part
  of the sequence (``logits_to_keep``), rows that pack several examples (``DataCollatorWithFlattening``).

With ``tikmix_influence_source="auto"`` the run then measures with probes, with a warning that names the
setting and its fix; with ``"training"`` it stops with that message. :func:`check_window_setup` is the
entry point; it knows nothing of the Trainer beyond the attributes it reads.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch

from ._distributed import rank_and_world, unwrap
from ._loss import reentrant_checkpointing
from .influence.sharding import sharding_of
from .influence.window import covered_parameters, output_layer

__all__ = ["FirstForward", "check_window_setup", "setup_obstacle"]

_PROBES = "measure with probes (tikmix_influence_source='probes')"


def _compiled(module: Any) -> bool:
    return module is not None and (hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None)
                                   is not None)


def setup_obstacle(model: torch.nn.Module, trainer: Any = None) -> str | None:
    """Why the training window cannot read this run, as far as the model and ``trainer`` tell before a step."""
    args = getattr(trainer, "args", None)
    if getattr(args, "torch_compile", False) or _compiled(model) or _compiled(getattr(trainer, "model_wrapped", None)):
        return ("torch_compile=True (or a torch.compile'd model): the compiled graph runs without the training "
                "window's hooks, so the window would read no sequence; set torch_compile=False to measure in the "
                f"training window, or {_PROBES} (probes run the eager model, which shares the compiled one's weights)")
    module = unwrap(model, sharded=True)
    if reentrant_checkpointing(module):
        return ("reentrant activation checkpointing (use_reentrant=True) runs the layers' forward without gradients "
                "and again inside the backward, where the window's hooks cannot read them; enable checkpointing with "
                "activation_checkpointing_kwargs={'use_reentrant': False} (gradient_checkpointing_kwargs in older "
                f"transformers; the default), or {_PROBES}")
    if getattr(trainer, "label_smoother", None) is not None or getattr(trainer, "compute_loss_func", None) is not None:
        what = ("label_smoothing_factor=" + str(getattr(args, "label_smoothing_factor", "?"))
                if getattr(trainer, "label_smoother", None) is not None else "compute_loss_func")
        return (f"{what}: the Trainer takes the labels out of the model's forward, where the training window reads "
                f"them, and the loss is not the token cross-entropy whose scale it reads; {_PROBES}")
    try:
        if sharding_of(module, rank_and_world()[1]) is not None:
            return ("FSDP shards the parameters, and the window's hooks need each layer's whole validation "
                    f"gradient; {_PROBES}, which measure on the shards")
        output_layer(module)
    except ValueError as error:
        return str(error)
    if not covered_parameters(module):
        return f"{type(module).__name__} has no trainable nn.Linear, nn.Embedding or Conv1D parameter; {_PROBES}"
    return None


class FirstForward:
    """Hooks that read the first training forward (gradients on, labels given) and come off after it.

    ``found(reason)`` is called when that forward shows the window cannot read the run: its rows are not
    ``rows`` mixture examples each, or the output layer was not called on every labelled position.
    """

    _active: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its watch (one at a time)

    def __init__(self, module: torch.nn.Module, output: torch.nn.Module, rows: int, found):
        previous = self._active.get(module)
        if previous is not None:
            previous.remove()  # a watch an earlier train() call left on the model
        self._active[module] = self
        self.rows, self.found = rows, found
        self.labels, self.packed, self.positions = None, False, None
        self.handles = [module.register_forward_pre_hook(self._before, with_kwargs=True),
                        output.register_forward_hook(self._output),
                        module.register_forward_hook(self._after, with_kwargs=True)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _before(self, module, args, kwargs):
        labels = kwargs.get("labels")
        if labels is not None and torch.is_grad_enabled() and self.labels is None:
            self.labels, self.packed = labels, kwargs.get("position_ids") is not None

    def _output(self, module, inputs, output):
        if self.labels is not None and isinstance(output, torch.Tensor):
            self.positions = output.numel() // output.shape[-1]

    def _after(self, module, args, kwargs, output):
        if self.labels is None:
            return
        self.remove()
        reason = self.obstacle(self.labels, self.positions, self.packed)
        self.labels = None
        if reason is not None:
            self.found(reason)

    def obstacle(self, labels: torch.Tensor, positions: int | None, packed: bool) -> str | None:
        rows = int(labels.shape[0])
        if rows != self.rows:
            what = ("a collator that packs several examples into one row with position_ids "
                    "(DataCollatorWithFlattening)" if packed and rows < self.rows else
                    "a collator that packs or splits examples")
            return (f"the first training micro-batch has {rows} rows where the stream gives each rank {self.rows} "
                    f"examples ({what}): the training window reads one row per mixture example; pad instead "
                    f"(DataCollatorWithPadding, or a collator that keeps one example per row), or {_PROBES}")
        if positions is None:
            return ("the training forward never called the model's output layer (get_output_embeddings()): a fused "
                    "linear cross-entropy (Liger's kernels, use_liger_kernel=True) or a forward that returns only "
                    "the loss computes the loss without the logits, from which the training window reads each "
                    f"sequence's gradient scale; turn the fused loss off to measure in the training window, or "
                    f"{_PROBES}, which call the model without labels")
        if positions != labels.numel():
            return (f"the output layer gave logits for {positions} positions where the labels have {labels.numel()} "
                    "(logits_to_keep, or logits of part of the sequence): the training window reads the loss's scale "
                    f"from every labelled position's logits; return every position's logits in training, or {_PROBES}")
        return None


def check_window_setup(windows: Any, model: torch.nn.Module, trainer: Any, geometry: Any) -> FirstForward | None:
    """Check, when training starts, that the window can read this run; watch its first training forward.

    ``windows`` is the run's :class:`~tikmix_hf.influence.window_lifecycle.WindowLifecycle` (nothing to do
    when it measures with probes), ``geometry`` its :class:`~tikmix_hf.loader.LoaderGeometry`. Where the
    window cannot read the run, ``strict`` raises ``ValueError`` and ``auto`` falls back to probes with a
    warning, now or at the first training forward.
    """
    if windows.source != "training":
        return None

    def found(reason: str) -> None:
        if windows.strict:
            raise ValueError(f"tikmix_influence_source='training': {reason}")
        warnings.warn(f"TiKMiX: {windows.fall_back(reason)}", stacklevel=2)

    reason = setup_obstacle(model, trainer)
    if reason is not None:
        found(reason)
        return None
    module = unwrap(model, sharded=True)
    return FirstForward(module, output_layer(module), geometry.rows_per_rank(rank_and_world()[1]), found)
