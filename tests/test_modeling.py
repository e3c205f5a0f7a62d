"""AceConfig validation and the AceModel encoders (ViT and Swin)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ace_hf import AceConfig, AceForPreTraining, AceModel
from ace_hf.configuration_ace import BACKBONE_ONLY_FIELDS
from ace_hf.convert import ace_model_from_timm_state_dict
from ace_hf.modeling_ace import sincos_position_embeddings
from tests.conftest import tiny_swin_config, tiny_vit_config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"backbone_type": "resnet"}, "backbone_type"),
        ({"image_size": 30}, "image_size"),  # not a multiple of patch_size 8
        ({"num_attention_heads": 3}, "num_attention_heads"),  # 32 % 3
        ({"view_tokens": 3, "image_size": 24}, "view_tokens"),  # odd
        ({"view_tokens": 2}, "image_size"),  # 2 * 8 != 32
        ({"grid_size": 7}, "grid_size"),  # < 2 * view_tokens
        ({"min_overlap": 0.0}, "min_overlap"),
        ({"teacher_temperature": 0.0}, "teacher_temperature"),
        ({"teacher_momentum": 0.9, "teacher_momentum_end": 0.5}, "teacher_momentum"),
        ({"position_embedding_init": "learned"}, "position_embedding_init"),
        (  # sin-cos splits the width into four equal parts
            {"position_embedding_init": "sincos", "hidden_size": 30, "num_attention_heads": 3},
            "position_embedding_init",
        ),
    ],
)
def test_config_rejects_invalid_fields_by_name(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"AceConfig\.{field}="):
        tiny_vit_config(**overrides)


def test_swin_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"AceConfig\.window_size="):
        tiny_swin_config(window_size=3)
    with pytest.raises(ValueError, match=r"AceConfig\.num_heads="):
        tiny_swin_config(num_heads=[3, 2])


@pytest.mark.parametrize("preset", ["ace-vit-b", "ace-swin-b", "ace-vit-tiny"])
def test_presets_are_consistent(preset: str) -> None:
    config = AceConfig.from_preset(preset)
    assert config.view_tokens * config.token_stride == config.image_size
    assert AceConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_ace_b_presets_match_the_method() -> None:
    vit, swin = AceConfig.from_preset("ace-vit-b"), AceConfig.from_preset("ace-swin-b")
    assert (vit.image_size, vit.patch_size, vit.hidden_size, vit.view_tokens) == (448, 32, 768, 14)
    assert (swin.token_stride, swin.feature_dim, swin.depths, swin.window_size) == (
        32,
        1024,
        [2, 2, 18, 2],
        7,
    )
    with pytest.raises(ValueError, match="Unknown ACE preset"):
        AceConfig.from_preset("ace-vit-z")


@pytest.mark.parametrize("make_config", [tiny_vit_config, tiny_swin_config])
def test_outputs_shapes_and_pooling(make_config) -> None:
    config = make_config()
    model = AceModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        output = model(pixels)
    channels = config.feature_dim
    patch_tokens = (
        output.last_hidden_state[:, 1:] if config.backbone_type == "vit" else output.last_hidden_state
    )
    assert output.last_hidden_state.shape == (2, 16 + (config.backbone_type == "vit"), channels)
    assert output.patch_embeddings.shape == (2, channels, 4, 4)
    torch.testing.assert_close(output.pooler_output, patch_tokens.mean(1))
    # The map is the token sequence in row-major order: token (r, c) = sequence index r * w + c.
    torch.testing.assert_close(output.patch_embeddings[:, :, 1, 2], patch_tokens[:, 1 * 4 + 2])
    assert isinstance(model(pixels, return_dict=False), tuple)


@pytest.mark.parametrize("make_config", [tiny_vit_config, tiny_swin_config])
def test_non_square_inputs(make_config) -> None:
    model = AceModel(make_config()).eval()
    with torch.no_grad():
        output = model(torch.randn(1, 3, 48, 32))
    assert output.patch_embeddings.shape[-2:] == (6, 4)


def test_position_embeddings_interpolate_height_and_width_correctly() -> None:
    """Rows of the grid must stay rows: encode the row in channel 0 and the column in channel 1."""
    model = AceModel(tiny_vit_config())
    side = model.embeddings.grid_side
    rows, cols = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    with torch.no_grad():
        model.embeddings.position_embeddings.zero_()
        model.embeddings.position_embeddings[0, 1:, 0] = rows.flatten()
        model.embeddings.position_embeddings[0, 1:, 1] = cols.flatten()
    pos = model.embeddings.interpolate_pos_encoding(8, 2)[0, 1:].reshape(8, 2, -1)
    assert torch.all(pos[:, 0, 0].diff() > 0), "channel 0 (row) must increase down the 8 rows"
    torch.testing.assert_close(pos[:, 0, 0], pos[:, 1, 0])  # and be constant along a row
    assert torch.all(pos[0, :, 1].diff() > 0), "channel 1 (column) must increase along the 2 columns"
    torch.testing.assert_close(pos[0, :, 1], pos[5, :, 1])


def test_sdpa_matches_eager_attention() -> None:
    model = AceModel(tiny_vit_config()).eval()
    pixels = torch.randn(2, 3, 32, 32)
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(pixels).last_hidden_state
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(pixels, output_attentions=True)
    torch.testing.assert_close(sdpa, eager.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert len(eager.attentions) == 2 and eager.attentions[0].shape == (2, 2, 17, 17)


def test_default_attention_is_sdpa() -> None:
    assert AceModel(tiny_vit_config()).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("make_config", [tiny_vit_config, tiny_swin_config])
def test_gradient_checkpointing_gives_equal_outputs_and_gradients(make_config) -> None:
    model = AceModel(make_config()).train()
    pixels = torch.randn(2, 3, 32, 32)

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(pixels).patch_embeddings.square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    reference_loss, reference_grads = loss_and_grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, reference_loss)
    assert len(grads) == len(reference_grads)
    for grad, reference in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference)


def test_hidden_states_are_returned_per_layer() -> None:
    model = AceModel(tiny_vit_config()).eval()
    with torch.no_grad():
        output = model(torch.randn(1, 3, 32, 32), output_hidden_states=True)
    assert len(output.hidden_states) == 3  # embeddings + 2 layers


def test_bad_pixel_values_raise_clear_errors() -> None:
    model = AceModel(tiny_vit_config())
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="multiples of the token stride 8"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="num_channels=3"):
        model(torch.randn(1, 1, 32, 32))


def test_matches_timm_vision_transformer() -> None:
    """Same weights, same numbers: the ViT here is timm's ViT (the format of the published ACE weights)."""
    timm = pytest.importorskip("timm")
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=0
    ).eval()
    model = ace_model_from_timm_state_dict(reference.state_dict(), tiny_vit_config()).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_features(pixels)
        actual = model(pixels).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path) -> None:
    model = AceModel(tiny_vit_config()).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AceModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).pooler_output, model(pixels).pooler_output)


