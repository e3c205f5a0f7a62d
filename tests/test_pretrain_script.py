"""ace_hf.pretraining (and examples/pretrain.py) end to end on tiny models: export, resume equality, bad files, NaN guard, 2 processes."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import PartialState
from PIL import Image
from safetensors.torch import load_file

from ace_hf import AceForPreTraining, AceImageProcessor
from ace_hf import arguments as shared_arguments
from ace_hf.arguments import parse_arguments
from ace_hf.hub import PRETRAINING_HEADS_NAME
from ace_hf.pretraining import PretrainingArguments
from ace_hf.pretraining.cli import main
from ace_hf.pretraining.guard import RELAYED_SIGNAL_S, StepGuard, graceful_stop
from ace_hf.pretraining.loop import build_config, build_model
from ace_hf.pretraining.overrides import parse_overrides
from ace_hf.runs import checkpoint_dirs, read_run_record
from tests.conftest import tiny_vit_config
from tests.test_hub import FakeHfApi

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "pretrain.py"
FSDP_SHIM = str(ROOT / "tests" / "fsdp_on_cpu.py")  # runs SCRIPT under Accelerate's FSDP on CPU processes


@pytest.fixture
def tiny_config_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "config"
    tiny_vit_config().save_pretrained(folder)
    return folder


def _write_images(folder: Path, count: int, bad: int = 0, seed: int = 0) -> Path:
    """Small grayscale PNGs (8- and 16-bit) with structure, plus `bad` corrupt files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:48, 0:48]
    for index in range(count):
        blob = np.exp(-((rows - rng.uniform(10, 38)) ** 2 + (cols - rng.uniform(10, 38)) ** 2) / 80.0)
        image = blob + 0.2 * rng.random((48, 48))
        if index % 2:
            Image.fromarray((image / image.max() * 4095).astype(np.uint16)).save(
                folder / f"img{index:03d}.png"
            )
        else:
            Image.fromarray((image / image.max() * 255).astype(np.uint8)).save(folder / f"img{index:03d}.png")
    for index in range(bad):
        (folder / f"broken{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    return folder


def _args(data_dir: Path, config_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--train_dir", str(data_dir),
        "--config_name", str(config_dir),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2",
        "--warmup_epochs", "0",
        "--logging_steps", "1",
        *extra,
    ]  # fmt: skip


def test_run_exports_a_loadable_encoder_with_card_and_summary(tmp_path, tiny_config_dir) -> None:
    data = _write_images(tmp_path / "data", 8)
    output = tmp_path / "out"
    summary = main(_args(data, tiny_config_dir, output, "--num_train_epochs", "2"))
    assert summary["steps"] == 4 and summary["skipped_images"] == 0
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "modeling_ace.py",
    ):
        assert (output / name).exists(), name
    written = json.loads((output / "training_summary.json").read_text())
    assert written["steps"] == 4 and written["torch_version"] == torch.__version__
    # The whole recipe: the arguments given (lr, warm-up), the preset's optimization, the config's method.
    recipe = written["recipe"]
    assert recipe["learning_rate"] == 1e-2 and recipe["warmup_epochs"] == 0 and recipe["max_grad_norm"] == 0.8
    assert recipe["global_loss_weight"] == tiny_vit_config().global_loss_weight
    card = (output / "README.md").read_text()
    assert "image-feature-extraction" in card and "library_name: transformers" in card
    assert "learning_rate 0.01, min_learning_rate 1e-06" in card and "global_loss_weight 0.1" in card
    # The exported weights are the teacher's, taken from the last checkpoint.
    checkpoint = output / "checkpoints" / "step_4"
    assert checkpoint.is_dir()
    exported = load_file(output / "model.safetensors")
    model = AceForPreTraining(tiny_vit_config())
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    for key, value in model.teacher.ace.state_dict().items():
        assert torch.equal(exported[key], value), key


