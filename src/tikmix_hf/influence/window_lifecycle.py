"""A run's training windows from the outside: when each opens, the one open now, its checkpoint file,
and the fall-back to probes.

A :class:`~tikmix_hf.influence.TrainingWindow` measures one boundary's ``S`` from the training
micro-batches of the steps before it. Around it, a run needs to open one at the planned step,
close it at its boundary, keep it in a checkpoint taken inside it (the validation gradients once,
each rank's sums in a file of its own, safetensors files of the checkpoint folder), restore it on
resume (on another number of ranks or micro-steps too), and, where the window cannot
read this run and the user allowed it (``tikmix_influence_source="auto"``), measure with probes
from then on and say why. :class:`WindowLifecycle` is that; it knows nothing of the Trainer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from .._distributed import all_reduce, rank_and_world
from .._io import load_tensors, save_tensors_atomic
from .checks import Batches
from .window import TrainingWindow

__all__ = ["WINDOW_FILE", "WINDOW_GRADIENTS", "WindowLifecycle"]

#: A checkpoint taken inside a training window keeps each rank's sums in this file of the checkpoint folder (and
#: the validation gradients once, in :data:`WINDOW_GRADIENTS`).
WINDOW_FILE = "tikmix_window-rank{rank}.safetensors"


class WindowLifecycle:
    """The training windows of one run.

    Args:
        source: where the run measures ``S``: ``"training"`` (windows) or ``"probes"`` (none).
        strict: ``True`` when the user asked for the window (``tikmix_influence_source="training"``): a run
            the window cannot read raises; ``False`` (``auto``) falls back to probes with a note.
        preconditioner: ``"identity"`` or ``"adam"``.
        quota: the sequences of each domain a window reads, all ranks together (``None``: every one).
    """

    def __init__(self, source: str, *, strict: bool, preconditioner: str, quota: int | None = None) -> None:
        self.source = source
        self.quota = quota
        self.strict = bool(strict)
        self.preconditioner = preconditioner
        self.opens: dict[int, int] = {}  # step at whose start a window opens -> the boundary it measures for
        self.window: TrainingWindow | None = None
        self.opened_at = 0  # the step at whose start the open window opened
        self.lost: str | None = None  # why the window a checkpoint was taken inside could not be continued

    def plan(self, opens: Mapping[int, int]) -> None:
        """The windows to open, ``{step: boundary}``; none when the run measures with probes."""
        self.opens = dict(opens) if self.source == "training" else {}

    def due(self, step: int) -> bool:
        """Whether a window opens at the start of ``step``."""
        return step in self.opens and self.window is None

    def open(self, step: int, model: torch.nn.Module, validation_batches: Batches, domains: list[str],
             optimizer: torch.optim.Optimizer | None,
             domain_of: Callable[[int, int], tuple[np.ndarray, int]], *, show_progress: bool) -> str | None:
        """Measure the validation gradients now and hook the coming training micro-batches.

        Returns a note when the window cannot read this run and the run falls back to probes.
        """
        try:
            window = TrainingWindow(model, validation_batches, domains, preconditioner=self.preconditioner,
                                    optimizer=optimizer, show_progress=show_progress, strict=self.strict,
                                    quota=self.quota)
            window.attach(domain_of)
        except ValueError as error:  # this model cannot be read in hooks (FSDP, no nn.Linear output layer, ...)
            if self.strict:
                raise
            return self.fall_back(str(error))
        self.window, self.opened_at = window, step
        return None

    def close(self) -> tuple[tuple[TrainingWindow, dict] | None, str | None]:
        """The window of this boundary, closed, with what each domain contributed; or why there is none."""
        window, self.window = self.window, None
        lost, self.lost = self.lost, None
        if window is None:
            if self.source != "training":
                return None, None
            why = lost or "the run was resumed from a checkpoint inside it without its window file"
            return None, (f"no training window was open before this boundary ({why}): this stage was measured with "
                          "probes")
        counts = window.close()
        if window.failure is not None:
            return None, self.fall_back(window.failure) + " (this stage included)"
        if window.non_finite:
            return (window, counts), (f"the training window left out {window.non_finite} sequences whose loss or "
                                      "gradient was not finite (an overflowed step); S is measured on the others")
        return (window, counts), None

    def fall_back(self, why: str) -> str:
        """Probes from now on (the window cannot measure this run); the note to show."""
        self.source, self.opens = "probes", {}
        return f"the training window cannot measure this run ({why}): TiKMiX measures with probes instead"

    def drop(self) -> None:
        """Unhook a window left open (a stopped or failed run)."""
        if self.window is not None:
            self.window.detach()
            self.window = None

    # -- checkpoints -------------------------------------------------------------------------------

    def state(self) -> dict | None:
        """JSON for the callback's checkpoint state: the open window's start, or ``None``."""
        return None if self.window is None else {"opened_at": self.opened_at}

    def save(self, folder: str) -> None:
        """Keep the open window in ``folder``: its validation gradients once (rank 0), each rank's sums beside them.

        The ``n x P`` validation gradients are the same on every rank (all-reduced when the window opened),
        so one copy serves them all; each rank's file holds only its ``O(n m)`` sums.
        """
        if self.window is None:
            return
        meta, tensors = self.window.state()
        rank, world = rank_and_world()
        info = {"tikmix": json.dumps(meta), "opened_at": str(self.opened_at), "world": str(world)}
        parts = [(WINDOW_FILE.format(rank=rank), {k: v for k, v in tensors.items() if k != "rows"})]
        if rank == 0:
            parts.insert(0, (WINDOW_GRADIENTS, {"rows": tensors["rows"]}))
        for name, part in parts:
            path = os.path.join(folder, name)
            try:
                save_tensors_atomic(path, part, info)
            except OSError as err:
                raise OSError(
                    f"TiKMiX could not write the training window's state to {path} ({err}); nothing half-written "
                    f"is left, but checkpoint {folder} lacks it: a resume from it measures this stage with probes "
                    "(the checkpoint before it continues exactly). Free disk space or fix the folder's "
                    "permissions, then resume"
                ) from err

    def restore(self, folder: str, saved: Mapping[str, Any] | None, model: torch.nn.Module,
                validation_batches: Batches, domains: list[str],
                domain_of_from: Callable[[int], Callable[[int, int], tuple[np.ndarray, int]]], *,
                step: int, micro_steps: int, show_progress: bool, saved_source: str | None) -> str | None:
        """Continue the window a checkpoint in ``folder`` (taken after optimizer step ``step``) was taken inside;
        a note when it cannot, and the coming stage is then measured with probes.

        Every rank reads the shared validation gradients and its own sums; a run on another number of ranks
        adds the saved ranks' sums up on rank 0 (they are sums over sequences, whichever rank read them), and
        another number of micro-steps per step (``micro_steps``, at the same global batch) maps the window's
        micro-batches onto the stream by position. A file missing or damaged on any rank sends every rank to
        probes together: the ranks agree on that before any other collective.
        """
        if saved_source == "probes" and self.source == "training":
            self.source, self.opens = "probes", {}  # the saved run had fallen back to probes
        if not saved:
            return None
        rank, world = rank_and_world()
        opened_at = int(saved["opened_at"])
        try:
            if not 0 <= opened_at <= step:
                raise ValueError(f"the window opened at step {opened_at}, after the checkpoint's step {step}")
            window = TrainingWindow.restore(model, validation_batches, domains, *_read_window(folder, rank, world),
                                            show_progress=show_progress, strict=self.strict)
            problem = None
        except FileNotFoundError as err:
            window, problem = None, f"its window state is not at {err.filename}"
        except _DAMAGED as err:
            window, problem = None, f"its window state in {folder} is damaged or belongs to another run ({err})"
        device = next(model.parameters()).device  # NCCL reduces only device tensors
        failed = int(all_reduce(torch.tensor([float(problem is not None)], device=device), world).item())
        if failed or window is None:  # (no window here: this rank's problem is among the failed)
            absent = [WINDOW_FILE.format(rank=r) for r in range(world)
                      if not os.path.isfile(os.path.join(folder, WINDOW_FILE.format(rank=r)))]
            problem = problem or (f"another rank could not read its part ({', '.join(absent)} not in {folder})" if
                                  absent else "another rank could not read its part (that rank's warning says why)")
            self.lost = f"{problem}, on {failed} of {world} ranks"
            return (f"the checkpoint was taken inside a training window but {self.lost}: the coming stage is "
                    "measured with probes")
        # the k-th micro-batch the window counts from now on is the (step - opened_at) * micro_steps + j-th since
        # it opened, whatever the micro-batches of the run that saved it
        offset = (step - opened_at) * micro_steps - window.micro_batches
        reader = domain_of_from(opened_at)
        window.attach(lambda k, rows: reader(k + offset, rows))
        self.window, self.opened_at = window, opened_at
        return None


#: The validation gradients of a window a checkpoint was taken inside, written once (by rank 0).
WINDOW_GRADIENTS = "tikmix_window.safetensors"
_SUMS = ("cell", "dom", "loss_sums", "sequences")
_DAMAGED = (ValueError, KeyError, TypeError, IndexError, RuntimeError, OSError, SafetensorError)


def _read_window(folder: str, rank: int, world: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The metadata and tensors of this rank's part of a saved window, from a run of any number of ranks.

    Raises ``FileNotFoundError`` (naming the file) when a part is missing; any error of :data:`_DAMAGED`
    when one is damaged.
    """
    shared = os.path.join(folder, WINDOW_GRADIENTS)
    if not os.path.isfile(shared):
        raise FileNotFoundError(2, "no such file", shared)
    rows, info = load_tensors(shared)
    saved_world = int(info["world"])
    if saved_world == world:
        parts = [rank]
    else:  # rank 0 takes every saved rank's sums, the others none
        parts = list(range(saved_world)) if rank == 0 else [0]
    sums: dict[str, torch.Tensor] = {}
    meta: dict = {}
    for r in parts:
        path = os.path.join(folder, WINDOW_FILE.format(rank=r))
        if not os.path.isfile(path):
            raise FileNotFoundError(2, "no such file", path)
        tensors, part_info = load_tensors(path)
        part = json.loads(part_info["tikmix"])
        if r == parts[0]:
            meta = dict(part)
        else:
            meta["units"] += int(part["units"])
        for key in _SUMS:
            sums[key] = sums[key] + tensors[key] if key in sums else tensors[key]
    if saved_world != world and rank != 0:
        sums = {key: torch.zeros_like(value) for key, value in sums.items()}
        meta["units"] = 0
    meta["rank"], meta["world"] = rank, world
    _check_counts(meta, sums)
    return meta, {"rows": rows["rows"], **sums}


