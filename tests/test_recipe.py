"""The pretraining recipe: one home for each number, per preset, joined with the config's method settings."""

from __future__ import annotations

import pytest

from ace_hf import AceConfig
from ace_hf.pretraining.recipe import METHOD_FIELDS, OptimizationRecipe, PretrainingRecipe


def test_presets_take_the_published_optimization_unless_they_depart() -> None:
    published = PretrainingRecipe.resolve("ace-vit-b", AceConfig()).optimization
    assert published == OptimizationRecipe()
    assert (published.learning_rate, published.num_train_epochs, published.warmup_epochs) == (5e-4, 300, 10.0)
    assert PretrainingRecipe.resolve("ace-swin-b", AceConfig()).optimization == published
    tiny = PretrainingRecipe.resolve("ace-vit-tiny", AceConfig.from_preset("ace-vit-tiny")).optimization
    assert (tiny.learning_rate, tiny.num_train_epochs, tiny.warmup_epochs) == (2e-3, 54, 5.0)
    assert tiny.max_grad_norm == published.max_grad_norm == 0.8


def test_given_arguments_override_and_none_means_the_presets() -> None:
    recipe = PretrainingRecipe.resolve(
        "ace-vit-tiny", AceConfig(), {"learning_rate": 1e-2, "warmup_epochs": None, "max_grad_norm": 3.0}
    )
    assert recipe.optimization.learning_rate == 1e-2 and recipe.optimization.max_grad_norm == 3.0
    assert recipe.optimization.warmup_epochs == 5.0  # not given: the preset's
    with pytest.raises(TypeError):
        PretrainingRecipe.resolve("ace-vit-b", AceConfig(), {"learning_rat": 1.0})


def test_the_method_half_is_read_from_the_config_and_drives_the_schedules() -> None:
    config = AceConfig(global_loss_weight=0.0, teacher_momentum=0.99, teacher_temperature=0.07)
    recipe = PretrainingRecipe.resolve("ace-vit-b", config)
    assert recipe.method == {name: getattr(config, name) for name in METHOD_FIELDS}
    assert recipe.as_dict()["global_loss_weight"] == 0.0 and recipe.as_dict()["learning_rate"] == 5e-4
    schedules = recipe.schedules(total_steps=100, steps_per_epoch=10, global_batch=32)
    assert schedules.teacher_momentum_at(0) == pytest.approx(0.99)
    assert schedules.teacher_temperature_at(50) == pytest.approx(0.07)
    assert schedules.learning_rate == pytest.approx(5e-4 * 32 / 256)
    assert schedules.warmup_epochs == 10  # a run shorter than the warm-up gets the whole run as warm-up
    assert recipe.schedules(total_steps=50, steps_per_epoch=10, global_batch=32).warmup_epochs == 5
