"""ace_hf.runs: output-folder refusal, run fingerprints and their comparison, segments, file modes."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ace_hf.arguments import parse_arguments
from ace_hf.pretraining import PretrainingArguments, pretrain
from ace_hf.runs import (
    LaunchError,
    OutputDirError,
    RunMismatchError,
    check_launch,
    check_output_dir,
    check_resume,
    checkpoint_dirs,
    clear_previous_run,
    close_segment,
    normal_file_permissions,
    read_run_record,
    run_fingerprint,
    write_run_record,
)
from tests.conftest import tiny_vit_config
from tests.test_pretrain_script import RESUME_ARGS, ROOT, _args, _write_images


def _finished_run(folder: Path) -> Path:
    (folder / "checkpoints" / "step_360").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text("{}")
    return folder


def test_check_launch_refuses_processes_that_did_not_join_the_run() -> None:
    check_launch(1, {})  # python or accelerate launch: no WORLD_SIZE
    check_launch(1, {"WORLD_SIZE": "4"})  # left in the environment, not a torchrun process
    check_launch(2, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    with pytest.raises(
        LaunchError, match=r"WORLD_SIZE=4.*only 1 joined.*ACCELERATE_USE_CPU=true torchrun --nproc_per_node 4"
    ):
        check_launch(1, {"WORLD_SIZE": "4", "LOCAL_RANK": "0"})


def test_a_folder_with_another_runs_work_is_refused_unless_resumed_or_overwritten(tmp_path) -> None:
    run = _finished_run(tmp_path / "run")
    with pytest.raises(
        OutputDirError, match=r"model.safetensors, config.json, checkpoints/.*--overwrite_output_dir"
    ):
        check_output_dir(run, resuming=False, overwrite=False, needed_bytes=0)
    check_output_dir(run, resuming=True, overwrite=False, needed_bytes=0)
    check_output_dir(run, resuming=False, overwrite=True, needed_bytes=0)
    assert clear_previous_run(run) == ["model.safetensors", "config.json", "checkpoints/"]
    assert not (run / "checkpoints").exists() and not (run / "model.safetensors").exists()
    check_output_dir(run, resuming=False, overwrite=False, needed_bytes=0)  # now empty: accepted


def test_under_make_the_refusal_says_how_to_pass_the_option(tmp_path, monkeypatch) -> None:
    run = _finished_run(tmp_path / "run")
    monkeypatch.delenv("MAKELEVEL", raising=False)
    with pytest.raises(OutputDirError) as refused:
        check_output_dir(run, resuming=False, overwrite=False, needed_bytes=0)
    assert "ARGS=" not in str(refused.value)
    monkeypatch.setenv("MAKELEVEL", "1")
    with pytest.raises(
        OutputDirError, match=r'--overwrite_output_dir \(through make: ARGS="--overwrite_output_dir"\)'
    ):
        check_output_dir(run, resuming=False, overwrite=False, needed_bytes=0)


@pytest.mark.skipif(
    shutil.which("make") is None or not (ROOT / ".venv" / "bin" / "python").exists(),
    reason="needs make and .venv",
)
def test_make_pretrain_passes_args_and_refuses_an_occupied_folder_in_one_line(tmp_path) -> None:
    """`make pretrain` a second time: one error line naming the way out (and make's own note of the failure)."""
    output = _finished_run(tmp_path / "run")
    result = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "pretrain", f"ARGS=--output_dir {output}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"error: --output_dir {output} already holds another run's work")
    assert 'ARGS="--overwrite_output_dir"' in errors[0]
    # make's own note of the failure ("make[1]: ***" when the suite itself runs under `make test`)
    assert re.match(r"make(\[\d+\])?: \*\*\*", result.stderr.splitlines()[-1]), result.stderr


def test_output_paths_are_checked_with_one_clear_line(tmp_path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        check_output_dir(a_file, resuming=False, overwrite=False, needed_bytes=0)
    with pytest.raises(OutputDirError, match="GiB free"):
        check_output_dir(tmp_path / "new", resuming=False, overwrite=False, needed_bytes=2**62)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputDirError, match="not writable"):
            check_output_dir(locked / "out", resuming=False, overwrite=False, needed_bytes=0)
    with pytest.raises(OutputDirError, match="not writable"):
        check_output_dir(Path("/proc/forbidden"), resuming=False, overwrite=False, needed_bytes=0)


CHECKPOINT = Path("outputs/checkpoints/step_6")


def _record(step: int, **fields) -> dict:
    return {"state": {"step": step}, "fingerprint": run_fingerprint(**fields), "segments": []}


def test_resume_names_every_differing_field_and_accepts_allowed_ones() -> None:
    fields = {"config": {"hidden_size": 8, "depths": (2, 2)}, "global_batch": 16, "learning_rate": 2e-3}
    saved = _record(6, **fields)
    assert check_resume(CHECKPOINT, saved, run_fingerprint(**fields), total_steps=10, allowed=set()) == {}
    current = run_fingerprint(
        config={"hidden_size": 16, "depths": (2, 2)}, global_batch=32, learning_rate=2e-3
    )
    with pytest.raises(RunMismatchError) as error:
        check_resume(CHECKPOINT, saved, current, total_steps=10, allowed=set())
    message = str(error.value)
    assert "config.hidden_size: 8 -> 16" in message and "global_batch: 16 -> 32" in message
    assert "learning_rate" not in message and "depths" not in message
    assert "--allow_run_changes config.hidden_size,global_batch" in message
    changes = check_resume(
        CHECKPOINT, saved, current, total_steps=10, allowed={"config.hidden_size", "global_batch"}
    )
    assert changes == {"config.hidden_size": [8, 16], "global_batch": [16, 32]}
    assert check_resume(CHECKPOINT, saved, current, total_steps=10, allowed={"all"}) == changes


def test_a_checkpoint_past_the_planned_end_is_refused() -> None:
    saved = _record(360, total_steps=360)
    with pytest.raises(RunMismatchError, match="step 360, past this run's 6 planned steps"):
        check_resume(CHECKPOINT, saved, run_fingerprint(total_steps=6), total_steps=6, allowed={"all"})


def test_run_records_round_trip_and_old_checkpoints_are_named(tmp_path) -> None:
    record = _record(4, seed=0)
    write_run_record(tmp_path, record)
    assert read_run_record(tmp_path) == record
    with pytest.raises(RunMismatchError, match="no ace_run.json.*older ace-hf"):
        read_run_record(tmp_path / "missing")


def test_segments_accumulate_with_their_changes() -> None:
    segments = close_segment([], 0, 6, 12.34, {})
    segments = close_segment(segments, 6, 10, 5.0, {"learning_rate": [1e-3, 2e-3]})
    assert segments == [
        {"steps": [0, 6], "wall_time_s": 12.3},
        {"steps": [6, 10], "wall_time_s": 5.0, "changes": {"learning_rate": [1e-3, 2e-3]}},
    ]


def test_exported_files_get_the_umask_mode_and_nothing_else_changes(tmp_path) -> None:
    private, secret = tmp_path / "model.safetensors", tmp_path / ".netrc"
    for path in (private, secret):
        path.write_bytes(b"x")
        path.chmod(0o600)
    old = os.umask(0o022)
    try:
        normal_file_permissions(
            tmp_path, ["model.safetensors", "config.json"]
        )  # config.json: absent, skipped
    finally:
        os.umask(old)
    assert private.stat().st_mode & 0o777 == 0o644
    assert secret.stat().st_mode & 0o777 == 0o600  # not the export's: left alone


# ------------------------------------------------------------------ the same guarantees through ace-hf pretrain


def _pretrain(argv: list[str]) -> dict:
    """`ace-hf pretrain ARGV` without the command's one-line error formatting: these tests check the errors."""
    return pretrain(parse_arguments(PretrainingArguments, argv)).summary


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data, tiny config folder, output folder of a finished 6-step run with checkpoints at 2, 4, 6)."""
    root = tmp_path_factory.mktemp("runs")
    data = _write_images(root / "data", 12)
    config_dir = root / "config"
    tiny_vit_config().save_pretrained(config_dir)
    _pretrain(_args(data, config_dir, root / "done", *RESUME_ARGS))
    return data, config_dir, root / "done"


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_a_quick_run_never_overwrites_a_finished_model(tmp_path, finished_run) -> None:
    data, config_dir, done = finished_run
    output = _copy(done, tmp_path)
    weights = (output / "model.safetensors").read_bytes()
    with pytest.raises(OutputDirError, match="already holds another run"):
        _pretrain(_args(data, config_dir, output, "--max_steps", "3"))
    assert (output / "model.safetensors").read_bytes() == weights
    summary = _pretrain(_args(data, config_dir, output, "--max_steps", "3", "--overwrite_output_dir"))
    assert summary["steps"] == 3 and [p.name for p in checkpoint_dirs(output)] == ["step_3"]
    assert summary["segments"] == [{"steps": [0, 3], "wall_time_s": summary["wall_time_s"]}]


def test_resume_refuses_another_run_and_records_deliberate_changes(tmp_path, finished_run) -> None:
    data, config_dir, done = finished_run
    output = _copy(done, tmp_path)
    resume = ("--resume_from_checkpoint", "latest")
    with pytest.raises(RunMismatchError, match="step 6, past this run's 3 planned steps"):
        _pretrain(_args(data, config_dir, output, "--max_steps", "3", *resume))

    other_preset = tmp_path / "other-config"
    tiny_vit_config(hidden_size=48).save_pretrained(other_preset)
    with pytest.raises(RunMismatchError, match=r"config.hidden_size: 32 -> 48"):
        _pretrain(_args(data, other_preset, output, *RESUME_ARGS, *resume))

    longer = ("--num_train_epochs", "3", "--checkpointing_steps", "2", "--learning_rate", "5e-3")
    with pytest.raises(RunMismatchError, match=r"learning_rate: 0.01 -> 0.005; total_steps: 6 -> 9"):
        _pretrain([*_args(data, config_dir, output, *resume), *longer])
    allow = ("--allow_run_changes", "learning_rate,total_steps")
    summary = _pretrain([*_args(data, config_dir, output, *resume), *longer, *allow])
    assert summary["steps"] == 9
    first, second = summary["segments"]
    assert first["steps"] == [0, 6] and "changes" not in first
    assert second["steps"] == [6, 9]
    assert second["changes"] == {"learning_rate": [0.01, 0.005], "total_steps": [6, 9]}
    assert summary["wall_time_s"] == pytest.approx(first["wall_time_s"] + second["wall_time_s"], abs=0.11)
    card = (output / "README.md").read_text()
    assert "steps 0-6" in card and "resumed with learning_rate 0.01 -> 0.005" in card


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, finished_run, caplog) -> None:
    data, config_dir, done = finished_run
    output = _copy(done, tmp_path)
    before = {
        path: (path.read_bytes(), path.stat().st_mtime_ns) for path in output.rglob("*") if path.is_file()
    }
    caplog.set_level(logging.INFO)
    summary = _pretrain(_args(data, config_dir, output, *RESUME_ARGS, "--resume_from_checkpoint", "latest"))
    assert f"The run in {output} is finished (step 6) and exported: nothing to do." in caplog.text
    assert summary == json.loads((output / "training_summary.json").read_text())
    assert "final_loss" in summary and len(summary["segments"]) == 1
    after = {
        path: (path.read_bytes(), path.stat().st_mtime_ns) for path in output.rglob("*") if path.is_file()
    }
    assert after == before


def test_the_export_is_readable_by_colleagues(finished_run) -> None:
    done = finished_run[2]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "README.md", "pretraining_heads.safetensors"):
        assert (done / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_overwrite_never_clears_the_model_the_run_starts_from(tmp_path, finished_run) -> None:
    data, config_dir, done = finished_run
    output = _copy(done, tmp_path)
    with pytest.raises(OutputDirError, match="--model_name_or_path .* lies inside --output_dir"):
        _pretrain(
            [
                *_args(data, config_dir, output, "--max_steps", "2", "--overwrite_output_dir"),
                "--model_name_or_path",
                str(output),
            ]
        )
    assert (output / "model.safetensors").is_file() and (output / "checkpoints").is_dir()


def test_going_back_to_an_older_checkpoint_needs_the_newer_ones_moved(tmp_path, finished_run) -> None:
    data, config_dir, done = finished_run
    output = _copy(done, tmp_path)
    older = output / "checkpoints" / "step_4"
    with pytest.raises(RunMismatchError, match=r"newer than step_4 \(step_6\)"):
        _pretrain(_args(data, config_dir, output, *RESUME_ARGS, "--resume_from_checkpoint", str(older)))


def test_the_same_data_in_another_place_resumes(tmp_path, finished_run) -> None:
    """A job that copies its data to a scratch disk resumes: the fingerprint keeps the folder name, not the path."""
    data, config_dir, done = finished_run
    output = _copy(done, tmp_path)
    moved = Path(shutil.copytree(data, tmp_path / "scratch" / data.name))
    summary = _pretrain(_args(moved, config_dir, output, *RESUME_ARGS, "--resume_from_checkpoint", "latest"))
    assert summary["steps"] == 6


def test_a_checkpoint_that_counted_skipped_reads_still_resumes(tmp_path, finished_run) -> None:
    """Checkpoints written before bad files were counted by name hold `skipped_images` (a count of reads)."""
    data, config_dir, done = finished_run
    output = _copy(done, tmp_path)
    shutil.rmtree(output / "checkpoints" / "step_6")
    checkpoint = output / "checkpoints" / "step_4"
    record = read_run_record(checkpoint)
    record["state"].pop("skipped_files")
    record["state"]["skipped_images"] = 3
    write_run_record(checkpoint, record)
    summary = _pretrain(_args(data, config_dir, output, *RESUME_ARGS, "--resume_from_checkpoint", "latest"))
    assert summary["steps"] == 6 and summary["skipped_images"] == 0
