"""Process-group helpers shared by the influence engine, the mixers and the callback.

Every collective here is a no-op in a single process, so the same code runs unchanged in a
notebook, under ``torchrun`` and inside an accelerate-launched Trainer.

Inside :func:`collectives` (the callback opens one around each thing it does that talks to the
other ranks), :func:`all_reduce` and :func:`agree` run on a process group whose timeout is the
scope's, and a collective that fails, because another rank died or stopped answering, raises
:class:`LostRankError` naming what TiKMiX was doing, the ranks that may be lost and the fix.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

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


class LostRankError(RuntimeError):
    """A collective of TiKMiX failed: another rank died, or stopped answering within the scope's timeout."""


@dataclass(frozen=True)
class _Scope:
    what: str  # what TiKMiX is doing, e.g. "stage 2 (step 10): measuring S"
    group: Any  # the process group of its collectives (None: the default group)
    timeout: float | None  # its timeout in seconds (None: the default group's)
    option: str  # the option that sets the timeout, for the message


_SCOPE: ContextVar[_Scope | None] = ContextVar("tikmix_collectives", default=None)
_GROUPS: dict[float, tuple[Any, Any]] = {}  # timeout -> (the default group it was made under, the group)
# Let go of the groups while the interpreter still runs: a gloo group freed in its final teardown can abort
# the process ("terminate called without an active exception") after all its work is done.
atexit.register(_GROUPS.clear)


def bounded_group(timeout: float | None):
    """A process group of every rank whose collectives give up after ``timeout`` seconds.

    ``None`` (one process, or no timeout): the default group. The group is made once per default group
    and timeout; making it is itself a collective, so every rank must call this at the same point.
    """
    if timeout is None or rank_and_world()[1] == 1:
        return None
    default = torch.distributed.group.WORLD
    made = _GROUPS.get(float(timeout))
    if made is None or made[0] is not default:
        made = (default, torch.distributed.new_group(timeout=timedelta(seconds=float(timeout))))
        _GROUPS[float(timeout)] = made
    return made[1]


@contextlib.contextmanager
def collectives(what: str, timeout: float | None, *, option: str = "tikmix_collective_timeout") -> Iterator[None]:
    """Run the collectives of :func:`all_reduce` and :func:`agree` inside on a group that waits at most
    ``timeout`` seconds (:func:`bounded_group`), and name ``what`` when one fails."""
    token = _SCOPE.set(_Scope(what, bounded_group(timeout), timeout, option))
    try:
        yield
    finally:
        _SCOPE.reset(token)


@contextlib.contextmanager
def _reported(operation: str) -> Iterator[Any]:
    """Yield the scope's group; turn a failure of the collective into a :class:`LostRankError`."""
    scope = _SCOPE.get()
    started = time.monotonic()
    try:
        yield None if scope is None else scope.group
    except RuntimeError as err:  # DistBackendError, gloo's "Connection closed by peer", a timeout
        raise LostRankError(lost_rank_message(operation, scope, time.monotonic() - started, err)) from err


def lost_rank_message(operation: str, scope: _Scope | None, waited: float, err: BaseException) -> str:
    """What a rank says when one of TiKMiX's collectives fails: what, where, which ranks, the bound, the fix."""
    rank, world = rank_and_world()
    others = [r for r in range(world) if r != rank]
    suspects = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {others}"
    what = scope.what if scope is not None else "a TiKMiX collective outside the callback"
    if scope is not None and scope.timeout is not None:
        bound = f"TiKMiX waits at most {scope.option}={scope.timeout:g} s in its own collectives"
    else:
        bound = "this collective waits as long as the process group's timeout (TrainingArguments.ddp_timeout)"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"TiKMiX lost contact with {suspects} in the {operation} of {what}: rank {rank} of {world} gave up after "
        f"{waited:.1f} s ({reason}). That rank died or stopped answering (killed, out of memory, preempted, "
        f"frozen); {bound}. Nothing of this stage was written: history.json and the checkpoints hold the stages "
        "before it. Restart every rank and resume from the last complete checkpoint "
        "(tikmix_hf.history.latest_checkpoint(output_dir))"
    )


def all_reduce(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (nothing to do with one rank); returns it."""
    if world_size > 1:
        with _reported("all-reduce") as group:
            torch.distributed.all_reduce(tensor, group=group)
    return tensor


def agree(values: list) -> list:
    """Rank 0's ``values`` on every rank, so that values every rank computed agree to the bit."""
    if rank_and_world()[1] > 1:
        box = [values]
        with _reported("broadcast") as group:
            torch.distributed.broadcast_object_list(box, src=0, group=group)
        return box[0]
    return values


def fsdp_types() -> tuple[type, ...]:
    """The FSDP module classes this torch provides (FSDP1 and FSDP2)."""
    types: list[type] = []
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


def unwrap(model: torch.nn.Module, *, sharded: bool = False) -> torch.nn.Module:
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