def _check_counts(meta: dict, sums: dict[str, torch.Tensor]) -> None:
    """Refuse (``ValueError``) saved counters and sums of the wrong kind or shape, which the window would
    otherwise take in and fail on, or read wrong, in the middle of training."""
    domains, tasks = meta.get("domains"), meta.get("tasks")
    if not isinstance(domains, list) or not isinstance(tasks, list):
        raise ValueError("no list of domains or tasks")
    m, n = len(domains), len(tasks)
    for key in ("micro_batches", "units", "non_finite"):
        value = meta.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} = {value!r} is not a count")
    taken, quota = meta.get("taken"), meta.get("quota")
    if not (isinstance(taken, list) and len(taken) == m and all(type(t) is int and t >= 0 for t in taken)):
        raise ValueError(f"taken = {str(taken)[:40]} is not a count for each of {m} domains")
    if quota is not None and (type(quota) is not int or quota < 1) or not isinstance(meta.get("full"), bool):
        raise ValueError(f"quota = {quota!r} or full = {meta.get('full')!r} is not what a window writes")
    for key in ("hook_seconds", "validation_seconds"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"{key} = {value!r} is not a number of seconds")
    losses = meta.get("task_losses")
    if not isinstance(losses, dict) or sorted(losses) != sorted(tasks) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in losses.values()):
        raise ValueError(f"task_losses = {str(losses)[:40]} is not a number for each task")
    shapes = {"cell": (4, n, m), "dom": (4, m), "loss_sums": (m,), "sequences": (m,)}
    wrong = {k: tuple(sums[k].shape) for k, shape in shapes.items() if tuple(sums[k].shape) != shape}
    if wrong:
        raise ValueError(f"sums of shapes {wrong} where {n} tasks and {m} domains give {shapes}")
