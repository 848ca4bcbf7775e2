"""``tikmix demo``: the main job, TiKMiX against a static mixture on an embedded corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import UsageError


def demo_parser() -> argparse.ArgumentParser:
    from ..demo import ARMS
    from ..demo.arms import DEFAULT_ARMS

    parser = argparse.ArgumentParser(
        prog="tikmix demo",
        description="Train a static mixture, TiKMiX-D (default and paper objectives) and TiKMiX-M side by side at "
                    "equal training tokens and write report.md, results.json and pictures.",
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run (times in docs/demo.md)")
    parser.add_argument("--corpus", choices=("local", "synthetic"), default="local",
                        help="local: real text found on this machine (default); synthetic: domains with known roles")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default="runs/demo",
                        help="where results.json, report.md and plots/ go (default: runs/demo)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="model seeds, e.g. --seeds 0 1 2")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS),
                        help=f"any of {', '.join(ARMS)} (default: {' '.join(DEFAULT_ARMS)})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see docs/demo.md)")
    parser.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true",
                        help="no progress bars")
    parser.add_argument("--size", default=None, help=argparse.SUPPRESS)  # tiny: for tests
    return parser


def cmd_demo(argv: list[str]) -> int:
    from ..demo import ARMS, SIZES, run_demo

    args = demo_parser().parse_args(argv)
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