@pytest.mark.parametrize("make_config", [tiny_vit_config, tiny_swin_config])
def test_half_precision_models_accept_float32_pixels(make_config) -> None:
    model = AceModel(make_config()).to(torch.bfloat16).eval()
    with torch.no_grad():
        output = model(torch.randn(1, 3, 32, 32))
    assert output.pooler_output.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("make_config", "other_backbone"), [(tiny_vit_config, "swin"), (tiny_swin_config, "vit")]
)
def test_config_json_holds_only_its_own_backbone_fields(tmp_path, make_config, other_backbone: str) -> None:
    config = make_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not set(BACKBONE_ONLY_FIELDS[other_backbone]) & set(saved)
    assert set(BACKBONE_ONLY_FIELDS[config.backbone_type]) <= set(saved)
    assert AceConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


@pytest.mark.parametrize("make_config", [tiny_vit_config, tiny_swin_config])
def test_exports_with_every_backbone_field_still_load(tmp_path, make_config) -> None:
    """config.json files written before the split carry both backbones' fields."""
    model = AceModel(make_config()).eval()
    model.save_pretrained(tmp_path)
    every_field = {**AceConfig().__dict__, **make_config().__dict__}
    old = {key: every_field[key] for fields in BACKBONE_ONLY_FIELDS.values() for key in fields}
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, **old}))
    loaded = AceModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).pooler_output, model(pixels).pooler_output)
    assert loaded.config.to_diff_dict() == model.config.to_diff_dict()  # the old fields are not saved again


def test_a_small_input_does_not_change_later_swin_outputs() -> None:
    """transformers' Swin clamps its windows in place for small inputs; the next larger input must not care."""
    model = AceModel(tiny_swin_config(depths=[2, 2], num_heads=[1, 2])).eval()
    large = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(large).last_hidden_state
        model(torch.randn(1, 3, 32, 32))  # last stage grid 4 = the window: transformers drops the shift
        after = model(large).last_hidden_state
        torch.testing.assert_close(after, before, rtol=0, atol=0)
        with pytest.raises(ValueError, match="at least window_size \\* token stride = 32"):
            model(torch.randn(1, 3, 16, 32))


def test_sincos_position_embeddings_follow_the_mae_layout() -> None:
    """Checked entry by entry against the formula: [sin(row w) | cos(row w) | sin(col w) | cos(col w)] with
    w_k = 10000^(-k / (dim / 4)), rows of the grid in row-major token order, and a zero CLS row."""
    side, dim = 3, 8
    table = sincos_position_embeddings(side, dim)
    assert table.shape == (1, 1 + side * side, dim)
    assert torch.equal(table[0, 0], torch.zeros(dim))
    for row in range(side):
        for col in range(side):
            token = table[0, 1 + row * side + col]
            for k in range(dim // 4):
                w = 10000 ** (-k / (dim // 4))
                expected = [math.sin(row * w), math.cos(row * w), math.sin(col * w), math.cos(col * w)]
                got = [float(token[part * (dim // 4) + k]) for part in range(4)]
                assert got == pytest.approx(expected, abs=1e-6), (row, col, k)


def test_position_embedding_init_sincos_starts_student_and_teacher_there_and_keeps_saved_weights(
    tmp_path,
) -> None:
    config = tiny_vit_config(position_embedding_init="sincos")
    expected = sincos_position_embeddings(config.image_size // config.patch_size, config.hidden_size)
    assert torch.equal(AceModel(config).embeddings.position_embeddings, expected)
    pretraining = AceForPreTraining(config)
    for encoder in (pretraining.student.ace, pretraining.teacher.ace):
        assert torch.equal(encoder.embeddings.position_embeddings, expected)
    # The default keeps ACE's truncated normal; trained embeddings survive a save and load.
    assert AceModel(tiny_vit_config()).embeddings.position_embeddings.std() < 0.05
    model = AceModel(config)
    with torch.no_grad():
        model.embeddings.position_embeddings.mul_(3.0)
    model.save_pretrained(tmp_path)
    loaded = AceModel.from_pretrained(tmp_path)
    assert loaded.config.position_embedding_init == "sincos"
    assert torch.equal(loaded.embeddings.position_embeddings, model.embeddings.position_embeddings)
