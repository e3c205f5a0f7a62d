"""Schedules, parameter groups and the last-layer freeze of ACE's optimization recipe."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from ace_hf import AceConfig
from ace_hf.optimization import (
    WEIGHT_DECAY_FLAG,
    AceSchedules,
    cancel_last_layer_gradients,
    cosine_schedule,
    initialize_optimizer_state,
    make_optimizer,
    parameter_groups,
    scaled_learning_rate,
)
from ace_hf.pretraining.recipe import PretrainingRecipe


def test_cosine_schedule_without_warmup():
    assert cosine_schedule(0, 100, start=1.0, end=0.0) == pytest.approx(1.0)
    assert cosine_schedule(50, 100, start=1.0, end=0.0) == pytest.approx(0.5)
    assert cosine_schedule(25, 100, start=1.0, end=0.0) == pytest.approx(0.5 + 0.5 * 2**-0.5)
    assert cosine_schedule(100, 100, start=1.0, end=0.0) == 0.0
    assert cosine_schedule(150, 100, start=1.0, end=0.0) == 0.0  # clamped past the end
    assert cosine_schedule(50, 100, start=0.04, end=0.4) == pytest.approx(0.22)  # increasing works too


def test_cosine_schedule_with_warmup():
    kwargs = {"total_steps": 120, "start": 1.0, "end": 0.2, "warmup_steps": 20, "warmup_start": 0.1}
    assert cosine_schedule(0, **kwargs) == pytest.approx(0.1)
    assert cosine_schedule(10, **kwargs) == pytest.approx(0.55)
    assert cosine_schedule(20, **kwargs) == pytest.approx(1.0)
    assert cosine_schedule(70, **kwargs) == pytest.approx(0.6)  # halfway through the cosine part
    assert cosine_schedule(120, **kwargs) == pytest.approx(0.2)


def test_cosine_schedule_rejects_warmup_longer_than_the_run():
    with pytest.raises(ValueError):
        cosine_schedule(0, 10, start=1.0, end=0.0, warmup_steps=11)


def test_scaled_learning_rate():
    assert scaled_learning_rate(5e-4, 256) == pytest.approx(5e-4)
    assert scaled_learning_rate(5e-4, 32) == pytest.approx(6.25e-5)


def schedules(**overrides) -> AceSchedules:
    """The published recipe (ACE's config) for 100 steps of 10 an epoch: peak rate 1e-3, 2 warm-up epochs."""
    recipe = PretrainingRecipe.resolve("ace-vit-b", AceConfig(), {"learning_rate": 1e-3, "warmup_epochs": 2})
    built = recipe.schedules(total_steps=100, steps_per_epoch=10, global_batch=256)
    return dataclasses.replace(built, **overrides)


def test_ace_schedules_published_defaults():
    s = schedules()
    assert s.learning_rate_at(0) == 0.0
    assert s.learning_rate_at(10) == pytest.approx(5e-4)
    assert s.learning_rate_at(20) == pytest.approx(1e-3)  # end of warm-up (2 epochs)
    assert s.learning_rate_at(60) == pytest.approx((1e-3 + 1e-6) / 2)
    assert s.learning_rate_at(100) == pytest.approx(1e-6)
    assert (s.weight_decay_at(0), s.weight_decay_at(50), s.weight_decay_at(100)) == pytest.approx(
        (0.04, 0.22, 0.4)
    )
    assert (s.teacher_momentum_at(0), s.teacher_momentum_at(100)) == pytest.approx((0.996, 1.0))
    assert s.teacher_temperature_at(0) == s.teacher_temperature_at(100) == pytest.approx(0.04)
    assert s.last_layer_frozen(9) and not s.last_layer_frozen(10)  # the first epoch only


def test_ace_schedules_teacher_temperature_warmup():
    s = schedules(
        warmup_teacher_temperature=0.02, teacher_temperature=0.04, warmup_teacher_temperature_epochs=3
    )
    assert s.teacher_temperature_at(0) == pytest.approx(0.02)
    assert s.teacher_temperature_at(15) == pytest.approx(0.03)
    assert s.teacher_temperature_at(30) == pytest.approx(0.04)
    assert s.teacher_temperature_at(99) == pytest.approx(0.04)


def test_ace_schedules_is_frozen_and_validated():
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedules().learning_rate = 1.0
    with pytest.raises(ValueError):
        schedules(warmup_epochs=11)


class TinyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.scale = nn.Parameter(torch.ones(4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.last_layer = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.norm(self.linear(x + self.cls_token[0]) * self.scale))


def ids(parameters: list[torch.Tensor]) -> set[int]:
    return {id(parameter) for parameter in parameters}


def test_parameter_groups_split_decay_and_no_decay():
    model = TinyModel()
    decay, no_decay = parameter_groups(model)
    assert decay[WEIGHT_DECAY_FLAG] and not no_decay[WEIGHT_DECAY_FLAG] and no_decay["weight_decay"] == 0.0
    assert ids(decay["params"]) == ids([model.cls_token, model.linear.weight, model.last_layer.weight])
    assert ids(no_decay["params"]) == ids(
        [model.linear.bias, model.norm.weight, model.norm.bias, model.scale]
    )


def test_parameter_groups_drop_empty_groups():
    groups = parameter_groups(nn.LayerNorm(4))
    assert len(groups) == 1 and not groups[0][WEIGHT_DECAY_FLAG]


def test_apply_to_optimizer_sets_lr_everywhere_and_weight_decay_where_flagged():
    optimizer = torch.optim.AdamW(parameter_groups(TinyModel()))
    schedules().apply_to_optimizer(optimizer, step=50)
    decay, no_decay = optimizer.param_groups
    expected_lr = schedules().learning_rate_at(50)
    assert decay["lr"] == no_decay["lr"] == pytest.approx(expected_lr)
    assert decay["weight_decay"] == pytest.approx(0.22)
    assert no_decay["weight_decay"] == 0.0


def test_cancel_last_layer_gradients_keeps_the_layer_unchanged():
    model = TinyModel()
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=0.1, weight_decay=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(torch.randn(8, 4)).square().sum().backward()
    cancel_last_layer_gradients(model.last_layer.parameters())
    assert model.last_layer.weight.grad is None
    optimizer.step()
    for name, parameter in model.named_parameters():
        unchanged = torch.equal(parameter, before[name])
        assert unchanged == (name.startswith(("last_layer.", "frozen."))), name


def test_make_optimizer_is_fused_adamw_over_the_parameter_groups() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = make_optimizer(model, 1e-3, torch.device("cpu"))
    assert optimizer.defaults["fused"] is True and optimizer.defaults["lr"] == 1e-3
    assert [len(group["params"]) for group in optimizer.param_groups] == [
        1,
        3,
    ]  # decayed weight; biases, norm


@pytest.mark.parametrize("fused", [True, False])
def test_initialized_optimizer_state_changes_no_update(fused: bool) -> None:
    """State created up front (what a sharded checkpoint needs) gives the same steps as AdamW's lazy state,
    through a last-layer freeze: if torch changes how AdamW starts its state, this fails."""
    torch.manual_seed(0)
    models = [TinyModel(), TinyModel()]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [
        torch.optim.AdamW(parameter_groups(m), lr=0.05, weight_decay=0.1, fused=fused) for m in models
    ]
    initialize_optimizer_state(optimizers[1])
    trained = [p for p in models[1].parameters() if p.requires_grad]
    assert all(len(optimizers[1].state[p]) == 3 for p in trained)
    inputs = torch.randn(5, 8, 4)
    for step, batch in enumerate(inputs):
        for model, optimizer in zip(models, optimizers, strict=True):
            model(batch).square().sum().backward()
            if step < 2:
                cancel_last_layer_gradients(model.last_layer.parameters())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, lazy), early in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.equal(lazy, early), name
    lazy_state, early_state = (optimizer.state_dict()["state"] for optimizer in optimizers)
    for index, state in lazy_state.items():
        for key, value in state.items():
            assert (
                value.dtype == early_state[index][key].dtype
                and value.device == early_state[index][key].device
            )
            assert torch.equal(value, early_state[index][key]), (index, key)