def test_config_overrides_reach_the_model_and_matching_accuracies_are_logged(
    tmp_path, tiny_config_dir
) -> None:
    """--config_overrides sets config fields (here the global-only ablation); the local branch's matching
    accuracies are averaged like the losses and land in the summary."""
    data = _write_images(tmp_path / "data", 8)
    output = tmp_path / "out"
    summary = main(
        _args(data, tiny_config_dir, output, "--max_steps", "2", "--config_overrides", "local_loss_weight=0")
    )
    assert json.loads((output / "config.json").read_text())["local_loss_weight"] == 0
    for name in ("final_decomposition_accuracy", "final_composition_accuracy"):
        assert 0.0 <= summary[name] <= 1.0, name
    with pytest.raises(SystemExit) as refused:
        main(_args(data, tiny_config_dir, tmp_path / "other", "--config_overrides", "bogus=1"))
    assert refused.value.code == 2 and not (tmp_path / "other").exists()


def test_augmentation_overrides_reach_the_exported_processor(tmp_path, tiny_config_dir) -> None:
    """--augmentation_overrides (the official code's weaker photometric augmentation) are used and exported;
    a misspelt field or a malformed value is refused before training."""
    assert parse_overrides("brightness=0.2,sharpness=1.2:1.5") == {
        "brightness": 0.2,
        "sharpness": (1.2, 1.5),
    }
    for bad, message in (("brightnes=0.2", "no field.*brightnes"), ("blur_sigma=a:b", "blur_sigma=a:b")):
        with pytest.raises(ValueError, match=message):
            parse_overrides(bad)
    data = _write_images(tmp_path / "data", 8)
    output = tmp_path / "out"
    main(
        _args(data, tiny_config_dir, output, "--max_steps", "1", "--augmentation_overrides", "brightness=0.2")
    )
    assert AceImageProcessor.from_pretrained(output).brightness == 0.2


RESUME_ARGS = ("--num_train_epochs", "2", "--checkpointing_steps", "2", "--checkpoints_total_limit", "5")


@pytest.fixture
def resume_setup(tmp_path, tiny_config_dir):
    """12 images, batch 4: 3 steps an epoch, 6 in all; the weights of an uninterrupted run at step 6."""
    data = _write_images(tmp_path / "data", 12)
    straight = tmp_path / "straight"
    main(_args(data, tiny_config_dir, straight, *RESUME_ARGS))
    return data, tiny_config_dir, load_file(straight / "checkpoints" / "step_6" / "model.safetensors")


def _interrupt_at_update(monkeypatch, call: int, action) -> None:
    """Run `action` when the teacher is updated for the `call`-th time (inside optimizer step `call`)."""
    original_update = AceForPreTraining.update_teacher
    calls = {"n": 0}

    def update(self, momentum):
        calls["n"] += 1
        if calls["n"] == call:
            action()
        return original_update(self, momentum)

    monkeypatch.setattr(AceForPreTraining, "update_teacher", update)


def _assert_same_weights(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    resumed = load_file(folder / "checkpoints" / "step_6" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_ends_with_the_same_weights(
    tmp_path, resume_setup, monkeypatch
) -> None:
    data, config_dir, expected = resume_setup
    output = tmp_path / "stopped"
    _interrupt_at_update(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGINT))
    summary = main(_args(data, config_dir, output, *RESUME_ARGS))
    monkeypatch.undo()
    assert summary["interrupted"] and summary["steps"] == 5
    assert [p.name for p in checkpoint_dirs(output)] == ["step_2", "step_4", "step_5"]
    assert not (output / "model.safetensors").exists(), "an interrupted run must not export"

    summary = main(_args(data, config_dir, output, *RESUME_ARGS, "--resume_from_checkpoint", "latest"))
    assert summary["steps"] == 6 and not summary["interrupted"]
    _assert_same_weights(output, expected)


def test_crashed_run_resumes_from_the_last_checkpoint_with_the_same_weights(
    tmp_path, resume_setup, monkeypatch
) -> None:
    data, config_dir, expected = resume_setup
    output = tmp_path / "crashed"

    def crash() -> None:
        raise RuntimeError("simulated crash")

    _interrupt_at_update(monkeypatch, 5, crash)  # after the checkpoint at step 4, in the middle of epoch 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_args(data, config_dir, output, *RESUME_ARGS))
    monkeypatch.undo()
    assert [p.name for p in checkpoint_dirs(output)] == ["step_2", "step_4"]

    main(_args(data, config_dir, output, *RESUME_ARGS, "--resume_from_checkpoint", "latest"))
    _assert_same_weights(output, expected)


def test_views_on_device_train_and_resume_bit_identically(tmp_path, resume_setup, monkeypatch) -> None:
    """--views_on_device on the CPU: the workers only decode and draw, the loop cuts the views. Same seeds, same
    views: interrupted at step 5 and resumed, the run ends with the weights of the uninterrupted run that cut its
    views in the data pipeline."""
    data, config_dir, expected = resume_setup
    output = tmp_path / "on_device"
    _interrupt_at_update(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGINT))
    summary = main(_args(data, config_dir, output, *RESUME_ARGS, "--views_on_device"))
    monkeypatch.undo()
    assert summary["interrupted"] and summary["steps"] == 5
    resume = ("--views_on_device", "--resume_from_checkpoint", "latest")
    assert main(_args(data, config_dir, output, *RESUME_ARGS, *resume))["steps"] == 6
    _assert_same_weights(output, expected)


