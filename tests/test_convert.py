"""ace_hf.convert on checkpoints written here: ACE/DINO ViT and Microsoft/timm Swin to AceModel, the pickle guard,
key errors, the `ace-hf convert` command, and pretraining's --init_from_timm."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ace_hf import AceModel
from ace_hf.arguments import parse_arguments
from ace_hf.commands.convert import ConversionArguments, convert, main
from ace_hf.convert import (
    ace_model_from_timm_state_dict,
    convert_timm_vit_state_dict,
    encoder_state_dict,
    init_from_timm,
)
from ace_hf.pretraining import PretrainingArguments
from ace_hf.pretraining.loop import build_config, build_model
from tests.conftest import tiny_swin_config, tiny_vit_config

timm = pytest.importorskip("timm")


def _convert(argv: list[str]) -> Path:
    """`ace-hf convert ARGV`, with the library's exceptions (the command turns them into one error line)."""
    return convert(parse_arguments(ConversionArguments, argv))


class Opaque:
    """A pickled object that is not a tensor: weights_only loading must refuse it."""


def _timm_vit(img_size: int = 32, patch_size: int = 8) -> torch.nn.Module:
    """timm's ViT with tiny_vit_config's sizes (pre-norm, qkv bias, eps 1e-6, CLS token)."""
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=0,
    ).eval()


def _timm_swin() -> torch.nn.Module:
    """timm's Swin with tiny_swin_config's sizes; stage 0 has a shifted (masked) block."""
    return timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4, num_classes=0
    ).eval()


def _ace_checkpoint(teacher: dict[str, torch.Tensor]) -> dict:
    """The official ACE/DINO layout: DDP-wrapped teacher and student with their heads, and run metadata."""
    heads = {
        "module.head.last_layer.weight": torch.randn(8, 4),
        "module.DenseHead.0.weight": torch.randn(4, 4),
    }
    student = {f"module.backbone.{name}": value + 1 for name, value in teacher.items()}
    return {
        "teacher": {**{f"module.backbone.{name}": value for name, value in teacher.items()}, **heads},
        "student": {**student, **heads, "module.downsample.mlp.0.weight": torch.randn(4, 16)},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_base", out_dim=8),
    }


def _config_dir(tmp_path: Path, config) -> Path:
    folder = tmp_path / "config"
    config.save_pretrained(folder)
    return folder


def test_vit_checkpoint_converts_to_matching_encoder(tmp_path, one_thread) -> None:
    reference = _timm_vit()
    checkpoint = tmp_path / "ace_vit.pth"
    torch.save(_ace_checkpoint(reference.state_dict()), checkpoint)
    config = _config_dir(tmp_path, tiny_vit_config())
    output = tmp_path / "out"
    main(["--checkpoint", str(checkpoint), "--output_dir", str(output), "--config", str(config)])

    assert json.loads((output / "preprocessor_config.json").read_text())["size"]["height"] == 32
    model = AceModel.from_pretrained(output).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_features(pixels)[:, 1:]
        actual = model(pixels).last_hidden_state[:, 1:]
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_key_selects_the_student_and_wrappers_and_heads_are_dropped() -> None:
    weights = _timm_vit().state_dict()
    checkpoint = _ace_checkpoint(weights)
    teacher = encoder_state_dict(checkpoint)  # auto: the teacher, as ACE publishes
    assert set(teacher) == set(weights) and torch.equal(teacher["norm.weight"], weights["norm.weight"])
    student = encoder_state_dict(checkpoint, "student")
    assert set(student) == set(weights)
    assert torch.equal(student["norm.weight"], checkpoint["student"]["module.backbone.norm.weight"])
    with pytest.raises(ValueError, match="no 'model' state dict.*teacher, student, epoch, args"):
        encoder_state_dict(checkpoint, "model")


