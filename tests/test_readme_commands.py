"""Every command line printed in README.md's bash blocks is accepted by the parser it reaches: a renamed or
removed flag fails here, not in a new user's terminal. Only the arguments are parsed (no data, no model), in a
folder holding empty stand-ins for the paths the commands name."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from accelerate.commands.launch import launch_command_parser

from ace_hf.arguments import parse_arguments
from ace_hf.commands import SUBCOMMANDS
from ace_hf.commands.convert import ConversionArguments
from ace_hf.commands.extract_features import FeatureExtractionArguments
from ace_hf.commands.visualize import VisualizationArguments
from ace_hf.evaluation.arguments import EvaluationArguments
from ace_hf.evaluation.config import EvaluationConfig
from ace_hf.finetuning import FinetuningArguments
from ace_hf.pretraining import PretrainingArguments
from ace_hf.pretraining.cli import add_view_flags

README = Path(__file__).resolve().parent.parent / "README.md"

# subcommand -> (the argument dataclasses its main() parses, the parser customization it applies)
PARSERS = {
    "pretrain": (PretrainingArguments, add_view_flags),
    "finetune": (FinetuningArguments, None),
    "evaluate": ((EvaluationArguments, EvaluationConfig), None),
    "extract-features": (FeatureExtractionArguments, None),
    "visualize": (VisualizationArguments, None),
    "convert": (ConversionArguments, None),
}
# examples/ script -> the subcommand it fronts
EXAMPLE_SCRIPTS = {
    "examples/pretrain.py": "pretrain",
    "examples/finetune.py": "finetune",
    "examples/run_evaluation.py": "evaluate",
    "examples/extract_features.py": "extract-features",
    "examples/visualize.py": "visualize",
}
# Options whose value must exist while parsing, and what to put there: a folder or a file.
PATH_OPTIONS = {
    "--train_dir": "folder",
    "--model_name_or_path": "folder",
    "--input": "folder",
    "--checkpoint": "file",
    "--train_csv": "file",
    "--validation_csv": "file",
}


def readme_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(line.strip())
    return commands


def subcommand_of(command: str) -> tuple[str, list[str]] | None:
    """(subcommand, its options) of an `ace-hf`, `python examples/...` or `accelerate launch -m ace_hf` line; None
    for other commands (make, pytest). Accelerate's own flags must be ones `accelerate launch` accepts."""
    tokens = shlex.split(command, comments=True)
    if tokens[:1] == ["ace-hf"]:
        return tokens[1], tokens[2:]
    if tokens[:1] == ["python"] and tokens[1] in EXAMPLE_SCRIPTS:
        return EXAMPLE_SCRIPTS[tokens[1]], tokens[2:]
    if tokens[:2] == ["accelerate", "launch"]:
        launch = launch_command_parser().parse_args(tokens[2:])
        assert launch.module and launch.training_script == "ace_hf", command
        return launch.training_script_args[0], launch.training_script_args[1:]
    return None


def with_stand_ins(options: list[str], root: Path) -> list[str]:
    """`options` with each path that must exist created under `root` (an absolute one moved there)."""
    options = list(options)
    for index, option in enumerate(options[:-1]):
        if option in PATH_OPTIONS:
            value = options[index + 1].lstrip("/")
            path = root / value
            if PATH_OPTIONS[option] == "folder":
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            options[index + 1] = value
    return options


COMMANDS = [command for command in readme_commands(README.read_text()) if subcommand_of(command)]


def test_the_readme_prints_a_command_for_each_job() -> None:
    printed = {subcommand_of(command)[0] for command in COMMANDS}
    assert {"pretrain", "finetune", "evaluate", "convert"} <= printed, printed
    assert set(PARSERS) == set(SUBCOMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=[command[:60] for command in COMMANDS])
def test_each_readme_command_parses(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name, options = subcommand_of(command)
    arguments_types, customize = PARSERS[name]
    parse_arguments(
        arguments_types, with_stand_ins(options, tmp_path), prog=f"ace-hf {name}", customize=customize
    )
