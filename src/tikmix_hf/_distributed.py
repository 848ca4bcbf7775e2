"""Process-group helpers shared by the influence engine, the mixers and the callback.

Every collective here is a no-op in a single process, so the same code runs unchanged in a
notebook, under ``torchrun`` and inside an accelerate-launched Trainer.
"""

from __future__ import annotations

import os

import torch


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when there is none."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_launcher_main() -> bool:
    """Rank 0 as the launcher sets it (``RANK``), usable before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def all_reduce(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (nothing to do with one rank); returns it."""
    if world_size > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def agree(values: list) -> list:
    """Rank 0's ``values`` on every rank, so that values every rank computed agree to the bit."""
    if rank_and_world()[1] > 1:
        box = [values]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return values


def fsdp_types() -> tuple:
    """The FSDP module classes this torch provides (FSDP1 and FSDP2)."""
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


def unwrap(model, *, sharded: bool = False):
    """The module to differentiate: DDP is unwrapped (its reducer only arms in ``DDP.forward``).

    With ``sharded=True`` (the influence engine, which computes on local shards) FSDP models are
    returned as they are, since their forward must run through the FSDP modules; otherwise they are
    refused with an error that says what to do instead. DeepSpeed engines are always refused.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)  # torch.compile: measure through the eager module it wraps
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "DeepSpeed engines are not supported: this model's parameters are partitioned by ZeRO-3 (they carry "
            "ds_id), and ZeRO-3 gathers and reduces them in its own hooks and buffers. Train with FSDP "
            "(accelerate: distributed_type FSDP), which the influence engine supports, or measure on a DDP or "
            "single-process copy of the model."
        )
    if any(cls.__name__ == "DeepSpeedEngine" for cls in type(model).__mro__):
        raise ValueError(
            "DeepSpeed engines are not supported: ZeRO partitions gradients and optimizer state into its own "
            "buffers. Compute influence on a DDP or single-process copy of the model, or train with FSDP."
        )
    if torch.distributed.is_available():
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            model = model.module
        if sharded:
            return model
        fsdp = fsdp_types()
        for name, sub in model.named_modules():
            if fsdp and isinstance(sub, fsdp):
                raise ValueError(
                    f"FSDP is not supported here (module {name or '<root>'!r} is {type(sub).__name__}): "
                    f"parameters are sharded and this measurement needs them whole. Use DDP or a single "
                    f"process (group_influence and lookahead_gain do accept FSDP models)."
                )
        from torch.distributed.tensor import DTensor

        for name, p in model.named_parameters():
            if isinstance(p, DTensor):
                raise ValueError(
                    f"parameter {name!r} is a sharded DTensor (FSDP2 / tensor parallel), which is not "
                    f"supported here; use DDP or a single process"
                )
    return model


def measured_module(model, wrapped=None):
    """The module to measure through: ``wrapped`` when it is an FSDP1 wrapper, else ``model``.

    The Trainer hands callbacks the model inside an FSDP1 wrapper, whose parameters are shards that only
    the wrapper's forward gathers; FSDP2 and DDP models are handed over as they are.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return model
    return wrapped if isinstance(wrapped, FullyShardedDataParallel) else model
