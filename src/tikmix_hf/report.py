"""TiKMiX histories as markdown tables.

- :func:`markdown_table`: rows to a GitHub markdown table.
- :func:`stage_line`: the console's one line for a stage.
- :func:`stages_table`, :func:`weights_table`, :func:`influence_table`: one ``history.json``
  (as written by :class:`~tikmix_hf.TiKMiXCallback`) as tables; :func:`history_report` all of them.

The demo's tables are :mod:`tikmix_hf.demo.report`'s. Pure functions of JSON documents: strings
in, strings out, nothing imported beyond numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "history_report",
    "influence_table",
    "markdown_table",
    "stage_line",
    "stages_table",
    "weights_table",
]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` has one letter per column, ``l`` or ``r`` (default: first
    column left, the others right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"align={align!r} has {len(align)} letters for {len(headers)} columns")
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join(rule) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


# ------------------------------------------------------------------------------------------------
# One history
# ------------------------------------------------------------------------------------------------

def _moves(before: Mapping[str, float], after: Mapping[str, float], k: int = 3) -> str:
    changes = sorted(after, key=lambda d: -abs(after[d] - before.get(d, 0.0)))[:k]
    return ", ".join(f"{d} {before.get(d, 0.0):.2f}→{after[d]:.2f}" for d in changes)


def stage_line(stage: Mapping[str, Any]) -> str:
    """The console's one line for a stage: where, what happened, the largest weight moves, the time."""
    seconds = (stage.get("seconds") or {}).get("total", 0.0)
    return (
        f"TiKMiX stage {stage.get('stage')} at step {stage.get('step')}: {stage.get('status')}; "
        f"{_moves(stage['weights_before'], stage['weights_after'])} ({seconds:.1f} s)"
    )


def stages_table(history: Mapping[str, Any]) -> str:
    """One row per stage: step, tokens, solver status, entropy, seconds and the largest weight moves."""
    rows = []
    for s in history.get("stages") or []:
        sec = s.get("seconds") or {}
        tokens = s.get("tokens_seen")
        rows.append([
            s.get("stage"), s.get("step"), "—" if tokens is None else f"{tokens:,}", s.get("status"),
            f"{s.get('entropy', float('nan')):.3f}", f"{sec.get('influence', 0.0):.2f}", f"{sec.get('solve', 0.0):.2f}",
            _moves(s["weights_before"], s["weights_after"]),
        ])
    if not rows:
        return "_No stage yet: the mixture has not been re-decided._"
    return markdown_table(
        ["stage", "step", "tokens seen", "status", "entropy", "influence s", "solve s", "largest moves"], rows,
        "rrrlrrrl",
    )


def weights_table(history: Mapping[str, Any]) -> str:
    """One row per domain: the initial weight and the weight after every stage."""
    domains = list(history["domains"])
    stages = list(history.get("stages") or [])
    initial = history.get("initial_weights") or (stages[0]["weights_before"] if stages else {})
    headers = ["domain", "initial"] + [f"after stage {s['stage']} (step {s['step']})" for s in stages]
    rows = [[d, f"{initial.get(d, float('nan')):.3f}"] + [f"{s['weights_after'][d]:.3f}" for s in stages]
            for d in domains]
    return markdown_table(headers, rows)


def influence_table(stage: Mapping[str, Any]) -> str:
    """One stage's influence matrix, one row per domain (tasks as columns), with the weights it led to."""
    inf = stage.get("influence")
    if not inf:
        return f"_Stage {stage.get('stage')}: no influence matrix ({stage.get('status')}: {stage.get('message')})._"
    S = np.asarray(inf["scores"], dtype=np.float64)
    tasks, domains = inf["task_names"], inf["domain_names"]
    rows = [[d] + [f"{S[i, j]:.3g}" for i in range(len(tasks))]
            + [f"{stage['weights_before'][d]:.3f}", f"{stage['weights_after'][d]:.3f}"] for j, d in enumerate(domains)]
    return markdown_table(["domain"] + [f"S[{t}]" for t in tasks] + ["weight before", "weight after"], rows)


def history_report(history: Mapping[str, Any], *, title: str = "TiKMiX history") -> str:
    """Markdown of a whole history: stages, weights and every stage's influence matrix."""
    parts = [f"# {title}", "", f"Domains: {len(history['domains'])}; tasks: {', '.join(history['tasks'])}; "
             f"solver: {history.get('config', {}).get('tikmix_solver', '?')}.", "", "## Stages", "",
             stages_table(history), "", "## Weights", "", weights_table(history)]
    for s in history.get("stages") or []:
        parts += ["", f"## Influence at stage {s['stage']} (step {s['step']})", "", influence_table(s)]
    return "\n".join(parts) + "\n"
