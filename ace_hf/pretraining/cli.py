"""`ace-hf pretrain`: pretrain an ACE encoder, then export (and push) it.

ace-hf pretrain                                         # tiny preset on the built-in chest DRRs (CPU ok)
ace-hf pretrain --train_dir my_xrays --model_preset ace-vit-b
accelerate launch --num_processes 8 -m ace_hf pretrain --dataset_name org/cxr --model_preset ace-swin-b
ace-hf pretrain args.yaml                               # the same arguments from a file
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ..arguments import parse_arguments, run_or_exit
from ..runs import LaunchError, OutputDirError, RunMismatchError
from .arguments import PretrainingArguments


def add_view_flags(parser: argparse.ArgumentParser) -> None:
    """`--views_on_device` alone means true, `--no-views_on_device` keeps the views on the data-loader workers
    even on CUDA; unset, the device decides (HfArgumentParser gives an optional bool neither form)."""
    for action in parser._actions:
        if action.dest == "views_on_device":
            action.nargs, action.const = "?", True
    parser.add_argument(
        "--no-views_on_device", dest="views_on_device", action="store_false", help=argparse.SUPPRESS
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the arguments, pretrain, and return the training summary."""
    args = parse_arguments(
        PretrainingArguments, argv, description=__doc__, prog="ace-hf pretrain", customize=add_view_flags
    )
    # Imported once the arguments hold: they load torch, which `--help` and argument mistakes need not wait for.
    from ..hub import HubPushError
    from .loop import pretrain

    # Refused before anything was loaded or written (or, for a push, failed after the export): one line.
    user_errors = (HubPushError, LaunchError, OutputDirError, RunMismatchError)
    result = run_or_exit(lambda: pretrain(args), user_errors)
    return result.summary


if __name__ == "__main__":
    main()