def test_checkpoints_are_pruned_to_the_limit(tmp_path, tiny_config_dir) -> None:
    data = _write_images(tmp_path / "data", 8)
    output = tmp_path / "out"
    extra = ("--max_steps", "5", "--checkpointing_steps", "1", "--export_with_checkpoints")
    main(_args(data, tiny_config_dir, output, *extra))
    assert [p.name for p in checkpoint_dirs(output)] == ["step_4", "step_5"]
    assert not list((output / "checkpoints").glob(".partial-*"))
    assert (output / "checkpoints" / "step_4" / "encoder" / "model.safetensors").exists()


def test_bf16_autocast_run_exports_float32_weights(tmp_path, tiny_config_dir, monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    data = _write_images(tmp_path / "data", 8)
    summary = main(_args(data, tiny_config_dir, tmp_path / "out", "--max_steps", "2"))
    assert np.isfinite(summary["final_loss"])
    assert all(
        value.dtype == torch.float32 for value in load_file(tmp_path / "out" / "model.safetensors").values()
    )


def test_bad_files_are_skipped_counted_and_named(tmp_path, tiny_config_dir, caplog) -> None:
    data = _write_images(tmp_path / "data", 6, bad=2)
    summary = main(_args(data, tiny_config_dir, tmp_path / "out", "--num_train_epochs", "1"))
    assert summary["steps"] == 2
    assert summary["skipped_images"] == 2
    assert "broken0.png" in caplog.text and "broken1.png" in caplog.text


def test_each_bad_file_is_counted_once_however_often_it_is_read(tmp_path, tiny_config_dir, caplog) -> None:
    """5 good and 3 bad files, batch 4: every file is read in each of 2 epochs (and a filler stands in for each
    bad one); the run counts 3 files, names each once, and its checkpoints remember them."""
    data = _write_images(tmp_path / "data", 5, bad=3)
    extra = ("--num_train_epochs", "2", "--checkpointing_steps", "2")
    summary = main(_args(data, tiny_config_dir, tmp_path / "out", *extra))
    assert summary["steps"] == 4 and summary["skipped_images"] == 3
    assert "3 unreadable file(s) skipped" in caplog.text
    named = [re.search(r"Skipped unreadable file (\S+) \(", r.getMessage()) for r in caplog.records]
    assert sorted(Path(match[1]).name for match in named if match) == [f"broken{i}.png" for i in range(3)]
    record = read_run_record(tmp_path / "out" / "checkpoints" / "step_2")
    assert record["state"]["skipped_files"] == [str(data / f"broken{index}.png") for index in range(3)]


def test_ctrl_c_stops_after_the_step_it_names_even_between_host_syncs(
    tmp_path, tiny_config_dir, monkeypatch, caplog
) -> None:
    """One process acts on a stop request at the next step, not at the next sync (every 10 steps here); the
    launcher passing the same Ctrl-C on as a second signal (accelerate launch, torchrun) does not abort it."""
    data = _write_images(tmp_path / "data", 12)
    output = tmp_path / "out"

    def ctrl_c_under_a_launcher() -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)

    _interrupt_at_update(monkeypatch, 3, ctrl_c_under_a_launcher)  # in step 3
    summary = main(_args(data, tiny_config_dir, output, *RESUME_ARGS, "--logging_steps", "10"))
    monkeypatch.undo()
    assert "Stop requested: stopping after step 3 with a checkpoint" in caplog.text
    assert summary["interrupted"] and summary["steps"] == 3
    assert [p.name for p in checkpoint_dirs(output)] == ["step_2", "step_3"]


