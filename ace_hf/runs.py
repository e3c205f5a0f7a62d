"""Runs that never destroy or mislabel work: output-folder checks, run fingerprints and run segments.

A pretraining or fine-tuning run writes its checkpoints (`output_dir/checkpoints/step_N`) and its model into
one output folder. These helpers make sure a new run does not write over another run's work, that a resume
continues the same run (or records what changed), and that the training summary describes every segment of a
resumed run. Standard library only: the command line checks output folders before torch loads (preparing a
folder across processes is `ace_hf.checkpointing.prepare_output_dir`).

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Written into every checkpoint folder: the run's fingerprint, its progress and its segments so far.
RUN_FILE = "ace_run.json"
# Files that mark a folder as holding a finished export.
EXPORT_MARKERS = ("model.safetensors", "config.json", "training_summary.json")
# A checkpoint's folder name in output_dir/checkpoints, before its optimizer step.
CHECKPOINT_PREFIX = "step_"


class OutputDirError(ValueError):
    """The output folder cannot take this run (another run's work, not writable, too little disk)."""


class RunMismatchError(ValueError):
    """A checkpoint belongs to another run, or lies past the planned end of this one."""


class LaunchError(RuntimeError):
    """The launcher started more processes than joined the run: each would train alone into the same folder."""


def check_launch(num_processes: int, environ: Mapping[str, str] = os.environ) -> None:
    """Fail before anything is written when the launcher's WORLD_SIZE exceeds the processes Accelerate runs.

    torchrun on a machine without CUDA starts N processes, but Accelerate makes each a run of its own unless it is
    told to use the CPU: N copies would then train the same model and write the same output folder at once.
    """
    # Only processes started by torchrun / torch.distributed (a stale WORLD_SIZE alone is no launch).
    if "LOCAL_RANK" not in environ:
        return
    launched = int(environ.get("WORLD_SIZE", "1"))
    if launched > num_processes:
        raise LaunchError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}) but only {num_processes} joined "
            f"this run, so each would train alone and write the same --output_dir. On CPUs, set "
            f"ACCELERATE_USE_CPU=true: `ACCELERATE_USE_CPU=true torchrun --nproc_per_node {launched} "
            "examples/pretrain.py ...`."
        )


def other_runs_work(output_dir: Path) -> list[str]:
    """What in `output_dir` belongs to an earlier run: its export files and its checkpoints folder."""
    held = [name for name in EXPORT_MARKERS if (output_dir / name).exists()]
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        held.append("checkpoints/")
    return held