def _microsoft_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Microsoft Swin keys: patch merging at the end of stage N (timm: start of N+1), plus the relative position
    index buffers its checkpoints carry."""
    converted = {}
    for name, value in timm_state.items():
        parts = name.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        converted[".".join(parts)] = value
        if name.endswith("relative_position_bias_table"):
            index_name = name.replace("relative_position_bias_table", "relative_position_index")
            converted[index_name] = torch.zeros(16, 16, dtype=torch.long)
    return converted


@pytest.mark.parametrize("layout", ["microsoft", "timm"])
def test_swin_checkpoint_converts_to_matching_encoder(tmp_path, one_thread, layout) -> None:
    reference = _timm_swin()
    if layout == "microsoft":
        checkpoint = tmp_path / "ace_swin.pth"
        torch.save(_ace_checkpoint(_microsoft_layout(reference.state_dict())), checkpoint)
    else:
        checkpoint = tmp_path / "swin.safetensors"
        save_file(reference.state_dict(), checkpoint)
    config = _config_dir(tmp_path, tiny_swin_config(depths=[2, 2]))
    output = tmp_path / "out"
    main(["--checkpoint", str(checkpoint), "--output_dir", str(output), "--config", str(config)])

    model = AceModel.from_pretrained(output).eval()
    assert model.config.layer_norm_eps == 1e-5  # Swin's eps, so the outputs match
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.forward_features(pixels)  # [B, h, w, C]
        actual = model(pixels).patch_embeddings.permute(0, 2, 3, 1)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_pickled_objects_are_refused_unless_unsafe_load(tmp_path, caplog) -> None:
    checkpoint = tmp_path / "with_object.pth"
    torch.save({"teacher": _timm_vit().state_dict(), "extra": Opaque()}, checkpoint)
    config = _config_dir(tmp_path, tiny_vit_config())
    argv = ["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--config", str(config)]
    with pytest.raises(ValueError, match=r"Opaque.*--unsafe_load"):
        _convert(argv)
    with pytest.raises(SystemExit, match=r"^error: .*Opaque.*--unsafe_load"):
        main(argv)
    with caplog.at_level(logging.WARNING, logger="ace_hf.convert"):
        main([*argv, "--unsafe_load"])
    assert "runs any code" in caplog.text
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_missing_unexpected_and_wrong_backbone_weights_are_named(tmp_path) -> None:
    weights = _timm_vit().state_dict()
    del weights["blocks.1.norm1.weight"]
    weights["blocks.0.ls1.gamma"] = torch.ones(32)
    checkpoint = tmp_path / "broken.safetensors"
    save_file(weights, checkpoint)
    config = _config_dir(tmp_path, tiny_vit_config())
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.norm1\.weight.*blocks\.0\.ls1\.gamma"):
        _convert(
            ["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--config", str(config)]
        )
    with pytest.raises(ValueError, match="weights are a vit but the model is a swin"):
        ace_model_from_timm_state_dict(_timm_vit().state_dict(), tiny_swin_config())


def test_init_from_timm_loads_imagenet_weights_into_student_and_teacher(tmp_path, one_thread) -> None:
    """A 16 px timm ViT (2 x 2 grid) starts a 32 px ACE model: its position embeddings are resampled."""
    weights = _timm_vit(img_size=16).state_dict()
    save_file(weights, tmp_path / "vit.safetensors")
    config = _config_dir(tmp_path, tiny_vit_config())
    argv = ["--config_name", str(config), "--output_dir", str(tmp_path / "out")]
    args = parse_arguments(
        PretrainingArguments, [*argv, "--init_from_timm", str(tmp_path / "vit.safetensors")]
    )
    model = build_model(args, build_config(args))

    expected = convert_timm_vit_state_dict(weights)
    expected["embeddings.position_embeddings"] = timm.layers.resample_abs_pos_embed(
        weights["pos_embed"], new_size=[4, 4], num_prefix_tokens=1
    )
    student = model.student.ace.state_dict()
    assert set(student) == set(expected)
    for name, value in expected.items():
        assert torch.equal(student[name], value), name
    for name, value in model.teacher.ace.state_dict().items():
        assert torch.equal(value, student[name]), name

    with pytest.raises(SystemExit):
        parse_arguments(
            PretrainingArguments, [*argv, "--init_from_timm", "x.pth", "--model_name_or_path", "y"]
        )


def test_init_from_timm_refuses_another_patch_size_and_missing_files(tmp_path) -> None:
    from ace_hf import AceForPreTraining

    save_file(_timm_vit(patch_size=4).state_dict(), tmp_path / "vit.safetensors")
    model = AceForPreTraining(tiny_vit_config())
    with pytest.raises(ValueError, match=r"patch size \(4, 4\) but the model uses \(8, 8\)"):
        init_from_timm(model, str(tmp_path))  # a folder with one weights file
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        init_from_timm(model, str(tmp_path / "missing.pth"))