def test_a_second_signal_aborts_unless_it_is_the_first_one_relayed() -> None:
    PartialState()  # the loop's Accelerator: its logger says where the run will stop
    with graceful_stop(lambda: 7) as request:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher passing the Ctrl-C on: the same request
        assert request.step == 7 and not request.due(6) and request.due(7)
        request.asked_at -= RELAYED_SIGNAL_S  # later, the user insists
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def _diverge_at_forward(monkeypatch, call: int) -> None:
    """Make the loss of the `call`-th pretraining forward pass NaN."""
    original_forward = AceForPreTraining.forward
    calls = {"n": 0}

    def forward_that_diverges(self, *args, **kwargs):
        result = original_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(AceForPreTraining, "forward", forward_that_diverges)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, tiny_config_dir, monkeypatch) -> None:
    data = _write_images(tmp_path / "data", 8)
    output = tmp_path / "out"
    _diverge_at_forward(monkeypatch, 4)
    with pytest.raises(
        FloatingPointError, match=r"non-finite at optimizer step 3.*this process: nan.*step_2"
    ):
        main(_args(data, tiny_config_dir, output, "--max_steps", "6", "--checkpointing_steps", "2"))
    assert [p.name for p in checkpoint_dirs(output)] == ["step_2"]


def test_push_to_hub_uploads_the_export(tmp_path, tiny_config_dir, monkeypatch) -> None:
    api = FakeHfApi()
    monkeypatch.setattr("ace_hf.hub.HfApi", lambda token=None: api)
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # the push is checked before training
    data = _write_images(tmp_path / "data", 8)
    extra = ("--max_steps", "1", "--push_to_hub", "--hub_model_id", "org/ace-test", "--hub_private_repo")
    main(_args(data, tiny_config_dir, tmp_path / "out", *extra))
    assert api.created == [
        {"repo_id": "org/ace-test", "private": True, "exist_ok": True, "repo_type": "model"}
    ]
    files = api.uploads[0]["files"]
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "modeling_ace.py",
        "preprocessor_config.json",
    } <= set(files)
    assert not any(name.startswith("checkpoints/") for name in files)
    assert "org/ace-test" in (tmp_path / "out" / "README.md").read_text()


