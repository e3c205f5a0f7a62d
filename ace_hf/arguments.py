"""Reading a command's argument dataclasses from the command line or from one JSON/YAML file.

Every `ace-hf` subcommand (and each examples/ script) parses its dataclasses here, so they all accept the same
forms: `--flag value ...`, or a single `args.json` / `args.yaml` holding the same names. A mistake (an unknown
flag, a bad value, a contradiction caught by a dataclass's `__post_init__`) is argparse's usage and one
`error:` line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from transformers import HfArgumentParser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in each option's help, and the description's example commands kept as written."""


def parse_arguments(
    arguments_types: type | tuple[type, ...],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    prog: str | None = None,
    customize: Callable[[HfArgumentParser], None] | None = None,
) -> Any:
    """An instance of `arguments_types` (a tuple of instances for a tuple of types) from `argv` (default:
    sys.argv[1:]), or from the JSON/YAML file that is its only item."""
    argv = list(sys.argv[1:] if argv is None else argv)
    several = isinstance(arguments_types, tuple)
    parser = HfArgumentParser(
        arguments_types, description=description, prog=prog, formatter_class=HelpFormatter
    )
    if customize is not None:
        customize(parser)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            parsed = parser.parse_json_file(argv[0])
        elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            parsed = parser.parse_yaml_file(argv[0])
        else:
            parsed = parser.parse_args_into_dataclasses(argv)
    except (ValueError, TypeError, OSError) as error:
        parser.error(str(error))
    return tuple(parsed) if several else parsed[0]


def run_or_exit(function: Callable[[], Any], user_errors: tuple[type[BaseException], ...]) -> Any:
    """`function()`, with the user's mistakes (`user_errors`) shown as one `error:` line (exit code 1) instead of
    a traceback; any other exception is a bug and keeps its traceback."""
    try:
        return function()
    except user_errors as error:
        sys.exit(f"error: {error}")
