"""Reading a command's argument dataclass from the command line or from one JSON/YAML file.

Every `ace-hf` subcommand (and each examples/ script) parses its dataclass here, so they all accept the same
forms: `--flag value ...`, or a single `args.json` / `args.yaml` holding the same names. A mistake (an unknown
flag, a bad value, a contradiction caught by the dataclass) is one `error:` line and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from transformers import HfArgumentParser

Arguments = TypeVar("Arguments")


def parse_arguments(
    arguments_type: type[Arguments],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    prog: str | None = None,
    customize: Callable[[HfArgumentParser], None] | None = None,
) -> Arguments:
    """`arguments_type` from `argv` (default: sys.argv[1:]), or from the JSON/YAML file that is its only item."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(arguments_type, description=description, prog=prog)
    if customize is not None:
        customize(parser)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            (parsed,) = parser.parse_json_file(argv[0])
        elif len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            (parsed,) = parser.parse_yaml_file(argv[0])
        else:
            (parsed,) = parser.parse_args_into_dataclasses(argv)
    except (ValueError, TypeError, OSError) as error:
        parser.error(str(error))
    return parsed


def run_or_exit(function: Callable[[], Any], user_errors: tuple[type[BaseException], ...]) -> Any:
    """`function()`, with the user's mistakes (`user_errors`) shown as one `error:` line (exit code 1) instead of
    a traceback; any other exception is a bug and keeps its traceback."""
    try:
        return function()
    except user_errors as error:
        sys.exit(f"error: {error}")