def test_streaming_with_tensorboard_and_continuing_from_an_encoder(tmp_path, tiny_config_dir, caplog) -> None:
    caplog.set_level(logging.INFO)
    data = _write_images(tmp_path / "data", 8)
    first = tmp_path / "first"
    extra = ("--streaming", "--max_steps", "3", "--report_to", "tensorboard", "--save_sample_ids")
    summary = main(_args(data, tiny_config_dir, first, *extra))
    assert summary["steps"] == 3
    assert list(first.rglob("events.out.tfevents.*")), "tensorboard wrote no event file"
    assert f"Logging to tensorboard in {first / 'ace-pretrain'}" in caplog.text  # the log says where
    seen = json.loads((first / "sample_ids_rank0.json").read_text())
    assert len(seen) == 12 and set(seen) <= set(range(8))

    second = tmp_path / "second"
    main([*_args(data, tiny_config_dir, second, "--max_steps", "1"), "--model_name_or_path", str(first)])
    assert (second / "model.safetensors").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(
    *arguments: str, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Two CPU processes (gloo) under torchrun, the way a multi-GPU job is launched."""
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *arguments,
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


NAN_ON_ONE_RANK = """
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from ace_hf.pretraining.guard import StepGuard

accelerator = Accelerator()
loss = torch.tensor(float("nan") if accelerator.process_index == 0 else 1.0)
guard = StepGuard(accelerator.device)
guard.observe(loss, step=7)
guard.observe(torch.tensor(float("nan")), step=8)  # only the first non-finite step is reported
try:
    guard.check(accelerator, stop_requested=False, last_checkpoint=None)
except FloatingPointError as error:
    Path(sys.argv[1], f"rank{accelerator.process_index}.txt").write_text(str(error))
accelerator.end_training()  # destroy the process group: gloo aborts at exit otherwise
"""


def test_a_nan_on_one_process_stops_every_process(tmp_path) -> None:
    script = tmp_path / "nan_on_one_rank.py"
    script.write_text(NAN_ON_ONE_RANK)
    result = _torchrun(str(script), str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        stopped = tmp_path / f"rank{rank}.txt"
        assert stopped.exists(), f"process {rank} did not stop\n{result.stderr[-4000:]}"
        assert "non-finite at optimizer step 7 on at least one process" in stopped.read_text()
    assert "this process: nan" in (tmp_path / "rank0.txt").read_text()


STOP_ON_ONE_RANK = """
import json
import sys
from pathlib import Path

from accelerate import Accelerator
from ace_hf.pretraining.guard import CheckSchedule, StepGuard, StopRequest
from ace_hf.pretraining.loop import TrainingState, gather_skipped_files

accelerator = Accelerator()
rank = accelerator.process_index
checks = CheckSchedule(sync_steps=4, checkpointing_steps=0, total_steps=20)
request = StopRequest(step=checks.next_check(5) if rank == 1 else None)  # asked in step 6, on process 1 only
guard = StepGuard(accelerator.device)
stopped = next(
    step for step in range(1, 21) if checks.is_check(step) and guard.check(accelerator, request.due(step), None)
)
state = TrainingState(skipped_files=[["a.png", "b.png"], ["c.png", "b.png"]][rank])
gather_skipped_files(state)
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps({"stopped": stopped, "skipped": state.skipped_files}))
accelerator.end_training()
"""


def test_processes_stop_at_the_same_step_and_count_each_bad_file_once(tmp_path) -> None:
    """A stop asked on one process takes effect on all at the next check (step 8); the bad files met by either
    process are counted once."""
    script = tmp_path / "stop_on_one_rank.py"
    script.write_text(STOP_ON_ONE_RANK)
    result = _torchrun(str(script), str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome == {"stopped": 8, "skipped": ["a.png", "b.png", "c.png"]}, rank


def test_two_processes_stay_in_sync_and_split_the_data(tmp_path, tiny_config_dir) -> None:
    data = _write_images(tmp_path / "data", 16)
    output = tmp_path / "out"
    result = _torchrun(
        str(SCRIPT),
        *_args(data, tiny_config_dir, output, "--num_train_epochs", "1", "--save_sample_ids"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        "Every process holds the same student and teacher weights (2 processes)"
        in result.stderr + result.stdout
    )
    ids = [json.loads((output / f"sample_ids_rank{rank}.json").read_text()) for rank in range(2)]
    assert len(ids[0]) == len(ids[1]) == 8  # 2 steps x batch 4 on each process
    assert not set(ids[0]) & set(ids[1]), "the two processes saw the same examples"
    assert sorted(ids[0] + ids[1]) == list(range(16))


def _fsdp_environment() -> dict[str, str]:
    """The environment `accelerate launch --config_file examples/accelerate_configs/fsdp.yaml` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = ROOT / "examples" / "accelerate_configs" / "fsdp.yaml"
    arguments = ["--config_file", str(config), "--num_processes", "2", "--mixed_precision", "no", str(SCRIPT)]
    launch_args, *_ = _validate_launch_command(launch_command_parser().parse_args(arguments))
    return {
        k: v
        for k, v in prepare_multi_gpu_env(launch_args).items()
        if k.startswith(("FSDP_", "ACCELERATE_USE"))
    }


def test_torchrun_on_cpus_without_accelerate_use_cpu_stops_before_writing(tmp_path, tiny_config_dir) -> None:
    """Without ACCELERATE_USE_CPU, Accelerate makes each of torchrun's CPU processes a run of its own; the script
    must refuse (naming the fix) instead of letting two runs write one folder."""
    data = _write_images(tmp_path / "data", 8)
    output = tmp_path / "run"
    result = _torchrun(
        str(SCRIPT),
        *_args(data, tiny_config_dir, output, "--max_steps", "2"),
        env={"ACCELERATE_USE_CPU": "false", "CUDA_VISIBLE_DEVICES": ""},  # CPUs only, even on a GPU machine
    )
    assert result.returncode != 0
    assert "WORLD_SIZE=2" in result.stderr and "ACCELERATE_USE_CPU=true torchrun" in result.stderr
    assert not output.exists() or not any(output.iterdir())


