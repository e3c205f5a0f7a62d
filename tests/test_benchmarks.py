"""The pretraining benchmark runs end to end and reports every section (its numbers are not checked here)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from ace_hf import AceConfig, AceForPreTraining
from ace_hf.optimization import WEIGHT_DECAY_FLAG, make_optimizer
from ace_hf.presets_ace import ACE_PRESETS
from ace_hf.pretraining.recipe import PretrainingRecipe
from benchmarks import bench_pretraining
from tests.conftest import TINY_HEADS, tiny_swin_config

# The conftest tiny ViT as overrides of the ace-vit-tiny preset: the whole benchmark in seconds on 2 cores.
TINY_OVERRIDES = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "view_tokens": 4,
    "grid_size": 10,
    **TINY_HEADS,
}
SECTIONS = ("parameters", "step", "flops", "correspondence", "memory", "views", "inference")
# Device memory is CUDA-only: on CPU it is None ("n/a" in the table), not a guess. No timm problem: None.
MAY_BE_NONE = {
    "memory.static_gib",
    "memory.step_peak_gib",
    "memory.checkpointing_step_peak_gib",
    "inference.timm_problem",
}
WITHOUT_TIMM = {"inference.timm_s", "inference.ace_over_timm"}


pytestmark = pytest.mark.usefixtures("one_thread")


def numbers(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of nested dicts that is a number or None, with its dotted path."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{path}.{key}" if path else key)
    elif tree is None or (isinstance(tree, int | float) and not isinstance(tree, bool)):
        yield path, tree


def test_quick_cpu_run_writes_every_section(tmp_path, capsys) -> None:
    json_path, md_path = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["--quick", "--device", "cpu", "--presets", "ace-vit-tiny"]
    argv += ["--output_json", str(json_path), "--output_md", str(md_path)]
    returned = bench_pretraining.main(argv, config_overrides=TINY_OVERRIDES)

    results = json.loads(json_path.read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["machine"]["device"] == "cpu" and results["machine"]["torch"]
    assert results["matmul_peak"]["flops_per_s"] > 0
    preset = results["presets"]["ace-vit-tiny"]
    assert "errors" not in preset
    for section in SECTIONS:
        assert preset[section], f"missing section {section}"
    may_be_none = MAY_BE_NONE | (WITHOUT_TIMM if results["machine"]["timm"] is None else set())
    for path, value in numbers(preset):
        if value is None and path in may_be_none:
            continue
        assert value is not None and value > 0, f"{path} = {value}"
    assert preset["memory"]["step_peak_gib"] is None  # CPU: not measured, not invented
    assert preset["config"]["image_size"] == 32  # the overrides reached the model

    report = md_path.read_text()
    assert report.startswith("# Pretraining benchmark")
    assert "python -m benchmarks.bench_pretraining --quick --device cpu" in report
    assert "| full / ideal |" in report and "n/a" in report
    assert report in capsys.readouterr().out


def quick_cpu_settings() -> bench_pretraining.Settings:
    return bench_pretraining.resolve_settings(bench_pretraining.parse_args(["--quick", "--device", "cpu"]))


@pytest.mark.parametrize("preset", sorted(ACE_PRESETS))
def test_the_timed_step_is_past_every_warm_up_and_the_freeze(preset: str) -> None:
    config = AceConfig.from_preset(preset)
    at = bench_pretraining.steady_state(preset, config, global_batch=16)

    schedules = at.schedules
    assert not schedules.last_layer_frozen(at.step)
    assert at.step >= schedules.warmup_epochs * schedules.steps_per_epoch
    assert schedules.teacher_temperature_at(at.step) == config.teacher_temperature
    assert at.max_grad_norm == PretrainingRecipe.resolve(preset, config).optimization.max_grad_norm


def test_full_step_is_the_loops_step_with_the_scheduled_teacher_update() -> None:
    config = AceConfig.from_preset("ace-vit-tiny", **TINY_OVERRIDES)
    model = AceForPreTraining(config).train()
    settings = quick_cpu_settings()
    at = bench_pretraining.steady_state("ace-vit-tiny", config, global_batch=2)
    optimizer = make_optimizer(model, 1.0, settings.device)  # the schedules set the real rate
    batch = bench_pretraining.synthetic_batch(config, 2, settings.device)
    _, full_step = bench_pretraining.pretraining_step(model, model, optimizer, batch, settings, at)
    last_layer = [param.detach().clone() for param in model.student.global_head.last_layer.parameters()]
    teacher = [param.detach().clone() for param in model.teacher.parameters()]

    full_step()

    for group in optimizer.param_groups:
        assert group["lr"] == at.schedules.learning_rate_at(at.step)
        if group[WEIGHT_DECAY_FLAG]:
            assert group["weight_decay"] == at.schedules.weight_decay_at(at.step)
    moved = model.student.global_head.last_layer.parameters()
    assert any(not torch.equal(new, old) for new, old in zip(moved, last_layer, strict=True))
    momentum = at.schedules.teacher_momentum_at(at.step)
    for new, old, student in zip(
        model.teacher.parameters(), teacher, model.student.parameters(), strict=True
    ):
        torch.testing.assert_close(new, momentum * old + (1 - momentum) * student.detach())
    assert all(param.grad is None for param in model.parameters())


def test_swin_inference_reference_is_transformers_swin_of_the_same_shape() -> None:
    results = bench_pretraining.benchmark_inference(tiny_swin_config(), 2, quick_cpu_settings())

    assert results["reference_model"] == "SwinModel"
    assert results["ace_s"] > 0 and results["reference_s"] > 0
    assert results["attention"]["ace_eager"] == "eager"


def test_a_part_out_of_memory_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch) -> None:
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(bench_pretraining, "benchmark_training", out_of_memory)
    md_path = tmp_path / "bench.md"
    argv = ["--quick", "--device", "cpu", "--presets", "ace-vit-tiny", "--output_md", str(md_path)]
    results = bench_pretraining.main(argv, config_overrides=TINY_OVERRIDES)

    preset = results["presets"]["ace-vit-tiny"]
    assert preset["errors"] == {"training": "out of memory: CUDA out of memory. Tried to allocate 9.00 GiB"}
    assert preset["inference"]["ace_s"] > 0 and preset["views"]["workers_needed_cpu_path"] is None
    assert "| full pretraining step (ms) | out of memory |" in md_path.read_text()
    assert not bench_pretraining.failed_unexpectedly(results)


@pytest.mark.slow  # inductor compiles the pretraining model: about a minute on 2 cores
def test_compile_part_times_the_compiled_step_against_eager(tmp_path) -> None:
    argv = ["--quick", "--device", "cpu", "--presets", "ace-vit-tiny", "--compile"]
    argv += ["--output_md", str(tmp_path / "bench.md")]
    results = bench_pretraining.main(argv, config_overrides=TINY_OVERRIDES)
    compiled = results["presets"]["ace-vit-tiny"]["compile"]
    assert compiled["compile_s"] > 0 and compiled["eager_step_s"] > 0 and compiled["compiled_step_s"] > 0
    assert "| step under torch.compile" in (tmp_path / "bench.md").read_text()
