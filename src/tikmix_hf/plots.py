"""TiKMiX histories and demo results as pictures (PNG).

Every function draws on its own :class:`matplotlib.figure.Figure` with the Agg canvas, writes one
PNG and returns its path. Nothing goes through ``matplotlib.pyplot``, so no global figure state is
created or left behind, and no display is needed.

- :func:`plot_weights`: the mixture over training, a stacked area per domain (x = optimizer step).
- :func:`plot_influence`: one stage's Group Influence matrix ``S`` (paper Eq. 8) as a heatmap, with
  the weights before and after that stage's decision underneath.
- :func:`plot_validation_curves`: held-out loss (and accuracy) against steps, one line per arm.
- :func:`plot_history`: the weights picture and one influence picture per stage of a history.

Example::

    from tikmix_hf.history import load_history
    from tikmix_hf.plots import plot_history
    paths = plot_history(load_history("run/tikmix/history.json"), "run/plots")
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ._io import save_bytes_atomic

__all__ = ["plot_history", "plot_influence", "plot_validation_curves", "plot_weights", "weight_segments"]

DPI = 100


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Draw ``fig`` into ``path`` through a temporary file and a rename: never half a picture on disk."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format=path.suffix.lstrip(".") or "png")
    save_bytes_atomic(path, buffer.getvalue())
    return path


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n <= 20 else "turbo"]
    if n <= 20:
        # tab20 pairs a dark and a light shade; take the dark ones first so neighbours differ.
        order = list(range(0, 20, 2)) + list(range(1, 20, 2))
        return [cmap(order[i]) for i in range(n)]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def weight_segments(history: Mapping[str, Any], total_steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The mixture of a history as a step function: ``(steps, W)``.

    ``W[k]`` (one column per domain, in ``history["domains"]`` order) is in effect from
    ``steps[k]`` to ``steps[k + 1]``. The first row is the initial mixture (step 0), then
    ``weights_after`` of each stage from its step on; the last row repeats the final mixture at
    ``total_steps``. Without ``total_steps`` the end is the last stage's step plus the gap between
    the last two boundaries (for evenly spaced stages, the end of training).
    """
    domains = list(history["domains"])
    stages = list(history.get("stages") or [])
    initial = history.get("initial_weights") or (stages[0]["weights_before"] if stages else None)
    if initial is None:
        raise ValueError("the history has neither initial_weights nor any stage: there is no mixture to draw")
    rows = [[float(initial[d]) for d in domains]]
    steps = [0]
    for stage in stages:
        rows.append([float(stage["weights_after"][d]) for d in domains])
        steps.append(int(stage["step"]))
    if total_steps is None:
        bounds = [0] + [int(s["step"]) for s in stages]
        gap = bounds[-1] - bounds[-2] if len(bounds) > 1 else 1
        total_steps = bounds[-1] + max(gap, 1)
    if total_steps <= steps[-1]:
        total_steps = steps[-1] + 1
    rows.append(rows[-1])
    steps.append(int(total_steps))
    return np.asarray(steps), np.asarray(rows)


