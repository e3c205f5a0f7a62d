"""Reading a command's argument dataclasses from the command line or from one JSON/YAML file, and the checks of
the options several commands share (a model to load, an inference size, a folder for results).

Every `ace-hf` subcommand (and each examples/ script) parses its dataclasses here, so they all accept the same
forms: `--flag value ...`, or a single `args.json` / `args.yaml` holding the same names. A mistake (an unknown
flag, a bad value, a contradiction caught by a dataclass's `__post_init__`) is argparse's usage and one
`error:` line, exit code 2; one found after parsing (`run_or_exit`) is one `error:` line, exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import HfArgumentParser

from .runs import OutputDirError, ensure_writable_folder

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# What a local path starts with; a Hub id never does.
LOCAL_PREFIXES = ("/", "./", "../", "~")
# Earlier results named in a refusal, at most.
HELD_NAMES_SHOWN = 3
# --report_to's trackers, each with Accelerate's check that its package is installed.
TRACKERS = {"tensorboard": "is_tensorboard_available", "wandb": "is_wandb_available"}


def tracker_available(name: str) -> bool:
    """Whether the tracker `name`'s package is installed, as Accelerate decides (it would only warn, then log
    nothing). Accelerate is imported here, not above: it loads torch, which `--help` must not wait for."""
    import accelerate.utils

    return getattr(accelerate.utils, TRACKERS[name])()


REPORT_TO_CHOICES = ("none", "all", *TRACKERS)


def option_field(help_text: str, default: Any = None, **metadata: Any) -> Any:
    """A dataclass field that is a command-line option: its description is written once, here, and `--help` shows
    it with the default."""
    return field(default=default, metadata={"help": help_text, **metadata})


class ModelSourceError(ValueError):
    """A model option names no model: a local folder that is not there, or one transformers cannot read."""


class SizeError(ValueError):
    """An inference size that the model's token stride does not divide."""


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


def check_model_source(value: str | None, option: str) -> None:
    """Refuse a model (or config) `value` that can only be a local path and is not there: ModelSourceError
    naming `option` (None, an option left out, passes).

    transformers tries a name that is not a folder on the Hub, so a mistyped path costs a wait and a traceback.
    A value reads as a local path when it starts with /, ./, ../ or ~, when the folder it would sit in exists
    here, or when it is not shaped like a Hub model id ("org/name"). An empty value names nothing (as a path it
    would be the current folder).
    """
    if value is None:
        return
    if not value.strip():
        raise ModelSourceError(
            f"{option} is empty: give a folder or a Hub model id (org/name), or leave it out"
        )
    path = Path(value).expanduser()
    if path.exists():
        return
    try:
        validate_repo_id(value)
        hub_shaped = value.count("/") == 1
    except HFValidationError:
        hub_shaped = False
    if value.startswith(LOCAL_PREFIXES) or (hub_shaped and path.parent.is_dir()):
        raise ModelSourceError(f"{option} {value}: no such file or folder")
    if not hub_shaped:
        raise ModelSourceError(f"{option} {value}: no such file or folder, nor a Hub model id (org/name)")


def read_model_config(
    value: str, option: str, config_class: type | None = None, **kwargs: Any
) -> PretrainedConfig:
    """The config of the model `value` names, as `config_class` (default: AutoConfig) reads it (cheap: checks can
    use it before the weights load); ModelSourceError naming `option` when it cannot be read (no config.json, an
    unknown or unreachable Hub id, a config `config_class` cannot read). Every command reads its models' configs
    here first, so this is where the ACE classes are registered with the Auto classes: ACE folders then load
    without trust_remote_code."""
    # Imported here, not above: they load torch, which `--help` and argument mistakes need not wait for.
    from transformers import AutoConfig

    from .auto import register_auto_classes

    check_model_source(value, option)
    register_auto_classes()
    config_class = config_class or AutoConfig
    try:
        return config_class.from_pretrained(value, **kwargs)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelSourceError(f"{option} {value}: {reason}") from None


def parse_size(text: str | int) -> int | dict[str, int]:
    """'512' -> 512 (square), '512x640' -> {"height": 512, "width": 640}; `check_size` checks the stride."""
    parts = str(text).lower().split("x")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"--size {text!r} is not N or HxW with positive integers")
    if len(parts) == 1:
        return int(parts[0])
    return {"height": int(parts[0]), "width": int(parts[1])}


def check_size(
    size: int | dict[str, int], stride: int, option: str = "--size", model: str = "the model"
) -> None:
    """SizeError naming `option` and the nearest valid sizes when `stride` does not divide `size` (an int for a
    square, or {"height", "width"}): the token map must tile the image."""
    height, width = (size, size) if isinstance(size, int) else (size["height"], size["width"])
    if not (height % stride or width % stride):
        return

    def below(pixels: int) -> int:
        return max(stride, pixels // stride * stride)

    def above(pixels: int) -> int:
        return -(-pixels // stride) * stride

    def shown(round_side: Callable[[int], int]) -> str:
        return (
            str(round_side(height)) if isinstance(size, int) else f"{round_side(height)}x{round_side(width)}"
        )

    given = str(size) if isinstance(size, int) else f"{height}x{width}"
    nearest = " or ".join(dict.fromkeys([shown(below), shown(above)]))
    raise SizeError(
        f"{option} {given} is not a multiple of {model}'s token stride {stride}: the nearest valid size is "
        f"{nearest}"
    )


def resolve_device(device: str | None) -> str:
    """`device` as given, else cuda when available, else cpu (decided when a command runs, not in its
    arguments' defaults: that would load torch before `--help`)."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_results_folder(folder: Path, results: Iterable[str], option: str, overwrite: bool) -> None:
    """Refuse (OutputDirError naming `option`) a folder holding an earlier run's `results` (glob patterns)
    unless `overwrite`, or one that cannot take a file. Runs before any model loads."""
    held = sorted(
        {found.relative_to(folder).as_posix() for pattern in results for found in folder.glob(pattern)}
    )
    if held and not overwrite:
        listed = ", ".join(held[:HELD_NAMES_SHOWN]) + (", ..." if len(held) > HELD_NAMES_SHOWN else "")
        raise OutputDirError(
            f"{option} {folder} already holds earlier results ({listed}): replace them with "
            "--overwrite_output_dir, or choose another folder."
        )
    ensure_writable_folder(folder, option)


def check_report_to(value: str) -> None:
    """Refuse an unknown --report_to backend, or one whose package is not installed (Accelerate would only warn
    once, then log nothing)."""
    if value not in REPORT_TO_CHOICES:  # argparse checks the choices; a dataclass built in code does not
        raise ValueError(f"--report_to {value!r} is not one of {', '.join(REPORT_TO_CHOICES)}")
    if value in TRACKERS and not tracker_available(value):
        raise ValueError(f"--report_to {value} needs the {value} package: pip install {value}")
    if value == "all" and not any(map(tracker_available, TRACKERS)):
        raise ValueError(f"--report_to all: none of {', '.join(TRACKERS)} is installed")
