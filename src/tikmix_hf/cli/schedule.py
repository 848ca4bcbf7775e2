"""``tikmix schedule export``: the schedule a run followed, as a file a person can read, edit and replay."""

from __future__ import annotations

import argparse

from .errors import UsageError


def add_schedule_parser(sub) -> None:
    sched = sub.add_parser("schedule", help="the mixture schedule of a run, as a file to edit and replay")
    export = sched.add_subparsers(dest="action", required=True).add_parser(
        "export", help="history.json -> schedule.yaml (replay it with --tikmix_solver replay --tikmix_schedule)")
    export.add_argument("history", metavar="HISTORY", help="<output_dir>/tikmix/history.json or its output_dir")
    export.add_argument("-o", "--output", default=None, help="*.yaml or *.json (default: schedule.yaml beside it)")
    export.add_argument("--total-steps", "--total_steps", dest="total_steps", type=int, default=None,
                        help="the run's max_steps, for histories that do not record it")
    export.add_argument("--final", action="store_true",
                        help="write only the run's last weights, from the first sample on: its static mixture")
    export.set_defaults(func=cmd_schedule_export)


def cmd_schedule_export(args: argparse.Namespace) -> int:
    from ..schedule import export_schedule

    try:
        print(export_schedule(args.history, args.output, total_steps=args.total_steps, final=args.final))
    except (ValueError, ImportError, OSError) as err:
        raise UsageError(str(err)) from None
    return 0
