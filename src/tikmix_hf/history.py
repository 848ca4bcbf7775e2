"""The run's record on disk: ``<output_dir>/tikmix/history.json`` and the checkpoints beside it.

One entry per stage (step, tokens seen, weights before and after, the influence matrix with its
names, the mixer's status and seconds). :func:`load_history` reads it back for reports, plots and
schedules; :func:`latest_checkpoint` finds the newest complete checkpoint to resume from.
"""

from __future__ import annotations

import json
import os
import re

from ._io import load_json, save_json_atomic

HISTORY_FORMAT = "tikmix_hf.history/1"


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder in ``output_dir`` whose ``trainer_state.json`` is complete.

    ``transformers.trainer_utils.get_last_checkpoint`` returns the highest number even when the run was
    killed while writing it; this skips such half-written folders. ``None`` when there is none.
    """
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            try:
                with open(os.path.join(path, "trainer_state.json")) as fh:
                    step = json.load(fh)["global_step"]
            except (OSError, ValueError, KeyError):
                continue  # missing or half-written: not a checkpoint to resume from
            if step == int(match.group(1)):
                found.append((step, path))
    return max(found)[1] if found else None


def write_history(path: str, *, domains: list[str], tasks: list[str], config: dict, initial_weights: dict | None,
                  max_steps: int | None, stages: list[dict], alignment: dict | None = None) -> None:
    """Write the run's ``history.json`` atomically; a failure leaves the previous file intact and says so."""
    document = {
        "format": HISTORY_FORMAT,
        "domains": list(domains),
        "tasks": list(tasks),
        "config": config,
        "initial_weights": initial_weights,
        "alignment": alignment,  # how an aligned starting mixture came about (tikmix_initial_weights=aligned)
        "max_steps": max_steps,  # so that a schedule read from this history can speak in fractions
        "stages": stages,
    }
    try:
        save_json_atomic(path, document)
    except OSError as err:
        raise OSError(
            f"TiKMiX could not write its history to {path} ({err}); the previous history file is left intact. Free "
            "disk space or fix the folder's permissions, then resume from the last checkpoint"
        ) from err


def load_history(path: str | os.PathLike) -> dict:
    """Read a ``history.json`` written by :class:`TiKMiXCallback`."""
    doc = load_json(path, "TiKMiX history")
    if not isinstance(doc, dict) or doc.get("format") != HISTORY_FORMAT:
        raise ValueError(f"{path} is not a TiKMiX history (expected format {HISTORY_FORMAT!r})")
    return doc


__all__ = ["HISTORY_FORMAT", "latest_checkpoint", "load_history", "write_history"]
