"""Faults during pretraining: kill -9 in a step and in a checkpoint write, a full disk while saving, and Ctrl-C
under `accelerate launch`.

After each crash, `--resume_from_checkpoint latest` must skip what was half written and end bit-identical to an
uninterrupted run (the tiny model of tests/test_pretrain_script.py: 12 images, batch 4, 6 steps).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import accelerate.checkpointing
import pytest
import torch
from safetensors.torch import load_file

from ace_hf.pretraining.cli import main
from ace_hf.runs import checkpoint_dirs
from tests.conftest import tiny_vit_config
from tests.test_pretrain_script import RESUME_ARGS, ROOT, _args, _write_images

# Runs the pretraining command in a child process that SIGKILLs itself at a chosen point: no handler, no cleanup,
# no flush, as when the machine or the OOM killer takes the process.
KILLING_CHILD = """
import os, signal, sys
import accelerate.checkpointing
from ace_hf import AceForPreTraining

from ace_hf.pretraining.cli import main

where, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where == "step":  # inside optimizer step `at`, after the backward pass
    update, calls = AceForPreTraining.update_teacher, [0]
    def update_then_die(self, momentum):
        calls[0] += 1
        if calls[0] == at:
            die()
        return update(self, momentum)
    AceForPreTraining.update_teacher = update_then_die
else:  # half-way through writing the optimizer file of the checkpoint at step `at`
    save = accelerate.checkpointing.save
    def save_half_then_die(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        if f"step_{at}" in str(path) and "optimizer" in os.path.basename(str(path)):
            with open(path, "r+b") as file:
                file.truncate(os.path.getsize(path) // 2)
            die()
    accelerate.checkpointing.save = save_half_then_die
main(argv)
"""


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """The data, the tiny config and the weights of an uninterrupted 6-step run."""
    root = tmp_path_factory.mktemp("faults")
    data = _write_images(root / "data", 12)
    config_dir = root / "config"
    tiny_vit_config().save_pretrained(config_dir)
    main(_args(data, config_dir, root / "straight", *RESUME_ARGS))
    return data, config_dir, load_file(root / "straight" / "checkpoints" / "step_6" / "model.safetensors")


def _run_killed(where: str, at: int, argv: list[str]) -> None:
    child = subprocess.run(
        [sys.executable, "-c", KILLING_CHILD, where, str(at), *argv], cwd=ROOT, capture_output=True, text=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]


def _resume_and_compare(output: Path, data: Path, config_dir: Path, expected: dict) -> None:
    summary = main(_args(data, config_dir, output, *RESUME_ARGS, "--resume_from_checkpoint", "latest"))
    assert summary["steps"] == 6
    resumed = load_file(output / "checkpoints" / "step_6" / "model.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), key


def test_kill_9_during_a_step_resumes_bit_identical(tmp_path, straight_run) -> None:
    data, config_dir, expected = straight_run
    output = tmp_path / "killed"
    _run_killed("step", 5, _args(data, config_dir, output, *RESUME_ARGS))
    assert [path.name for path in checkpoint_dirs(output)] == ["step_2", "step_4"]
    _resume_and_compare(output, data, config_dir, expected)


def test_kill_9_during_a_checkpoint_write_never_resumes_from_the_half_written_one(
    tmp_path, straight_run
) -> None:
    data, config_dir, expected = straight_run
    output = tmp_path / "killed"
    _run_killed("checkpoint", 4, _args(data, config_dir, output, *RESUME_ARGS))
    assert (output / "checkpoints" / ".partial-step_4" / "model.safetensors").exists()  # died mid-save
    assert [path.name for path in checkpoint_dirs(output)] == ["step_2"]
    _resume_and_compare(output, data, config_dir, expected)
    assert not list((output / "checkpoints").glob(".partial-*"))


def test_a_full_disk_while_saving_fails_cleanly_and_keeps_the_previous_checkpoint(
    tmp_path, straight_run, monkeypatch
) -> None:
    data, config_dir, expected = straight_run
    output = tmp_path / "full"
    save = accelerate.checkpointing.save

    def save_or_fill_the_disk(obj, path, *args, **kwargs):
        if "step_4" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save_or_fill_the_disk)
    with pytest.raises(RuntimeError, match=r"checkpoint at step 4.*No space left.*step_2 is kept"):
        main(_args(data, config_dir, output, *RESUME_ARGS))
    monkeypatch.undo()
    assert [path.name for path in checkpoint_dirs(output)] == ["step_2"]
    assert not list((output / "checkpoints").glob(".partial-*"))
    _resume_and_compare(output, data, config_dir, expected)


# Under `accelerate launch`, the child that the terminal's Ctrl-C reaches (with its launcher: one process group).
CTRL_C_CHILD = """
import os, signal, sys
from ace_hf import AceForPreTraining
from ace_hf.pretraining.cli import main

update, calls = AceForPreTraining.update_teacher, [0]
def update_then_ctrl_c(self, momentum):
    calls[0] += 1
    if calls[0] == 3:  # in optimizer step 3
        os.killpg(os.getpgid(0), signal.SIGINT)
    return update(self, momentum)
AceForPreTraining.update_teacher = update_then_ctrl_c
main(sys.argv[1:])
"""


def test_ctrl_c_under_accelerate_launch_stops_at_the_step_it_names(tmp_path, straight_run) -> None:
    """The launcher passes the Ctrl-C on (SIGTERM) and kills its child 5 s later: the run still stops after the
    step it named, with its checkpoint, and neither process prints a traceback."""
    data, config_dir, _ = straight_run
    output = tmp_path / "stopped"
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_CHILD)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--mixed_precision",
        "no", str(script), *_args(data, config_dir, output, *RESUME_ARGS, "--logging_steps", "10"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launched = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, start_new_session=True, timeout=300
    )
    assert launched.returncode == 128 + signal.SIGINT, launched.stderr[-4000:]
    assert "Traceback" not in launched.stderr, launched.stderr[-4000:]
    assert "Stop requested: stopping after step 3 with a checkpoint" in launched.stderr
    assert [path.name for path in checkpoint_dirs(output)] == ["step_2", "step_3"], launched.stderr[-3000:]
