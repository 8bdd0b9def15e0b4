"""``python -m spfm.train RECIPE.yaml [--resume] [--set key=value ...]``, the entry point for ``accelerate launch``.

``spfm train`` on the command line is the same command (it reuses :func:`add_arguments` and :func:`run`).

Example::

    accelerate launch --num_processes 4 -m spfm.train recipes/pretrain_her2st.yaml --set optim.max_steps=2000
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``spfm train`` / ``python -m spfm.train``."""
    parser.add_argument("recipe", help="recipe YAML file (see recipes/)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set optim.max_steps=100 (repeatable)")
    parser.add_argument("--stop-after", type=int, metavar="STEP",
                        help="end this run after STEP optimiser steps, with a checkpoint (resume later)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Train as ``args.recipe`` says; print the final metrics as JSON on the main process."""
    from accelerate import PartialState

    from spfm.train import train

    try:
        metrics = train(args.recipe, resume=args.resume, overrides=args.overrides, stop_after=args.stop_after)
    finally:
        PartialState().destroy_process_group()
    if PartialState().is_main_process:
        print(json.dumps(metrics))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from spfm.errors import SpfmError

    parser = add_arguments(argparse.ArgumentParser(prog="python -m spfm.train", description="Train as a recipe says."))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SpfmError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
