"""``tikmix demo``: the main job, TiKMiX against a static mixture on an embedded corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import UsageError


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import ARMS, SIZES, run_demo

    if args.size is not None and args.size not in SIZES:
        raise UsageError(f"--size {args.size}: use one of {list(SIZES)}")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise UsageError(f"--arms {' '.join(args.arms)}: unknown arm(s) {unknown}; use any of {list(ARMS)}")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        raise UsageError(f"--seeds {' '.join(map(str, args.seeds))}: give distinct non-negative integers, e.g. 0 1 2")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: give a positive number")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: exists and is not a folder; give a folder to write into")
    run_demo(corpus=args.corpus, quick=args.quick, output_dir=out, seeds=args.seeds, arms=args.arms, size=args.size,
             threads=args.threads, show_progress=not args.no_progress)
    return 0