def ensure_writable_folder(folder: Path, flag: str) -> None:
    """Create `folder` if needed and prove it takes a file; OutputDirError naming `flag` otherwise."""
    if folder.exists() and not folder.is_dir():
        raise OutputDirError(f"{flag} {folder} is a file, not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise OutputDirError(f"{flag} {folder} is not writable: {error.strerror or error}.") from None


def check_output_dir(
    output_dir: Path,
    *,
    resuming: bool,
    overwrite: bool,
    needed_bytes: int,
    inputs: Mapping[str, str | None] | None = None,
) -> None:
    """Fail with one line before any model or data is loaded when `output_dir` cannot take this run.

    A folder holding another run's export or checkpoints is refused unless the run resumes from it or
    `overwrite` is set, and `overwrite` is refused when one of the run's `inputs` ({flag: path}) lies inside
    the folder it would clear; the folder must be writable and have room for one checkpoint.
    """
    if overwrite and not resuming and output_dir.is_dir():
        for flag, path in (inputs or {}).items():
            if path and Path(path).exists() and Path(path).resolve().is_relative_to(output_dir.resolve()):
                raise OutputDirError(
                    f"{flag} {path} lies inside --output_dir {output_dir}, which --overwrite_output_dir would "
                    "clear first: write this run to another folder."
                )
    held = other_runs_work(output_dir) if output_dir.is_dir() else []
    if held and not (resuming or overwrite):
        # Under make, the options go through its ARGS variable.
        through_make = ' (through make: ARGS="--overwrite_output_dir")' if "MAKELEVEL" in os.environ else ""
        raise OutputDirError(
            f"--output_dir {output_dir} already holds another run's work ({', '.join(held)}): continue it with "
            f"--resume_from_checkpoint latest, replace it with --overwrite_output_dir{through_make}, or choose "
            "another folder."
        )
    ensure_writable_folder(output_dir, "--output_dir")
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise OutputDirError(
            f"--output_dir {output_dir} has {free / 2**30:.2f} GiB free; one checkpoint needs about "
            f"{needed_bytes / 2**30:.2f} GiB."
        )


def clear_previous_run(output_dir: Path, also: Iterable[str] = ()) -> list[str]:
    """For --overwrite_output_dir: remove the earlier run's checkpoints and export files, so that neither
    'latest' nor checkpoint rotation can mix them with this run's, and the files `also` names (what only this
    kind of run writes beside its model). Returns what was removed."""
    removed = other_runs_work(output_dir)
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    for name in EXPORT_MARKERS:
        (output_dir / name).unlink(missing_ok=True)
    for name in also:
        if (output_dir / name).exists():
            (output_dir / name).unlink()
            removed.append(name)
    return removed


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    found = [path for path in (output_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()]
    return sorted(found, key=lambda path: int(path.name.removeprefix(CHECKPOINT_PREFIX)))


def resolve_checkpoint(resume_from: str, output_dir: Path) -> Path | None:
    """The checkpoint to resume from; refuse an older one of this folder while newer ones exist, or 'latest'
    and the checkpoint rotation would later pick up the abandoned attempt again."""
    found = checkpoint_dirs(output_dir)
    if resume_from == "latest":
        return found[-1] if found else None
    checkpoint = Path(resume_from)  # an existing folder: the run's arguments check it
    if checkpoint.resolve().parent == (output_dir / "checkpoints").resolve():
        step = int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))
        if newer := [path.name for path in found if int(path.name.removeprefix(CHECKPOINT_PREFIX)) > step]:
            raise RunMismatchError(
                f"{output_dir} holds checkpoints newer than {checkpoint.name} ({', '.join(newer)}): move them "
                "out of the folder to go back to this one, or resume from 'latest'."
            )
    return checkpoint


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def run_fingerprint(**fields: Any) -> dict[str, Any]:
    """What makes two segments one run, flattened to dotted names ("config.hidden_size") and JSON values.

    Pass the model config (as a dict), the data description and size, the global batch, the schedule lengths,
    the optimization settings, the seed and the package version.
    """
    return json.loads(json.dumps(_flatten(fields)))


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Fields whose value differs (or that only one side has), as {field: [saved, current]}."""
    return {
        name: [saved.get(name), current.get(name)]
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    }


def check_resume(
    checkpoint: Path,
    record: Mapping[str, Any],
    fingerprint: Mapping[str, Any],
    *,
    total_steps: int,
    allowed: set[str] | None = None,
) -> dict[str, list[Any]]:
    """Refuse `checkpoint` (whose run record is `record`) when it is from another run or past `total_steps`;
    return the allowed changes.

    `allowed` names the fields the user changed on purpose (--allow_run_changes; "all" allows any); None for a
    run without that option, which allows no change.
    """
    step = record["state"]["step"]
    if step > total_steps:
        allow = " (and allow the change with --allow_run_changes total_steps)" if allowed is not None else ""
        raise RunMismatchError(
            f"--resume_from_checkpoint {checkpoint} is at step {step}, past this run's {total_steps} planned "
            f"steps: raise --max_steps or --num_train_epochs{allow}."
        )
    changes = fingerprint_differences(record.get("fingerprint", {}), fingerprint)
    permitted = allowed or set()
    refused = {
        name: values for name, values in changes.items() if name not in permitted and "all" not in permitted
    }
    if refused:
        listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in refused.items())
        advice = (
            "Start a new run in another --output_dir, or replace this one with --overwrite_output_dir."
            if allowed is None
            else f"If the change is deliberate, pass --allow_run_changes {','.join(refused)} (it is recorded in "
            "the training summary and the model card)."
        )
        raise RunMismatchError(
            f"--resume_from_checkpoint {checkpoint} comes from a different run. Differing fields: {listed}. "
            + advice
        )
    return changes


def finished_run_summary(output_dir: Path, step: int, total_steps: int) -> dict[str, Any] | None:
    """The training summary of the export in `output_dir` when the run resumed at `step` has already ended there
    (its last step, exported from it): resuming a finished run then changes nothing. None otherwise."""
    if step < total_steps or not all((output_dir / name).is_file() for name in EXPORT_MARKERS):
        return None
    summary = json.loads((output_dir / "training_summary.json").read_text())
    return summary if summary.get("steps") == step else None


def write_run_record(folder: Path, record: Mapping[str, Any]) -> None:
    (folder / RUN_FILE).write_text(json.dumps(record, indent=2))


def read_run_record(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / RUN_FILE
    if not path.is_file():
        raise RunMismatchError(
            f"{checkpoint} has no {RUN_FILE}: it was written by an older ace-hf and cannot be checked against "
            "this run. Start a new run in another --output_dir."
        )
    return json.loads(path.read_text())


def close_segment(
    segments: list[dict[str, Any]], start_step: int, end_step: int, wall_time_s: float, changes: Mapping
) -> list[dict[str, Any]]:
    """The run's segments with the current one appended (earlier segments come from the checkpoint)."""
    segment = {"steps": [start_step, end_step], "wall_time_s": round(wall_time_s, 1)}
    if changes:
        segment["changes"] = dict(changes)
    return [*segments, segment]


def normal_file_permissions(folder: Path, names: Iterable[str]) -> None:
    """Give the files `names` of `folder` (those an export wrote, nothing else) the mode a new file gets here
    (0666 less the umask): some writers use 0600, which hides a shared model from colleagues."""
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        if (folder / name).is_file():
            (folder / name).chmod(0o666 & ~umask)
