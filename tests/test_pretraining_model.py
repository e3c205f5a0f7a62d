"""AceForPreTraining: heads, teacher, losses wired together, EMA update, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ace_hf import AceForPreTraining, AceImageProcessor, AceModel, correspondence_targets, sample_view_origins
from ace_hf.modeling_ace import AceDownsampler, AceUpsampler, blank_random_cells
from tests.conftest import tiny_swin_config, tiny_vit_config


def _batch(config, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    side = config.image_size
    return {
        "pixel_values_large": torch.randn(batch_size, 3, side, side, generator=generator),
        "pixel_values_small": torch.randn(batch_size, 3, side, side, generator=generator),
        "view_origins": sample_view_origins(batch_size, config.grid_size, config.view_tokens, 0.5, generator),
    }


def _model_with_distinct_teacher() -> AceForPreTraining:
    """A pretraining model whose teacher differs from its student, so loads and exports can be told apart."""
    model = AceForPreTraining(tiny_vit_config())
    with torch.no_grad():
        for param in model.teacher.parameters():
            param.mul_(0.5)
    return model


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
    model = _model_with_distinct_teacher()
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
    model = _model_with_distinct_teacher()
    with torch.no_grad():
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


def test_teacher_is_deterministic_in_training_mode() -> None:
    """Drop path and dropout belong to the student only: the teacher's outputs are targets."""
    config = tiny_vit_config(drop_path_rate=0.5, hidden_dropout_prob=0.3)
    model = AceForPreTraining(config).train()
    pixels, overlap = torch.randn(4, 3, 32, 32), torch.ones(4, 16, dtype=torch.bool)
    with torch.no_grad():
        first, second = model.teacher(pixels, overlap), model.teacher(pixels, overlap)
        student_first, student_second = model.student(pixels, overlap), model.student(pixels, overlap)
    torch.testing.assert_close(first, second)
    assert not torch.equal(student_first[0], student_second[0])


def test_loading_a_pretraining_checkpoint_as_encoder_gives_the_teacher(tmp_path) -> None:
    model = _model_with_distinct_teacher()
    model.save_pretrained(tmp_path)
    encoder = AceModel.from_pretrained(tmp_path)
    teacher_state = model.teacher.ace.state_dict()
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key


def test_loading_an_encoder_for_pretraining_starts_from_it(tmp_path) -> None:
    encoder = AceModel(tiny_vit_config())
    encoder.save_pretrained(tmp_path)
    model = AceForPreTraining.from_pretrained(tmp_path)
    for key, value in encoder.state_dict().items():
        assert torch.equal(model.student.ace.state_dict()[key], value), key
    assert _teacher_equals_student(model)


def test_mismatched_batch_sizes_raise() -> None:
    config = tiny_vit_config()
    batch = _batch(config)
    batch["view_origins"] = batch["view_origins"][:2]
    with pytest.raises(ValueError, match="same batch size"):
        AceForPreTraining(config)(**batch)


