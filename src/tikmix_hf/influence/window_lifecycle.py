"""A run's training windows from the outside: when each opens, the one open now, its checkpoint file,
and the fall-back to probes.

A :class:`~tikmix_hf.influence.TrainingWindow` measures one boundary's ``S`` from the training
micro-batches of the steps before it. Around it, a run needs to open one at the planned step,
close it at its boundary, keep it in a checkpoint taken inside it (each rank's part in a
safetensors file of the checkpoint folder), restore it on resume, and, where the window cannot
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

from .._distributed import all_reduce, rank_and_world
from .._io import load_tensors, save_tensors_atomic
from .window import TrainingWindow

__all__ = ["WINDOW_FILE", "WindowLifecycle"]

#: A checkpoint taken inside a training window keeps each rank's part of it in this file of the checkpoint folder.
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

    def __init__(self, source: str, *, strict: bool, preconditioner: str, quota: int | None = None):
        self.source = source
        self.quota = quota
        self.strict = bool(strict)
        self.preconditioner = preconditioner
        self.opens: dict[int, int] = {}  # step at whose start a window opens -> the boundary it measures for
        self.window: TrainingWindow | None = None
        self.opened_at = 0  # the step at whose start the open window opened

    def plan(self, opens: Mapping[int, int]) -> None:
        """The windows to open, ``{step: boundary}``; none when the run measures with probes."""
        self.opens = dict(opens) if self.source == "training" else {}

    def due(self, step: int) -> bool:
        """Whether a window opens at the start of ``step``."""
        return step in self.opens and self.window is None

    def open(self, step: int, model, validation_batches, domains: list[str], optimizer,
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
        if window is None:
            if self.source != "training":
                return None, None
            return None, ("no training window was open before this boundary (the run was resumed from a checkpoint "
                          "inside it without its window file): this stage was measured with probes")
        counts = window.close()
        if window.failure is not None:
            return None, self.fall_back(window.failure) + " (this stage included)"
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
        """Keep the open window (its validation gradients and sums) in ``folder``, this rank's file."""
        if self.window is not None:
            meta, tensors = self.window.state()
            save_tensors_atomic(self._path(folder), tensors,
                                {"tikmix": json.dumps(meta), "opened_at": str(self.opened_at)})

    def restore(self, folder: str, saved: Mapping[str, Any] | None, model, validation_batches, domains: list[str],
                domain_of_from: Callable[[int], Callable[[int, int], tuple[np.ndarray, int]]], *,
                show_progress: bool, saved_source: str | None) -> str | None:
        """Continue the window a checkpoint in ``folder`` was taken inside; a note when it cannot.

        Every rank must hold its window file: the ranks agree on that before any collective, so a file
        missing on one rank sends all of them to probes together.
        """
        if saved_source == "probes" and self.source == "training":
            self.source, self.opens = "probes", {}  # the saved run had fallen back to probes
        if not saved:
            return None
        path = self._path(folder)
        _, world = rank_and_world()
        device = next(model.parameters()).device  # NCCL reduces only device tensors
        missing = all_reduce(torch.tensor([0.0 if os.path.isfile(path) else 1.0], device=device), world)
        if missing.item():
            return (f"the checkpoint was taken inside a training window but its window state is not at {path} (on "
                    f"{int(missing.item())} of {world} ranks): the coming stage is measured with probes")
        tensors, meta = load_tensors(path)
        window = TrainingWindow.restore(model, validation_batches, domains, json.loads(meta["tikmix"]), tensors,
                                        show_progress=show_progress, strict=self.strict)
        opened_at = int(saved["opened_at"])
        window.attach(domain_of_from(opened_at))
        self.window, self.opened_at = window, opened_at
        return None

    @staticmethod
    def _path(folder: str) -> str:
        return os.path.join(folder, WINDOW_FILE.format(rank=rank_and_world()[0]))
