"""The demo's tables: what ``tikmix demo`` prints (:func:`demo_tables`) and its ``report.md``
(:func:`demo_report`), from the ``results.json`` document of :func:`~tikmix_hf.demo.run_demo`.

Pure functions of JSON documents, like :mod:`tikmix_hf.report` whose :func:`~tikmix_hf.report.markdown_table`
they use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..report import markdown_table
from .arms import EARLY

__all__ = ["demo_report", "demo_tables"]

#: How the tables name a static baseline arm.
_BASELINE_NAME = {"static": "static", "natural": "static", "uniform": "uniform"}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _signed(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:+.{digits}f}"


def _runs_table(results: Mapping[str, Any]) -> str:
    runs = results["runs"]
    tasks = list(runs[0]["final"]["losses"])
    baseline = results.get("baseline")
    base = {r["seed"]: r["final"]["average"] for r in runs if r["arm"] == baseline}
    headers = (["seed", "arm"] + [f"{t} loss" for t in tasks]
               + ["avg loss", f"Δ vs {baseline}" if baseline else "Δ", "choice acc", "all-domains loss",
                  "train s", "CPU s", "TiKMiX s", "TiKMiX share", "probe tokens"])
    rows = []
    for r in runs:
        f, sec = r["final"], r["seconds"]
        delta = f["average"] - base[r["seed"]] if r["seed"] in base and r["arm"] != baseline else None
        is_tikmix = r["stages"] > 0
        rows.append(
            [r["seed"], r["label"]] + [f"{f['losses'][t]:.3f}" for t in tasks]
            + [f"{f['average']:.3f}", _signed(delta), _pct(f["accuracy"]), f"{f['all_domains_loss']:.3f}",
               f"{sec['train']:.0f}", f"{sec['cpu']:.0f}", f"{sec['tikmix']:.1f}" if is_tikmix else "—",
               _pct(r["tikmix_share"]) if is_tikmix else "—", f"{r['probe_tokens']:,}" if is_tikmix else "—"]
        )
    return markdown_table(headers, rows, "rl" + "r" * (len(headers) - 2))


def _summary_table(results: Mapping[str, Any]) -> str:
    summary = results["summary"]
    baseline = summary.get("baseline")
    rows = []
    for arm, s in summary["arms"].items():
        spread = f" ± {s['average_loss_std']:.3f}" if len(s["seeds"]) > 1 else ""
        deltas = s.get("delta_vs_baseline")
        rows.append([
            s["label"], len(s["seeds"]), f"{s['average_loss_mean']:.3f}{spread}",
            "—" if deltas is None else f"{s['delta_mean']:+.3f} ({', '.join(f'{d:+.3f}' for d in deltas)})",
            "—" if deltas is None else f"{s['wins']}/{len(deltas)}",
            _pct(s["accuracy_mean"]), f"{s['all_domains_loss_mean']:.3f}", f"{s['train_seconds_mean']:.0f}",
            _pct(s["tikmix_share_mean"]) if arm.startswith("tikmix") else "—",
        ])
    return markdown_table(
        ["arm", "seeds", "avg loss (mean ± sd)", f"Δ vs {_BASELINE_NAME.get(baseline, baseline)} (per seed)",
         "seeds better", "choice acc", "all-domains loss", "train s", "TiKMiX share"], rows,
    )


def _final_weights_table(results: Mapping[str, Any]) -> str | None:
    tikmix_runs = [r for r in results["runs"] if r["stages"] > 0]
    if not tikmix_runs:
        return None
    arms = list(dict.fromkeys(r["arm"] for r in tikmix_runs))
    domains = [row["domain"] for row in results["domains"]]
    natural = np.array([row["train_blocks"] for row in results["domains"]], dtype=float)
    natural /= natural.sum()
    roles, oracle = results.get("roles"), results.get("oracle_weights")
    headers = ["domain"] + (["role", "oracle hint"] if roles else []) + ["natural (start)"]
    headers += [f"{next(r['label'] for r in tikmix_runs if r['arm'] == a)} final" for a in arms]
    rows = []
    for j, d in enumerate(domains):
        row = [d] + ([roles.get(d, ""), f"{(oracle or {}).get(d, 0.0):.2f}"] if roles else []) + [f"{natural[j]:.3f}"]
        for a in arms:
            ws = [r["final_weights"][d] for r in tikmix_runs if r["arm"] == a]
            row.append(f"{np.mean(ws):.3f}")
        rows.append(row)
    return markdown_table(headers, rows)


def _setup_line(results: Mapping[str, Any]) -> str:
    size = results["size"]
    return (
        f"Llama with {size['layers']} layer(s) of width {size['hidden_size']}, trained from the same initialisation "
        f"per seed for {size['max_steps']} steps × {size['batch_size']} blocks of {size['block_size']} tokens = "
        f"**{results['training_tokens_per_arm']:,} training tokens per arm** (AdamW, lr {size['learning_rate']}, "
        f"cosine schedule). TiKMiX measures Adam-preconditioned influence on {size['validation_sequences']} "
        f"sequences per task: TiKMiX-D with its defaults reads the domains from the training micro-batches before "
        f"each decision (topped up to {size['probe_sequences']} sequences per domain with probes), the paper's "
        f"objective and TiKMiX-M from {size['probe_sequences']} probe blocks per domain. The default objective "
        f"decides at {', '.join(f'{f:.0%}' for f in EARLY)} of training, the paper's at "
        f"{', '.join(f'{f:.0%}' for f in size['stage_fractions'])}; TiKMiX-M evaluates "
        f"{size['surrogate_candidates']} look-ahead candidates per stage."
    )


def demo_tables(results: Mapping[str, Any]) -> str:
    """The tables ``tikmix demo`` prints: every run, then the mean over seeds."""
    return "\n".join([
        f"Results ({results['corpus']} corpus, size {results['size']['name']}, equal training tokens: "
        f"{results['training_tokens_per_arm']:,} per arm; losses on held-out test text, lower is better)",
        "",
        _runs_table(results),
        "",
        "Mean over seeds",
        "",
        _summary_table(results),
    ])


def demo_report(results: Mapping[str, Any]) -> str:
    """``report.md`` of a demo run."""
    tasks = results["tasks"]
    parts = [
        "# TiKMiX demo report",
        "",
        f"Corpus: **{results['corpus']}** ({len(results['domains'])} domains), size preset "
        f"**{results['size']['name']}**, seeds {results['seeds']}, arms {results['arms']}. "
        f"Total time {results['seconds']['total'] / 60:.1f} min wall, {results['seconds']['cpu'] / 60:.1f} min CPU "
        f"(data {results['seconds']['data']:.0f} s), {results.get('threads') or 'default'} torch thread(s).",
        "",
        _setup_line(results),
        "",
        "## Validation tasks",
        "",
        "TiKMiX measures influence on one half of each target's held-out documents; every number below comes "
        "from the other half, which no arm trained on and no mixer looked at.",
        "",
        markdown_table(["task", "text", "test examples"],
                       [[t, src, results["test_sizes"][t]] for t, src in tasks.items()], "llr"),
        "",
        f"The loss of `{results['choice_task']}` is the cross-entropy of the true continuation after the prefix; "
        "its accuracy (chance 25%) is scored by the `choice_accuracy` evaluate module shipped in the package. "
        "`avg loss` is the mean over the tasks' losses; `all-domains loss` is the mean held-out loss over every "
        "training domain (the price paid outside the targets).",
        "",
        "## Results",
        "",
        _runs_table(results),
        "",
        "Mean over seeds (Δ < 0: lower loss than the static mixture at the same number of training tokens):",
        "",
        _summary_table(results),
        "",
        "`train s` is the wall time of training without the periodic held-out evaluation and `CPU s` the CPU time "
        "of the whole arm (evaluation included; on a busy machine it is the steadier number); `TiKMiX s` and "
        "`TiKMiX share` are the wall time of all stages (influence, solve; for a training window its validation "
        "pass and hooks) and its share of `train s`. `probe tokens` are the tokens the measurement read beyond "
        "training, forward and backward (probes and validation sequences; for a training window its validation "
        "sequences and top-up probes).",
    ]
    weights = _final_weights_table(results)
    if weights:
        parts += ["", "## Final mixtures (mean over seeds)", "", weights]
    if results.get("plots"):
        parts += ["", "## Pictures", ""]
        parts += [f"- [{p}]({p})" for p in results["plots"]]
        first = next((p for p in results["plots"] if "validation" in p), None)
        if first:
            parts += ["", f"![validation curves]({first})"]
    parts += ["", "## Domains", "", markdown_table(
        ["domain", "documents", "characters", "training blocks"],
        [[r["domain"], r["documents"], f"{r['characters']:,}", r["train_blocks"]] for r in results["domains"]],
    )]
    return "\n".join(parts) + "\n"