class _Constant(torch.nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return self.value


def test_up_and_down_sampler_layouts_match_the_target_columns() -> None:
    """With the samplers' MLPs replaced by exact pixel descriptors, every target peak must pair the same pixels.

    Decomposition: the up-sampler's sub-token j of the large view (column j of the target) must show the same
    image cell as small-view token i when j is the peak of row i. Composition: the down-sampler's pooled
    position p (column p) must gather the same 2 x 2 cells as large-view token k when p is the peak of row k.
    """
    n, cell, grid, batch_size = 4, 8, 12, 32
    processor = AceImageProcessor(
        size=n * cell,
        grid_size=grid,
        cell_size=cell,
        view_tokens=n,
        min_overlap=0.05,
        image_mean=0.0,
        image_std=1.0,
    )
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(grid * cell, grid * cell, generator=generator) for _ in range(batch_size)]
    views = processor.sample_views(images, do_augment=False, do_jitter=False, generator=generator)
    origins = views["view_origins"]
    assert ((origins[:, 2] - origins[:, 0]) != (origins[:, 3] - origins[:, 1])).any()
    targets = correspondence_targets(origins, n)
    half = cell // 2  # pixels of one cell in the half-resolution large view
    large = views["pixel_values_large"][:, 0]
    # Large token -> its 2 x 2 cells as four half-resolution quadrants, in (sub-row, sub-col) order.
    large_quadrants = large.reshape(batch_size, n, 2, half, n, 2, half).permute(0, 1, 4, 2, 5, 3, 6)
    large_quadrants = large_quadrants.reshape(batch_size, n * n, 4 * half * half)
    # Small token -> its cell at half resolution, comparable with one quadrant.
    small = F.avg_pool2d(views["pixel_values_small"][:, :1], 2)[:, 0]
    small_cells = (
        small.reshape(batch_size, n, half, n, half).permute(0, 1, 3, 2, 4).reshape(batch_size, n * n, -1)
    )

    upsampler = AceUpsampler(tiny_vit_config())
    upsampler.mlp = _Constant(large_quadrants)  # each token "predicts" its own four quadrants
    sub_tokens = upsampler(torch.zeros(batch_size, n * n, half * half), n)
    downsampler = AceDownsampler(tiny_vit_config())
    downsampler.mlp = torch.nn.Identity()
    pooled = downsampler(small_cells, n)

    decomposition_peaks = targets.decomposition.argmax(-1)
    composition_peaks = targets.composition.argmax(-1)
    for b in range(batch_size):
        for token in range(n * n):
            if targets.overlap_small[b, token]:
                match = sub_tokens[b, decomposition_peaks[b, token]]
                torch.testing.assert_close(match, small_cells[b, token], atol=1e-5, rtol=0)
            if targets.overlap_large[b, token]:
                match = pooled[b, composition_peaks[b, token]]
                torch.testing.assert_close(match, large_quadrants[b, token], atol=1e-5, rtol=0)


def test_blank_random_cells_blanks_whole_cells_and_exactly_the_ratio() -> None:
    torch.manual_seed(0)
    pixels = torch.rand(3, 2, 48, 64) + 1.0  # no zero pixel before blanking
    blanked = blank_random_cells(pixels, 0.25, 16)
    cells = (
        (blanked == 0).view(3, 2, 3, 16, 4, 16).permute(0, 2, 4, 1, 3, 5).flatten(3)
    )  # [B, rows, cols, px]
    assert bool((cells.all(-1) | ~cells.any(-1)).all()), "a cell is partly blanked"
    assert cells.all(-1).sum((1, 2)).tolist() == [3, 3, 3]  # round(0.25 * 12) per image
    kept = ~cells.any(-1)
    torch.testing.assert_close(
        blanked.view(3, 2, 3, 16, 4, 16).permute(0, 2, 4, 1, 3, 5).flatten(3)[kept],
        pixels.view(3, 2, 3, 16, 4, 16).permute(0, 2, 4, 1, 3, 5).flatten(3)[kept],
    )
    assert not torch.equal(cells[0], cells[1]) or not torch.equal(cells[1], cells[2])


def test_student_mask_ratio_blanks_only_the_students_views_in_training() -> None:
    config = tiny_vit_config(student_mask_ratio=0.5)
    model = AceForPreTraining(config)
    seen: dict[str, torch.Tensor] = {}
    for name in ("student", "teacher"):
        getattr(model, name).register_forward_pre_hook(
            lambda _, args, name=name: seen.update({name: args[0]})
        )
    batch = _batch(config)
    full = torch.cat([batch["pixel_values_large"], batch["pixel_values_small"]])
    model.train()(**batch)
    torch.testing.assert_close(seen["teacher"], full)
    blank = seen["student"] == 0
    assert 0.4 < blank.float().mean() < 0.6
    torch.testing.assert_close(seen["student"][~blank], full[~blank])
    model.eval()(**batch)
    torch.testing.assert_close(seen["student"], full)


def test_blank_random_cells_keeps_one_cell_visible() -> None:
    blanked = blank_random_cells(torch.ones(2, 1, 32, 32), 0.99, 16)
    visible = (blanked != 0).view(2, 2, 16, 2, 16).permute(0, 1, 3, 2, 4).flatten(3).all(-1)
    assert visible.sum((1, 2)).tolist() == [1, 1]


@pytest.mark.parametrize("ratio", [-0.1, 1.0])
def test_student_mask_ratio_outside_0_1_raises(ratio: float) -> None:
    with pytest.raises(ValueError, match="student_mask_ratio"):
        tiny_vit_config(student_mask_ratio=ratio)
