"""``tikmix plot``: the pictures and tables of a ``history.json``, a run folder or a demo ``results.json``."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._io import FileReadError, read_structured, save_text_atomic
from .errors import UsageError


def _resolve_history(value: str) -> Path:
    path = Path(value)
    if path.is_dir():
        for candidate in (path / "tikmix" / "history.json", path / "history.json", path / "results.json"):
            if candidate.is_file():
                return candidate
        raise UsageError(
            f"HISTORY {value}: a folder without tikmix/history.json, history.json or results.json; give the "
            "history.json that TiKMiXCallback writes to <output_dir>/tikmix/, or that output_dir"
        )
    if not path.is_file():
        raise UsageError(
            f"HISTORY {value}: no such file; give the history.json that TiKMiXCallback writes to "
            "<output_dir>/tikmix/history.json (or the run's output_dir, or a demo results.json)"
        )
    return path


def _read_history(path: Path) -> Any:
    try:
        return read_structured(path, f"HISTORY {path}")
    except FileReadError as err:
        raise UsageError(f"{err}; it may be truncated") from None
    except ImportError as err:
        raise UsageError(str(err)) from None


def _run_dir_state(history_path: Path) -> Mapping[str, Any] | None:
    """``trainer_state.json`` of the run that wrote this history (its ``output_dir``), if any."""
    run_dir = history_path.parent.parent if history_path.parent.name == "tikmix" else history_path.parent
    state = run_dir / "trainer_state.json"
    try:
        doc = read_structured(state)
    except FileReadError:
        return None
    return doc if isinstance(doc, Mapping) else None


def _eval_curves(state: Mapping | None) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {}
    for entry in (state or {}).get("log_history", []):
        for key, value in entry.items():
            if key.startswith("eval_") and key.endswith("_loss") and isinstance(value, (int, float)):
                task = key[len("eval_"):-len("_loss")] or "eval"
                curves.setdefault(task, []).append((int(entry.get("step", 0)), float(value)))
    return curves


def cmd_plot(args: argparse.Namespace) -> int:
    path = _resolve_history(args.history)
    doc = _read_history(path)
    out = Path(args.output_dir) if args.output_dir else path.parent / "plots"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: exists and is not a folder")

    try:
        from .. import plots as P
    except ImportError as err:
        raise UsageError(f"drawing needs matplotlib ({err}); pip install 'tikmix_hf[demo]'") from None
    from ..history import HISTORY_FORMAT
    from ..report import history_report

    if isinstance(doc, dict) and str(doc.get("format", "")).startswith("tikmix_hf.demo/"):
        from ..demo import draw_results

        missing = [r["history"] for r in doc.get("runs", [])
                   if r.get("history") and not (path.parent / r["history"]).is_file()]
        if missing:
            raise UsageError(
                f"HISTORY {path}: the demo's run histories are gone ({path.parent / missing[0]} ...); rerun tikmix demo"
            )
        paths = draw_results(doc, out, base=path.parent)
    else:
        if not isinstance(doc, dict) or doc.get("format") != HISTORY_FORMAT:
            raise UsageError(
                f"HISTORY {path}: not a TiKMiX history (expected format {HISTORY_FORMAT!r}); give the history.json "
                "that TiKMiXCallback writes to <output_dir>/tikmix/"
            )
        for key in ("domains", "stages"):
            if not isinstance(doc.get(key), list):
                raise UsageError(f"HISTORY {path}: the history has no {key} list; it is damaged")
        state = _run_dir_state(path)
        total = args.total_steps or (state or {}).get("max_steps") or None
        try:  # a history edited by hand or damaged on disk: one line naming the file, not a traceback
            paths = P.plot_history(doc, out, total_steps=total)
            curves = _eval_curves(state)
            if curves:
                paths.append(P.plot_validation_curves({"this run": curves}, out / "validation.png"))
            report = history_report(doc, title=f"TiKMiX history of {path}")
        except (KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
            raise UsageError(
                f"HISTORY {path}: cannot draw it ({type(err).__name__}: {err}); the file is damaged"
            ) from None
        save_text_atomic(out / "history.md", report)
        print(f"{len(doc['stages'])} stage(s), {len(doc['domains'])} domains; tables in {out / 'history.md'}")
    for p in paths:
        print(p)
    return 0
