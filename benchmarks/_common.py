"""What every evidence benchmark shares: the command-line flags, the output files, the bench-size model.

Each script writes ``<out>/<name>.json`` (every number) and ``<out>/<name>.md`` (the tables that
``benchmarks/run_all.py`` pastes into ``benchmarks/RESULTS.md``), and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every evidence script takes: ``--quick`` and ``--out``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few-minute run that exercises every code path")
    p.add_argument("--out", type=Path, default=OUT, help=f"folder for the JSON and markdown (default {OUT})")
    return p


def one_thread() -> None:
    """Set up a worker process (or this one) for the benchmarks' runs: one torch thread, quiet transformers."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()


def process_pool(workers: int):
    """``workers`` fresh processes (spawned, so no torch state is forked), each set up by :func:`one_thread`.

    The scripts whose runs are independent trainings (quality, fidelity, transfer) run them two at a
    time on the two cores; the timing benchmarks never do.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=one_thread)


def bench_size(quick: bool, **changes):
    """The model and run size of the quality, fidelity and cost benchmarks (a ``DemoSize``).

    Full: a 2-layer Llama of 64 hidden units on 128-token blocks, 400 steps of 16 blocks (about
    30 s an arm on one CPU thread). Quick: the demo's ``tiny`` preset, seconds an arm.
    """
    from tikmix_hf.demo import SIZES

    if quick:
        base = dataclasses.replace(SIZES["tiny"], name="bench-quick", max_steps=32, eval_every=16)
    else:
        base = dataclasses.replace(
            SIZES["default"], name="bench", hidden_size=64, layers=2, heads=4, max_steps=400, eval_every=100,
            validation_sequences=16, probe_sequences=8, surrogate_candidates=24,
        )
    return dataclasses.replace(base, **changes)


def write(name: str, out: Path, doc: dict[str, Any], markdown: str, *, started: float | None = None) -> None:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.md`` (atomically enough: each file in one call)."""
    out.mkdir(parents=True, exist_ok=True)
    doc = dict(doc)
    doc.setdefault("machine", {"cpus": os.cpu_count(), "python": platform.python_version(),
                               "platform": platform.platform()})
    if started is not None:
        doc["seconds_total"] = time.perf_counter() - started
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, default=float))
    tmp.replace(out / f"{name}.json")
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}", file=sys.stderr)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats are written as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
