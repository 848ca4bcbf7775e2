"""Which parameters the influence engine differentiates, laid end to end in one flat index space."""

from __future__ import annotations

import torch


class ParameterLayout:
    """The selected parameters laid end to end: parameter ``t`` owns ``[spans[t][0], spans[t][1])``.

    ``dtype`` is the dtype of the gradient-sized buffers; ``compute_dtype`` (float32 or wider) is
    the dtype in which dot products, projections and preconditioners are evaluated.

    ``pieces`` are the tensors the flat index space covers: the parameters themselves, or with
    ``local`` (a sharded model) this rank's flattened piece of each, so that every size, span and
    buffer is per rank.
    """

    def __init__(self, names, params, buffer_dtype=None, local=None):
        self.names, self.params = list(names), list(params)
        self.pieces = self.params if local is None else [local(p) for p in self.params]
        self.spans, start = [], 0
        for p in self.pieces:
            self.spans.append((start, start + p.numel()))
            start += p.numel()
        self.total = start
        self.offsets = [s for s, _ in self.spans] + [self.total]
        devices = {p.device for p in self.pieces}
        if len(devices) > 1:
            raise ValueError(
                f"the selected parameters are spread over {sorted(map(str, devices))}; group_influence "
                f"needs them on one device (restrict param_filter to one device, or run data parallel "
                f"instead of a device_map)"
            )
        self.device = devices.pop()
        widest = max((p.dtype for p in self.pieces), key=lambda d: d.itemsize)
        if buffer_dtype is None:
            # Gradient-sized buffers; float16's range cannot hold sums of squared gradients.
            buffer_dtype = widest if widest != torch.float16 else torch.float32
        if not isinstance(buffer_dtype, torch.dtype) or not buffer_dtype.is_floating_point:
            raise ValueError(f"buffer_dtype must be a floating torch.dtype or None, got {buffer_dtype!r}")
        self.dtype = buffer_dtype
        self.compute_dtype = torch.promote_types(buffer_dtype, torch.float32)
        self.gradient_bytes = sum(p.numel() * p.element_size() for p in self.pieces)
        self.largest = max(p.numel() for p in self.pieces)
        self.converts = any(p.dtype != buffer_dtype for p in self.pieces)

    @classmethod
    def select(cls, module, param_filter, buffer_dtype=None, local=None):
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(
                f"{type(module).__name__} has no parameter with requires_grad=True, so there is no "
                f"gradient to measure influence with; unfreeze the parameters to score "
                f"(e.g. p.requires_grad_(True))"
            )
        keep = filter_predicate(param_filter)
        chosen = [(n, p) for n, p in trainable if keep(n, p)]
        if not chosen:
            raise ValueError(
                f"param_filter={param_filter!r} kept none of the {len(trainable)} trainable parameters (e.g. "
                f"{trainable[0][0]!r}); loosen it"
            )
        return cls([n for n, _ in chosen], [p for _, p in chosen], buffer_dtype, local)

    @classmethod
    def by_names(cls, module, names, buffer_dtype, local=None):
        available = dict(module.named_parameters())
        params = []
        for name in names:
            if name not in available:
                raise ValueError(
                    f"parameter {name!r} of the influence result is not in this model; pass the model that "
                    f"group_influence measured"
                )
            params.append(available[name])
        return cls(names, params, buffer_dtype, local)


def filter_predicate(param_filter):
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
