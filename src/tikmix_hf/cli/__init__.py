"""The ``tikmix`` command line.

``tikmix demo``
    The main job: TiKMiX-D and TiKMiX-M against a static mixture on an embedded corpus, at equal
    training tokens (:func:`tikmix_hf.demo.run_demo`).
``tikmix train``
    A ``run_clm``-style training script: ``HfArgumentParser`` over :class:`ModelArguments`,
    :class:`DataArguments` and :class:`~tikmix_hf.TiKMiXTrainingArguments`, so every
    ``TrainingArguments`` flag and every ``--tikmix_*`` flag works. Launch it with ``torchrun`` or
    ``accelerate launch`` (``python -m tikmix_hf.cli train ...``) for several processes.
``tikmix plot``
    The pictures (and tables) of a ``history.json``, a run folder or a demo ``results.json``.
``tikmix influence``
    One-shot Group Influence of some domains on some validation sets for a saved model, and the
    TiKMiX-D mixture it recommends.
``tikmix schedule export``
    The schedule a run followed (its ``history.json``) as a YAML/JSON file to edit and replay with
    ``--tikmix_solver replay --tikmix_schedule``.

Domains and validation sets are given as ``NAME=PATH``, a YAML/JSON mapping file or inline JSON
(:mod:`.sources` has the formats).

Mistakes in the command line or in these files print one message (the argument, the value and
what to do instead) and exit with status 2; no traceback.

``tikmix demo`` and ``tikmix train`` build their own parsers when they run, so that only ``tikmix
demo`` loads the demo (:mod:`tikmix_hf.demo`) and only ``tikmix train`` loads transformers' parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .demo import cmd_demo
from .errors import USAGE_EXIT, UsageError
from .influence import cmd_influence
from .models import ModelArguments
from .plot import cmd_plot
from .schedule import add_schedule_parser
from .train import DataArguments, cmd_train, shutdown_distributed

__all__ = ["DataArguments", "ModelArguments", "UsageError", "build_parser", "main", "shutdown_distributed"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tikmix", description="TiKMiX dynamic data mixing for Hugging Face Trainer (arXiv 2508.17677).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,train,plot,influence,schedule}")

    sub.add_parser("demo", add_help=False,
                   help="TiKMiX against a static mixture on an embedded corpus (the main job).")
    sub.add_parser("train", add_help=False,
                   help="train with TiKMiX: run_clm-style HfArgumentParser flags (tikmix train --help)")

    plot = sub.add_parser("plot", help="pictures of a history.json (or a run folder, or a demo results.json)")
    plot.add_argument("history", metavar="HISTORY", help="<output_dir>/tikmix/history.json, its output_dir, or a "
                                                         "demo results.json")
    plot.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                      help="where the PNGs go (default: plots/ next to the history)")
    plot.add_argument("--total-steps", "--total_steps", dest="total_steps", type=int, default=None,
                      help="the run's max_steps (default: from trainer_state.json, else guessed from the stages)")
    plot.set_defaults(func=cmd_plot)

    inf = sub.add_parser("influence", help="one-shot influence matrix and TiKMiX-D mixture for a saved model")
    inf.add_argument("--model", required=True, help="a folder written by model.save_pretrained")
    inf.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the model's folder)")
    inf.add_argument("--domains", "--domain", dest="domains", nargs="+", action="extend", default=[],
                     help="NAME=PATH ..., a YAML/JSON mapping file, or inline JSON")
    inf.add_argument("--validation", nargs="+", action="extend", default=[], help="validation sets, like --domains")
    inf.add_argument("--text-column", "--text_column", dest="text_column", default="text")
    inf.add_argument("--block-size", "--block_size", dest="block_size", type=int, default=None,
                     help="tokens per block (default: min(128, the model's max_position_embeddings))")
    inf.add_argument("--probe-sequences", "--probe_sequences", dest="probe_sequences", type=int, default=16)
    inf.add_argument("--validation-sequences", "--validation_sequences", dest="validation_sequences", type=int,
                     default=16)
    inf.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
    inf.add_argument("--preconditioner", choices=("identity", "diag_fisher"), default="identity",
                     help="adam needs the training optimizer, which a saved model does not have")
    inf.add_argument("--prior", default="natural", help="natural, uniform or a JSON mapping (the Pareto reference)")
    inf.add_argument("--alpha", type=float, default=1.0)
    inf.add_argument("--beta", type=float, default=1.0)
    inf.add_argument("--gamma", type=float, default=1.0)
    inf.add_argument("--no-pareto", "--no_pareto", dest="no_pareto", action="store_true",
                     help="drop the constraint S w >= S prior")
    inf.add_argument("--seed", type=int, default=0)
    inf.add_argument("--output", default="influence.json", help="the JSON written (default: influence.json)")
    inf.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true")
    inf.set_defaults(func=cmd_influence)

    add_schedule_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tikmix``; returns the exit status (0, or 2 for a usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command == "demo":
            return cmd_demo(argv[1:])
        if command == "train":
            return cmd_train(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return USAGE_EXIT
        return args.func(args)
    except UsageError as err:
        print(f"tikmix {command}: error: {err}", file=sys.stderr)
        return USAGE_EXIT
    except SystemExit as done:  # argparse: --help (0) or a usage error (2)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else USAGE_EXIT)
    except KeyboardInterrupt:
        print("tikmix: interrupted", file=sys.stderr)
        return 130
