"""The next-token loss every measurement uses, and the mode it is measured in.

One definition of "the loss of a batch" for the influence engine, the baseline mixers and the
demo's evaluation: the summed cross-entropy of every labelled next token (labels ``-100``
ignored, Hugging Face's causal-LM shift). Means over a domain or task divide these sums by the
total number of labelled tokens, so they are means over tokens, not means of batch means.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import random
from collections.abc import Iterator, Mapping
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def forward_extras(module: torch.nn.Module) -> dict[str, Any]:
    """Keyword arguments every measuring forward passes: no KV cache (eval-mode HF models build one), and the
    logits of every position (``logits_to_keep=0``, whatever the model's default)."""
    parameters = inspect.signature(module.forward).parameters
    extras: dict[str, Any] = {"use_cache": False} if "use_cache" in parameters else {}
    if "logits_to_keep" in parameters:
        extras["logits_to_keep"] = 0
    return extras


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """The target of every position: the next label, ``IGNORE_INDEX`` after the last."""
    # Padding on the right and dropping the first label is HF's shift; it keeps the logits a view.
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def labelled_targets(labels: torch.Tensor) -> torch.Tensor:
    """Number of labelled next-token targets of a batch (a 0-d tensor, no host sync)."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def _logits(module: torch.nn.Module, batch: Mapping, extras: Mapping) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels" and k not in extras}
    output = module(**inputs, **extras)
    if isinstance(output, Mapping):
        logits = output.get("logits")
    else:
        logits = getattr(output, "logits", output[0] if isinstance(output, (tuple, list)) and output else output)
    if not isinstance(logits, torch.Tensor) or logits.ndim < 2:
        keys = list(output) if isinstance(output, Mapping) else type(output).__name__
        raise ValueError(
            f"{type(module).__name__}'s forward without labels returned no logits (it returned {keys}): TiKMiX "
            "measures each token's loss from the logits, so a model whose forward returns only its loss (a fused "
            "cross-entropy kernel) cannot be measured; return the logits when no labels are given (Liger's kernels "
            "do), or mix without measuring (tikmix_solver static or replay)"
        )
    labels = batch.get("labels")
    if labels is not None and logits.numel() // logits.shape[-1] != labels.numel():
        raise ValueError(
            f"{type(module).__name__}'s forward gave logits for {logits.numel() // logits.shape[-1]} positions where "
            f"the batch has {labels.numel()} labels (logits_to_keep, or logits of part of the sequence): TiKMiX "
            "needs the logits of every position; return them when no labels are given"
        )
    return logits.reshape(-1, logits.shape[-1])


def summed_token_loss(module: torch.nn.Module, batch: Mapping, extras: Mapping | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled targets of one batch.

    ``extras`` are extra forward keywords (default :func:`forward_extras`); pass them in when calling
    in a loop, since reading the forward signature costs more than a tiny model's forward.
    """
    logits = _logits(module, batch, forward_extras(module) if extras is None else extras)
    if logits.dtype.itemsize < 4:
        logits = logits.float()
    targets = shifted_targets(batch["labels"]).reshape(-1)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def token_losses(module: torch.nn.Module, batch: Mapping, extras: Mapping | None = None) -> torch.Tensor:
    """Next-token cross-entropy of every labelled target of ``batch`` (flat, float64)."""
    logits = _logits(module, batch, forward_extras(module) if extras is None else extras)
    targets = shifted_targets(batch["labels"]).reshape(-1)
    losses = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=IGNORE_INDEX)
    return losses[targets != IGNORE_INDEX].double()


def _rng_state():
    cuda_live = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda = torch.cuda.get_rng_state_all() if cuda_live else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _restore_rng(state) -> None:
    cpu, cuda, python, numpy_state = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)
    np.random.set_state(numpy_state)


def _reentrant(func) -> bool:
    # Hugging Face keeps ``partial(checkpoint, **kwargs)``; torch's checkpoint is reentrant unless told otherwise.
    return isinstance(func, functools.partial) and func.keywords.get("use_reentrant", True) is not False


def reentrant_checkpointing(module: torch.nn.Module) -> bool:
    """Whether ``module`` (a Hugging Face model) checkpoints its layers with reentrant checkpointing.

    A reentrant checkpoint runs the layers' forward without gradients and again inside the backward, so
    hooks on the training forward cannot read the layers (the training window), and
    ``torch.autograd.grad`` cannot differentiate through it (:func:`measurement_mode` switches it off).
    """
    return any(getattr(m, "gradient_checkpointing", False) is True
               and _reentrant(getattr(m, "_gradient_checkpointing_func", None)) for m in module.modules())


@contextlib.contextmanager
def measurement_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Dropout off, checkpointing kept (non-reentrant), and every mode flag and RNG stream restored on exit.

    Switching the whole model to eval would silently disable gradient checkpointing in Hugging
    Face models (layers checkpoint only when ``self.training``). So when checkpointing is on, the
    modules that gate it keep their mode and every other module (``nn.Dropout``, and attention
    modules that drop out functionally on ``self.training``) is set to eval. The flags are set
    directly, not through ``.train()``, so that restoring them is exact. Reentrant checkpointing,
    which ``torch.autograd.grad`` cannot differentiate through, checkpoints non-reentrantly while the
    measurement runs (the same recompute, the same values). ``None`` entries are skipped.
    """
    present = [module for module in modules if module is not None]
    modes = [(m, m.training) for module in present for m in module.modules()]
    # torch types a module's unknown attribute as a Tensor or a Module; this one is a partial (see _reentrant),
    # and the module is kept as Any so that the partial can be written back.
    funcs: list[tuple[Any, functools.partial]] = [
        (m, cast(functools.partial, m._gradient_checkpointing_func)) for module in present for m in module.modules()
        if _reentrant(getattr(m, "_gradient_checkpointing_func", None))]
    rng = _rng_state()
    try:
        for module in present:
            checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())
            for m in module.modules():
                if not (checkpointing and getattr(m, "gradient_checkpointing", False) is True):
                    m.training = False
        for m, func in funcs:
            m._gradient_checkpointing_func = functools.partial(func.func, *func.args,
                                                               **{**func.keywords, "use_reentrant": False})
        yield
    finally:
        for m, training in modes:
            m.training = training
        for m, func in funcs:
            m._gradient_checkpointing_func = func
        _restore_rng(rng)
