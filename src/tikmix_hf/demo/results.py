"""The demo's results: the per-arm summary over seeds and the pictures drawn from ``results.json``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_FORMAT = "tikmix_hf.demo/1"


def summarize(runs: list[dict], arms: Sequence[str], baseline: str | None) -> dict:
    """Per arm: mean and spread over seeds; per seed: the difference to the baseline arm."""
    by = {(r["seed"], r["arm"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out: dict[str, Any] = {"baseline": baseline, "arms": {}}
    for arm in arms:
        rows = [by[(s, arm)] for s in seeds if (s, arm) in by]
        avg = np.array([r["final"]["average"] for r in rows])
        entry = {
            "label": rows[0]["label"],
            "seeds": [r["seed"] for r in rows],
            "average_loss_mean": float(avg.mean()),
            "average_loss_std": float(avg.std(ddof=1)) if len(avg) > 1 else 0.0,
            "accuracy_mean": float(np.mean([r["final"]["accuracy"] for r in rows])),
            "all_domains_loss_mean": float(np.mean([r["final"]["all_domains_loss"] for r in rows])),
            "task_loss_mean": {
                t: float(np.mean([r["final"]["losses"][t] for r in rows])) for t in rows[0]["final"]["losses"]
            },
            "train_seconds_mean": float(np.mean([r["seconds"]["train"] for r in rows])),
            "tikmix_share_mean": float(np.mean([r["tikmix_share"] for r in rows])),
        }
        if baseline is not None and arm != baseline:
            deltas = [by[(s, arm)]["final"]["average"] - by[(s, baseline)]["final"]["average"]
                      for s in seeds if (s, arm) in by and (s, baseline) in by]
            entry["delta_vs_baseline"] = deltas
            entry["delta_mean"] = float(np.mean(deltas)) if deltas else None
            entry["wins"] = int(sum(d < 0 for d in deltas))
        out["arms"][arm] = entry
    return out



def draw_results(results: Mapping[str, Any], plot_dir: str | os.PathLike, *, base: str | os.PathLike) -> list[Path]:
    """The demo's pictures from its ``results.json`` document and the run histories it names
    (paths relative to ``base``, the folder of ``results.json``)."""
    from .. import plots as P
    from ..history import load_history

    paths: list[Path] = []
    plot_dir = Path(plot_dir)
    size = results["size"]
    for seed in results["seeds"]:
        runs = [r for r in results["runs"] if r["seed"] == seed]
        curves = {r["label"]: {t: [(c["step"], c["losses"][t]) for c in r["curve"]] for t in r["final"]["losses"]}
                  for r in runs}
        accuracy = {r["label"]: [(c["step"], c["accuracy"]) for c in r["curve"]] for r in runs}
        paths.append(P.plot_validation_curves(
            curves, plot_dir / f"validation_seed{seed}.png", accuracy=accuracy,
            title=f"Held-out validation, {results['corpus']} corpus, seed {seed} "
                  f"(equal training tokens: {results['training_tokens_per_arm']:,})",
        ))
        for r in runs:
            if r["history"] is None:
                continue
            history = load_history(Path(base) / r["history"])
            paths.extend(P.plot_history(
                history, plot_dir, prefix=f"seed{seed}_{r['arm']}_", total_steps=size["max_steps"],
                title=f"{r['label']}, {results['corpus']} corpus, seed {seed}",
            ))
    return paths
