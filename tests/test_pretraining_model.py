"""AceForPreTraining: heads, teacher, losses wired together, EMA update, export."""

from __future__ import annotations

import pytest
import torch

from ace_hf import AceForPreTraining, AceModel, sample_view_origins
from tests.conftest import tiny_swin_config, tiny_vit_config


def _batch(config, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    side = config.image_size
    return {
        "pixel_values_large": torch.randn(batch_size, 3, side, side, generator=generator),
        "pixel_values_small": torch.randn(batch_size, 3, side, side, generator=generator),
        "view_origins": sample_view_origins(batch_size, config.grid_size, config.view_tokens, 0.5, generator),
    }


def _teacher_equals_student(model: AceForPreTraining) -> bool:
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    return all(torch.equal(student[key], teacher[key]) for key in student)


@pytest.mark.parametrize("make_config", [tiny_vit_config, tiny_swin_config])
def test_forward_returns_finite_loss_and_components(make_config) -> None:
    config = make_config()
    model = AceForPreTraining(config).train()
    output = model(**_batch(config))
    for name in ("loss", "global_loss", "local_loss", "decomposition_loss", "composition_loss"):
        value = getattr(output, name)
        assert value.ndim == 0 and torch.isfinite(value), name
    expected = config.global_loss_weight * output.global_loss + config.local_loss_weight * output.local_loss
    torch.testing.assert_close(output.loss.detach(), expected)
    torch.testing.assert_close(output.local_loss, (output.decomposition_loss + output.composition_loss) / 2)


def test_teacher_starts_equal_to_student_and_has_no_gradients() -> None:
    model = AceForPreTraining(tiny_vit_config())
    assert _teacher_equals_student(model)
    assert not any(param.requires_grad for param in model.teacher.parameters())
    assert all(param.requires_grad for param in model.student.parameters())


def test_gradients_reach_only_the_student() -> None:
    config = tiny_vit_config()
    model = AceForPreTraining(config).train()
    model(**_batch(config)).loss.backward()
    assert all(param.grad is None for param in model.teacher.parameters())
    trainable = [model.student, model.upsampler, model.downsampler]
    for module in trainable:
        grads = [param.grad for param in module.parameters()]
        assert all(grad is not None for grad in grads), type(module).__name__
        assert any(grad.abs().sum() > 0 for grad in grads)


def test_update_teacher_is_an_exponential_moving_average() -> None:
    model = AceForPreTraining(tiny_vit_config())
    with torch.no_grad():
        for param in model.student.parameters():
            param.add_(1.0)
    before = {name: param.clone() for name, param in model.teacher.named_parameters()}
    student = dict(model.student.named_parameters())
    model.update_teacher(0.9)
    for name, param in model.teacher.named_parameters():
        torch.testing.assert_close(param, 0.9 * before[name] + 0.1 * student[name])
    model.update_teacher(1.0)  # momentum 1 freezes the teacher
    model.update_teacher(0.0)  # momentum 0 copies the student
    assert _teacher_equals_student(model)


def test_dino_center_moves_only_in_training() -> None:
    config = tiny_vit_config()
    model = AceForPreTraining(config)
    batch = _batch(config)
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert torch.count_nonzero(model.dino_loss.center) == 0
    model.train()
    with torch.no_grad():
        model(**batch)
    assert torch.count_nonzero(model.dino_loss.center) > 0


def test_a_few_steps_on_a_fixed_batch_lower_the_loss() -> None:
    config = tiny_vit_config()
    model = AceForPreTraining(config).train()
    batch = _batch(config, batch_size=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(15):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_teacher(0.99)
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9, losses


def test_export_teacher_is_a_standalone_encoder(tmp_path) -> None:
    config = tiny_vit_config()
    model = AceForPreTraining(config)
    with torch.no_grad():
        for param in model.teacher.parameters():
            param.mul_(0.5)
    encoder = model.export_teacher().eval()
    assert isinstance(encoder, AceModel)
    teacher_state = model.teacher.ace.state_dict()
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key
    encoder.save_pretrained(tmp_path)
    reloaded = AceModel.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(reloaded[key], value) for key, value in teacher_state.items())


def test_from_encoder_starts_student_and_teacher_from_the_encoder() -> None:
    encoder = AceModel(tiny_vit_config())
    model = AceForPreTraining.from_encoder(encoder)
    for key, value in encoder.state_dict().items():
        assert torch.equal(model.student.ace.state_dict()[key], value)
    assert _teacher_equals_student(model)


def test_full_checkpoint_round_trip_keeps_the_teacher(tmp_path) -> None:
    config = tiny_vit_config()
    model = AceForPreTraining(config)
    with torch.no_grad():
        for param in model.teacher.parameters():
            param.mul_(0.5)
        model.dino_loss.center.fill_(0.25)
    model.save_pretrained(tmp_path)
    loaded = AceForPreTraining.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_wrong_view_shapes_raise() -> None:
    config = tiny_vit_config()
    model = AceForPreTraining(config)
    batch = _batch(config)
    batch["pixel_values_small"] = batch["pixel_values_small"][:, :, :16]
    with pytest.raises(ValueError, match="pixel_values_small"):
        model(**batch)