def test_fsdp_trains_like_ddp_and_resumes_exactly(tmp_path, tiny_config_dir) -> None:
    """Sharded student, EMA teacher and optimizer (Accelerate's FSDP2, 2 CPU processes): the export equals the
    replicated (DDP) run's, and resuming from a sharded checkpoint ends where the uninterrupted run does."""
    data = _write_images(tmp_path / "data", 16)
    run = ("--max_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "5")
    replicated = _torchrun(str(SCRIPT), *_args(data, tiny_config_dir, tmp_path / "ddp", *run))
    assert replicated.returncode == 0, replicated.stderr[-4000:]
    fsdp = _fsdp_environment()
    assert fsdp["ACCELERATE_USE_FSDP"] == "true" and fsdp["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "AceLayer"
    sharded = _torchrun(
        FSDP_SHIM, str(SCRIPT), *_args(data, tiny_config_dir, tmp_path / "fsdp", *run), env=fsdp
    )
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    assert "Distributed environment: DistributedType.FSDP" in sharded.stderr
    sharded_checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_2" / "pytorch_model_fsdp_0"
    assert sharded_checkpoint.is_dir(), "the checkpoint was gathered, not written as shards"
    assert "Every process holds the same student and teacher weights (2 processes)" in sharded.stderr

    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "fsdp" / "checkpoints" / "step_2", resumed_dir / "checkpoints" / "step_2")
    resumed = _torchrun(
        FSDP_SHIM, str(SCRIPT), *_args(data, tiny_config_dir, resumed_dir, *run, "--resume_from_checkpoint", "latest"),
        env=fsdp,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed from" in resumed.stderr

    for name in ("model.safetensors", PRETRAINING_HEADS_NAME):
        reference, sharded_run = load_file(tmp_path / "ddp" / name), load_file(tmp_path / "fsdp" / name)
        resumed_run = load_file(resumed_dir / name)
        assert sharded_run.keys() == reference.keys() == resumed_run.keys()
        for key, value in reference.items():
            # Reduce-scatter and all-reduce sum the same two gradients: equal up to float rounding.
            torch.testing.assert_close(sharded_run[key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
            assert torch.equal(resumed_run[key], sharded_run[key]), f"resumed {name} {key}"
    center = load_file(tmp_path / "fsdp" / PRETRAINING_HEADS_NAME)["dino_center"]
    assert center.abs().sum() > 0, "the DINO center never moved"


def test_fsdp_in_bf16_exports_float32_weights_with_each_checkpoint(tmp_path, tiny_config_dir) -> None:
    """Under FSDP's bf16 mixed precision the sharded weights stay float32: the EMA teacher moves (in bf16 its
    small updates would round away), and the export written with a checkpoint is the gathered model."""
    data = _write_images(tmp_path / "data", 16)
    output = tmp_path / "out"
    run = (
        "--max_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "5",
        "--export_with_checkpoints",
    )
    fsdp = {**_fsdp_environment(), "ACCELERATE_MIXED_PRECISION": "bf16"}
    result = _torchrun(FSDP_SHIM, str(SCRIPT), *_args(data, tiny_config_dir, output, *run), env=fsdp)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "mixed precision bf16" in result.stderr
    exported = load_file(output / "model.safetensors")
    step_2, step_4 = (
        load_file(output / "checkpoints" / f"step_{step}" / "encoder" / "model.safetensors")
        for step in (2, 4)
    )
    assert exported.keys() == step_4.keys() == step_2.keys()
    for key, value in exported.items():
        assert value.dtype == torch.float32, key
        assert torch.equal(step_4[key], value), key
    # Two EMA steps at momentum ~0.996 change a weight by ~1e-4 of itself: in bf16 that rounds away.
    moved = [key for key, value in step_4.items() if not torch.equal(value, step_2[key])]
    assert len(moved) > len(step_4) // 2, "the EMA teacher did not move between the checkpoints"


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, tiny_config_dir) -> None:
    """3 batches with accumulation 2: a full window and Accelerate's final partial one, 2 steps an epoch."""
    data = _write_images(tmp_path / "data", 12)
    extra = ("--num_train_epochs", "2", "--gradient_accumulation_steps", "2")
    summary = main(_args(data, tiny_config_dir, tmp_path / "out", *extra))
    assert summary["steps"] == summary["total_steps"] == 4
    assert summary["global_batch_size"] == 8


def test_continuing_from_an_export_loads_its_pretraining_heads(tmp_path, tiny_config_dir, caplog) -> None:
    """The final export ships the pretraining heads; continuing from it loads them (and says so), and from an
    export without them the log says that they start fresh. The card names no local path."""
    data = _write_images(tmp_path / "data", 8)
    first = tmp_path / "first"
    main(_args(data, tiny_config_dir, first, "--max_steps", "2"))
    saved = load_file(first / PRETRAINING_HEADS_NAME)
    card = (first / "README.md").read_text()
    assert str(tmp_path) not in card
    assert "Smoke test" in card and "it ran 2 optimizer steps" in card

    caplog.set_level(logging.INFO)
    args = parse_arguments(
        PretrainingArguments,
        _args(data, tiny_config_dir, tmp_path / "second", "--model_name_or_path", str(first)),
    )
    model = build_model(args, build_config(args))
    assert f"loaded pretraining heads from {first / PRETRAINING_HEADS_NAME}" in caplog.text
    for key, value in model.pretraining_heads_state_dict().items():
        assert torch.equal(value, saved[key]), key

    (first / PRETRAINING_HEADS_NAME).unlink()
    caplog.clear()
    build_model(args, build_config(args))
    assert (
        f"pretraining heads start fresh (no {PRETRAINING_HEADS_NAME} in {first}): "
        "expect the first epochs to re-learn them"
    ) in caplog.text


def test_the_host_syncs_only_at_logging_and_checkpoint_steps(tmp_path, tiny_config_dir, monkeypatch) -> None:
    """Non-finite losses and stop requests are gathered on the device and checked every --logging_steps steps
    and before each checkpoint; a NaN is still reported at the step it happened, before any checkpoint."""
    data = _write_images(tmp_path / "data", 8)
    checked_at: list[int] = []
    check = StepGuard.check
    monkeypatch.setattr(
        StepGuard,
        "check",
        lambda self, *args: checked_at.append(int(self.first_bad_step)) or check(self, *args),
    )
    extra = ("--max_steps", "7", "--logging_steps", "3", "--checkpointing_steps", "5")
    main(_args(data, tiny_config_dir, tmp_path / "out", *extra))
    assert len(checked_at) == 4  # steps 3, 5 (checkpoint), 6, 7 (the end); not 7 syncs

    _diverge_at_forward(monkeypatch, 2)
    with pytest.raises(FloatingPointError, match=r"non-finite at optimizer step 1 .*no checkpoint yet"):
        main(_args(data, tiny_config_dir, tmp_path / "nan", *extra))
    assert checkpoint_dirs(tmp_path / "nan") == []


@pytest.mark.slow  # inductor compiles the pretraining model: about a minute on 2 cores
def test_compiled_run_never_recompiles_and_matches_eager(tmp_path, tiny_config_dir) -> None:
    """`accelerate launch --dynamo_backend inductor`: one compilation for the whole run although the teacher
    temperature changes every step, and the same training as in eager mode up to kernel rounding."""
    data = _write_images(tmp_path / "data", 8)
    run = ("--max_steps", "6", "--warmup_epochs", "1")
    main(_args(data, tiny_config_dir, tmp_path / "eager", *run))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
        "--mixed_precision", "no", "--dynamo_backend", "inductor",
        str(SCRIPT), *_args(data, tiny_config_dir, tmp_path / "compiled", *run),
    ]  # fmt: skip
    env = {**os.environ, "TORCH_LOGS": "recompiles", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Recompiling" not in result.stderr, result.stderr[-4000:]
    eager, compiled = (load_file(tmp_path / name / "model.safetensors") for name in ("eager", "compiled"))
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=1e-3, atol=1e-4, msg=key)


def _refused(argv: list[str], capsys) -> str:
    """The command's one `error:` line (after argparse's usage), with exit code 2 and no traceback."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: ace-hf pretrain")
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--train_dir", "{tmp}/missing", "--train_dir '{tmp}/missing' is not a directory"),
        ("--model_name_or_path", "./no-such-encoder", "--model_name_or_path ./no-such-encoder: no such file"),
        ("--model_name_or_path", "{tmp}/no-such-encoder", "no-such-encoder: no such file or folder"),
        ("--config_name", "no-such-config.json", "--config_name no-such-config.json: no such file or folder"),
        (
            "--resume_from_checkpoint",
            "{tmp}/step_9",
            "--resume_from_checkpoint '{tmp}/step_9' is not a checkpoint",
        ),
        ("--report_to", "mlflow", "--report_to/--report-to: invalid choice: 'mlflow'"),
        ("--model_preset", "ace-vit-huge", "--model_preset/--model-preset: invalid choice: 'ace-vit-huge'"),
        ("--config_name", "", "--config_name is empty"),
        ("--max_steps", "0", "--max_steps must be >= 1"),
        # Overrides are tried on the config the run starts from (here --config_name's), before the model is built.
        ("--config_overrides", "bogus=1", "--config_overrides: AceConfig has no field 'bogus'"),
        ("--config_overrides", "grid_sise=4", "no field 'grid_sise' (did you mean grid_size?)"),
        ("--config_overrides", "grid_size=0.5", "'grid_size=0.5': grid_size takes an integer"),
        ("--config_overrides", "qkv_bias=maybe", "'qkv_bias=maybe': qkv_bias takes true or false"),
        ("--config_overrides", "local_loss_weight=0,", "'' is not name=value"),
        ("--config_overrides", "depths=2", "depths cannot be overridden here"),
        (
            "--config_overrides",
            "hidden_size=31",
            "AceConfig.num_attention_heads=2: must divide hidden_size=31",
        ),
        ("--augmentation_overrides", "brightnes=0.2", "AceImageProcessor has no field(s) brightnes"),
        ("--augmentation_overrides", "blur_sigma=a:b", "'blur_sigma=a:b' is not key=number or key=low:high"),
        ("--augmentation_overrides", "brightness=-1", "AceImageProcessor.brightness=-1.0: must be in [0, 1)"),
    ],
)
def test_mistakes_are_one_error_line_before_anything_loads(
    tmp_path, tiny_config_dir, capsys, option, value, message
) -> None:
    data = _write_images(tmp_path / "data", 2)
    argv = [*_args(data, tiny_config_dir, tmp_path / "out"), option, value.format(tmp=tmp_path)]
    assert message.format(tmp=tmp_path) in _refused(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_a_tracker_that_is_not_installed_is_refused_before_training(
    tmp_path, tiny_config_dir, capsys, monkeypatch
) -> None:
    """Accelerate would warn once and then log nothing for the whole run."""
    monkeypatch.setattr(shared_arguments, "tracker_available", lambda name: name != "wandb")
    data = _write_images(tmp_path / "data", 2)
    argv = [*_args(data, tiny_config_dir, tmp_path / "out"), "--report_to", "wandb"]
    assert "--report_to wandb needs the wandb package: pip install wandb" in _refused(argv, capsys)
    # The same checks hold for the dataclass itself (Python, JSON and YAML arguments skip argparse's choices).
    with pytest.raises(ValueError, match="--model_preset 'ace-vit-huge' is not one of ace-swin-b"):
        PretrainingArguments(model_preset="ace-vit-huge")
    with pytest.raises(ValueError, match="--report_to 'mlflow' is not one of none, all, tensorboard, wandb"):
        PretrainingArguments(report_to="mlflow")


def test_overrides_of_a_hub_encoder_are_checked_by_name_while_parsing() -> None:
    """The Hub's config is not fetched while parsing: names and forms are checked, the combination when it loads."""
    PretrainingArguments(model_name_or_path="org/encoder", config_overrides="hidden_size=31")
    with pytest.raises(ValueError, match="no field 'bogus'"):
        PretrainingArguments(model_name_or_path="org/encoder", config_overrides="bogus=1")
    with pytest.raises(ValueError, match="no field"):
        PretrainingArguments(model_name_or_path="org/encoder", augmentation_overrides="brightnes=0.2")