def plot_weights(
    history: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    total_steps: int | None = None,
    title: str | None = None,
) -> Path:
    """Stacked area of the domain weights over training (x = optimizer step), stage boundaries dashed.

    The initial mixture holds from step 0; each stage's ``weights_after`` from that stage's step
    (the new weights reach the data a few batches later, at the stage's ``effective_index``).
    """
    domains = list(history["domains"])
    steps, W = weight_segments(history, total_steps)
    fig = _figure(10.5, 4.8)
    ax = fig.add_subplot()
    colours = _colours(len(domains))
    ax.stackplot(steps, W.T, labels=domains, colors=colours, step="post", alpha=0.9, linewidth=0.3,
                 edgecolor="white")
    for k, s in enumerate(steps[1:-1], start=1):
        ax.axvline(s, color="black", linestyle="--", linewidth=0.8)
        ax.text(s, 1.01, f"stage {k}", ha="center", va="bottom", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set_xlim(0, steps[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sampling weight")
    ax.set_title(title or f"Mixture over training ({len(steps) - 2} TiKMiX stage(s))", pad=16)
    handles, labels = ax.get_legend_handles_labels()
    # Reverse so the legend reads top-down in the same order as the stack.
    ax.legend(handles[::-1], labels[::-1], loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7,
              frameon=False, ncols=1 if len(domains) <= 20 else 2)
    return _save(fig, path)


def plot_influence(
    stage: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    title: str | None = None,
) -> Path:
    """One stage's influence matrix as a heatmap, and that stage's weights before/after as bars.

    Colour is the task-normalised influence ``S_ij / max_j |S_ij|`` of paper Eq. 9 (blue helps the
    task, red hurts it); each cell is annotated with the raw ``S_ij`` and, where the history has them,
    its standard error. Hatched cells lie within ``z`` standard errors of zero (``z`` = the run's
    ``tikmix_shrink_z``, else 1): the entries shrinkage would set to zero. Row labels carry each
    task's split-half rank agreement.
    """
    influence = stage.get("influence")
    if not influence:
        raise ValueError(
            f"stage {stage.get('stage')} at step {stage.get('step')} has no influence matrix "
            f"(status {stage.get('status')!r}: {stage.get('message')})"
        )
    S = np.asarray(influence["scores"], dtype=np.float64)
    tasks, domains = list(influence["task_names"]), list(influence["domain_names"])
    A = S / (np.abs(S).max(axis=1, keepdims=True) + 1e-30)
    n, m = S.shape
    width = max(7.0, 0.62 * m + 3.0)
    fig = _figure(width, 1.0 + 0.55 * n + 2.8)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[max(n, 1) * 0.55 + 0.4, 2.2])
    image = top.imshow(A, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    fontsize = 7 if m <= 12 else 6
    stderr = influence.get("stderr")
    se = None if stderr is None else np.array([[np.nan if x is None else x for x in row] for row in stderr], float)
    if se is not None and not np.isfinite(se).any():
        # No entry has a standard error (one probe micro-batch per domain): hatching every cell as
        # "unknown" would hide the matrix and say nothing that this does not.
        se = None
    z = float((stage.get("mixer") or {}).get("uncertainty", {}).get("shrink_z") or 1.0)
    for i in range(n):
        for j in range(m):
            label = f"{S[i, j]:.2g}"
            if se is not None:
                label += f"\n±{se[i, j]:.1g}" if np.isfinite(se[i, j]) else "\n±?"
                if not (abs(S[i, j]) > z * se[i, j]):  # within z standard errors of zero (or unknown)
                    top.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                            edgecolor="0.35", linewidth=0))
            top.text(j, i, label, ha="center", va="center", fontsize=fontsize - (1 if se is not None else 0),
                     color="white" if abs(A[i, j]) > 0.6 else "black")
    split = influence.get("split_half") or {}
    labels = [f"{t}\n(split-half {split[t]:.2f})" if isinstance(split.get(t), (int, float)) else t for t in tasks]
    top.set_yticks(range(n), labels, fontsize=8)
    top.set_title(
        title
        or f"Group influence S at step {stage.get('step')} (stage {stage.get('stage')}, {stage.get('solver')}, "
        f"{stage.get('status')})",
        fontsize=10,
    )
    bar = fig.colorbar(image, ax=top, fraction=0.03, pad=0.01)
    bar.set_label("S / max|S| per task", fontsize=7)
    before = [float(stage["weights_before"][d]) for d in domains]
    after = [float(stage["weights_after"][d]) for d in domains]
    x = np.arange(m)
    bottom.bar(x - 0.2, before, width=0.4, label="before", color="0.65")
    bottom.bar(x + 0.2, after, width=0.4, label="after", color="tab:blue")
    bottom.set_ylabel("weight")
    bottom.legend(fontsize=7, frameon=False, loc="upper right")
    bottom.set_xticks(x, domains, rotation=60, ha="right", fontsize=7)
    bottom.set_xlim(-0.5, m - 0.5)
    return _save(fig, path)


Curve = Sequence[tuple[float, float]]


def plot_validation_curves(
    curves: Mapping[str, Mapping[str, Curve]],
    path: str | os.PathLike,
    *,
    accuracy: Mapping[str, Curve] | None = None,
    title: str | None = None,
    average: bool = True,
) -> Path:
    """Validation loss against steps: one panel per task (plus their average), one line per arm.

    Args:
        curves: arm -> task -> ``[(step, loss), ...]``.
        accuracy: optional arm -> ``[(step, accuracy), ...]``, drawn as one more panel.
        average: add a panel with the mean over tasks (points where every task was measured).
    """
    if not curves:
        raise ValueError("curves is empty: give at least one arm with one task")
    arms = list(curves)
    tasks: list[str] = []
    for arm in arms:
        for task in curves[arm]:
            if task not in tasks:
                tasks.append(task)
    panels: list[tuple[str, dict[str, Curve], str]] = [
        (task, {arm: curves[arm].get(task, []) for arm in arms}, "loss") for task in tasks
    ]
    if average and len(tasks) > 1:
        mean_curves: dict[str, Curve] = {}
        for arm in arms:
            per_step: dict[float, list[float]] = {}
            for task in tasks:
                for step, value in curves[arm].get(task, []):
                    per_step.setdefault(step, []).append(value)
            mean_curves[arm] = [(s, float(np.mean(v))) for s, v in sorted(per_step.items()) if len(v) == len(tasks)]
        panels.append(("average over tasks", mean_curves, "loss"))
    if accuracy:
        panels.append(("choice accuracy", dict(accuracy), "accuracy"))
    cols = min(len(panels), 3 if len(panels) > 4 else len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(3.9 * cols, 3.0 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    colours = {arm: c for arm, c in zip(arms, ["0.35", "tab:blue", "tab:orange", "tab:green", "tab:red",
                                                "tab:purple", "tab:brown"] + _colours(len(arms)))}
    for ax, (name, series, kind) in zip(axes, panels):
        for k, (arm, points) in enumerate(series.items()):
            if not points:
                continue
            xs, ys = zip(*points)
            # Arms share their first steps (same model, same samples until a mixture changes): draw the
            # first arm wide and dashed so that the lines drawn over it do not hide it.
            style = dict(linewidth=2.6, linestyle="--") if k == 0 and len(series) > 1 else dict(linewidth=1.4)
            ax.plot(xs, ys, label=arm, color=colours[arm], marker="." if len(xs) < 30 else None, **style)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel(kind, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if kind == "loss":
            _zoom_to_tail(ax, series)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, frameon=False)
    fig.suptitle(title or "Held-out validation during training", fontsize=10)
    return _save(fig, path)


def _zoom_to_tail(ax, series: Mapping[str, Curve]) -> None:
    """Losses fall steeply at first; clip the y axis so the differences between arms stay visible."""
    values = [v for points in series.values() for _, v in points]
    if len(values) < 4:
        return
    tails = [v for points in series.values() for _, v in points[len(points) // 4:]]
    lo, hi = min(tails), max(tails)
    span = max(hi - lo, 1e-6)
    ax.set_ylim(lo - 0.1 * span, hi + 0.6 * span)


def gain_series(history: Mapping[str, Any]) -> dict[str, list[tuple[int, float | None, float | None]]]:
    """Per task: ``(step, predicted, realised)`` for every stage interval closed by a later decision.

    ``predicted`` is what a decision predicted for the stage it opened (``h S w``, nats of validation
    loss); ``realised`` is the drop the next decision measured. Only the trust-region objective logs them.
    """
    out: dict[str, list] = {}
    stages = history.get("stages") or []
    for before, after in zip(stages, stages[1:]):
        predicted = ((before.get("mixer") or {}).get("trust_region") or {}).get("predicted_gain_next") or {}
        realised = ((after.get("mixer") or {}).get("trust_region") or {}).get("realised_gain") or {}
        for task in predicted:
            out.setdefault(task, []).append((int(after["step"]), predicted.get(task), realised.get(task)))
    return out


def plot_gains(history: Mapping[str, Any], path: str | os.PathLike, *, title: str | None = None) -> Path | None:
    """Predicted against realised validation-loss drop per task and stage, and the trust radius used.

    Points on the diagonal mean the influence signal predicted what training then did; ``None`` when
    the history has fewer than two trust-region decisions (nothing to compare yet).
    """
    series = gain_series(history)
    used = [(int(s["step"]), ((s.get("mixer") or {}).get("trust_region") or {}).get("radius_used"))
            for s in history.get("stages") or []]
    radii = [(step, r) for step, r in used if r is not None]
    if not series:
        return None
    fig = _figure(10.0, 4.0)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = _colours(len(series))
    values = []
    for colour, (task, points) in zip(colours, series.items()):
        pairs = [(p, r) for _, p, r in points if p is not None and r is not None]
        if pairs:
            predicted, realised = zip(*pairs)
            ax.scatter(predicted, realised, color=colour, label=task, s=24)
            values += [v for pair in pairs for v in pair]
    if values:
        lo, hi = min(values + [0.0]), max(values + [0.0])
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--")
    ax.set_xlabel("predicted drop of validation loss over the stage (nats)")
    ax.set_ylabel("realised drop (nats)")
    ax.set_title("Did the decisions' predictions come true?")
    ax.legend(fontsize=7)
    if radii:
        bx.step([s for s, _ in radii], [r for _, r in radii], where="post", color="#4c72b0")
        bx.scatter([s for s, _ in radii], [r for _, r in radii], color="#4c72b0", s=16)
    bx.set_xlabel("step")
    bx.set_ylabel("trust radius used (KL, nats)")
    bx.set_title("How far each decision could move")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_history(
    history: Mapping[str, Any],
    output_dir: str | os.PathLike,
    *,
    prefix: str = "",
    total_steps: int | None = None,
    title: str | None = None,
) -> list[Path]:
    """All pictures of one history: ``<prefix>weights.png``, ``<prefix>influence_stage<k>.png`` and, for the
    trust-region objective, ``<prefix>gains.png`` (predicted against realised loss drops).

    ``title`` names the run (e.g. ``"TiKMiX-D, seed 0"``); each picture adds what it shows.
    Stages without an influence matrix (status ``skipped``) get no heatmap.
    """
    output_dir = Path(output_dir)
    paths = [plot_weights(history, output_dir / f"{prefix}weights.png", total_steps=total_steps,
                          title=title and f"{title}: mixture over training")]
    gains = plot_gains(history, output_dir / f"{prefix}gains.png",
                       title=title and f"{title}: predicted and realised gains")
    if gains is not None:
        paths.append(gains)
    for stage in history.get("stages") or []:
        if stage.get("influence"):
            paths.append(plot_influence(stage, output_dir / f"{prefix}influence_stage{stage['stage']}.png"))
    return paths
