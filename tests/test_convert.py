"""ace_hf.convert on checkpoints written here: ACE/DINO ViT and Microsoft/timm Swin to AceModel, official ACE
checkpoints (their key layout, module structure and forward, rebuilt below) converted exactly, the pickle guard,
key errors, the `ace-hf convert` command, and pretraining's --init_from_timm."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ace_hf import AceConfig, AceModel
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
from tests.conftest import TINY_HEADS, tiny_swin_config, tiny_vit_config

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


# ----------------------------------------------------------------------------------------------------------------
# Official ACE checkpoints (github.com/jlianglab/ACE): the forward of its backbones, rebuilt only as far as the
# comparison needs, with its module and key names (eval mode: no dropout, no drop path).
# ----------------------------------------------------------------------------------------------------------------

OfficialLayerNorm = partial(nn.LayerNorm, eps=1e-6)  # every norm of ACE's Swin and ViT


class OfficialMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class OfficialWindowAttention(nn.Module):
    """models/swin_transformer.py `WindowAttention`: relative position bias, and its index as a saved buffer."""

    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        coords = torch.flatten(
            torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")), 1
        )
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer(
            "relative_position_index", relative[..., 0] * (2 * window - 1) + relative[..., 1]
        )
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.view(tokens, tokens, -1).permute(2, 0, 1)
        if mask is not None:
            attn = attn.view(-1, mask.shape[0], self.heads, tokens, tokens) + mask[None, :, None]
            attn = attn.view(-1, self.heads, tokens, tokens)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, dim))


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    batch, height, width, dim = x.shape
    x = x.view(batch, height // window, window, width // window, window, dim)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, dim)


class OfficialSwinBlock(nn.Module):
    """`SwinTransformerBlock.forward`: square grid from the token count, zero padding to whole windows, cyclic
    shift with the mask built on the padded grid."""

    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.norm2 = OfficialLayerNorm(dim), OfficialLayerNorm(dim)
        self.attn, self.mlp = OfficialWindowAttention(dim, window, heads), OfficialMlp(dim)

    def _mask(self, padded_height: int, padded_width: int) -> torch.Tensor:
        regions = torch.zeros(1, padded_height, padded_width, 1)
        cuts = (slice(0, -self.window), slice(-self.window, -self.shift), slice(-self.shift, None))
        for index, (rows, cols) in enumerate((rows, cols) for rows in cuts for cols in cuts):
            regions[:, rows, cols] = index
        regions = _windows(regions, self.window).squeeze(-1)
        return (regions[:, None] - regions[:, :, None]).ne(0).float() * -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        side = math.isqrt(length)
        pad = (self.window - side % self.window) % self.window
        y = F.pad(self.norm1(x).view(batch, side, side, dim), (0, 0, 0, pad, 0, pad))
        mask = self._mask(side + pad, side + pad).to(x) if self.shift else None
        y = torch.roll(y, (-self.shift, -self.shift), (1, 2)) if self.shift else y
        y = self.attn(_windows(y, self.window), mask).view(-1, self.window, self.window, dim)
        padded = side + pad
        y = y.view(batch, padded // self.window, padded // self.window, self.window, self.window, dim)
        y = y.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded, padded, dim)
        y = torch.roll(y, (self.shift, self.shift), (1, 2)) if self.shift else y
        x = x + y[:, :side, :side].reshape(batch, length, dim)
        return x + self.mlp(self.norm2(x))


class OfficialPatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction, self.norm = nn.Linear(4 * dim, 2 * dim, bias=False), OfficialLayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        side = math.isqrt(length)
        x = F.pad(x.view(batch, side, side, dim), (0, 0, 0, side % 2, 0, side % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(batch, -1, 4 * dim)))


class OfficialSwinStage(nn.Module):
    """`BasicLayer`: blocks alternate plain and shifted windows; patches merge at the end of the stage."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, merge: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            OfficialSwinBlock(dim, heads, window, 0 if index % 2 == 0 else window // 2)
            for index in range(depth)
        )
        self.downsample = OfficialPatchMerging(dim) if merge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class OfficialPatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int, norm: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = OfficialLayerNorm(dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


class OfficialAceSwin(nn.Module):
    """`SwinTransformerForSimMIM` as ACE's `get_cls_model` builds it (patch norm, no absolute positions, a
    `mask_token`; its `head` is an Identity) and its `forward`: the normed tokens (and their mean)."""

    def __init__(self, embed_dim: int, depths: list[int], heads: list[int], window: int) -> None:
        super().__init__()
        self.patch_embed = OfficialPatchEmbed(4, embed_dim, norm=True)
        last = len(depths) - 1
        self.layers = nn.ModuleList(
            OfficialSwinStage(embed_dim * 2**i, depths[i], heads[i], window, merge=i < last)
            for i in range(last + 1)
        )
        self.norm = OfficialLayerNorm(embed_dim * 2**last)
        self.mask_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        _perturb_norms(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def _perturb_norms(module: nn.Module) -> None:
    """Trained weights: no LayerNorm left at its identity initialization."""
    for norm in module.modules():
        if isinstance(norm, nn.LayerNorm):
            nn.init.normal_(norm.weight, 1.0, 0.1), nn.init.normal_(norm.bias, 0.0, 0.1)


def _official_vit() -> nn.Module:
    """ACE's `vit_base_SIM` at a tiny width: DINO's (timm-like) ViT/32 at 448 px with norms at eps 1e-6 (timm's
    module and key names are DINO's), and the SimMIM `mask_token`."""
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=448, patch_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=0, qkv_bias=True
    )
    vit.mask_token = nn.Parameter(torch.randn(1, 1, 32) * 0.02)
    _perturb_norms(vit)
    return vit


def _official_vit_tokens(vit: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """DINO's `prepare_tokens` (its `interpolate_pos_encoding`: scale factor (grid + 0.1) / trained grid), the
    blocks and the final norm; the official `forward` returns token 0 (CLS)."""
    height, width = (side // 32 for side in pixels.shape[-2:])
    positions, side = vit.pos_embed, math.isqrt(vit.pos_embed.shape[1] - 1)
    if (height, width) != (side, side):
        grid = positions[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((height + 0.1) / side, (width + 0.1) / side), mode="bicubic")
        assert grid.shape[-2:] == (height, width)
        positions = torch.cat((positions[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)
    x = vit.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
    x = torch.cat((vit.cls_token.expand(len(x), -1, -1), x), dim=1) + positions
    for block in vit.blocks:
        x = block(x)
    return vit.norm(x)


def _official_checkpoint(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> dict:
    """What the official main.py saves: DDP-wrapped `MultiCropWrapper`s (backbone, DINO head, dense head), the
    optimizer, the run's argparse.Namespace and the loss modules' state."""

    def wrapped(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        heads = {
            "head.last_layer.weight_g": torch.ones(8, 1),
            "DenseHead.layers.0.1.running_mean": torch.zeros(4),
        }
        return {
            f"module.{name}": value for name, value in {**_prefixed("backbone.", backbone), **heads}.items()
        }

    return {
        "student": wrapped(student),
        "teacher": wrapped(teacher),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0, 1]}]},
        "epoch": 3,
        "args": argparse.Namespace(out_dim=8, epochs=100),
        "barlow_loss": {"fc.weight": torch.randn(1, 512)},
        "dino_loss": {"center": torch.zeros(1, 8)},
    }


def _prefixed(prefix: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + name: value for name, value in state_dict.items()}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _official_pair(
    tmp_path: Path, make: Callable[[], nn.Module], config: Path
) -> tuple[dict[str, nn.Module], dict[str, AceModel]]:
    """An official checkpoint of two differently initialized float32 backbones, each converted with its --key;
    both sides are returned in float64, so that only a real difference shows."""
    torch.manual_seed(0)
    official = {"student": make(), "teacher": make()}
    torch.save(
        _official_checkpoint(official["student"].state_dict(), official["teacher"].state_dict()),
        tmp_path / "checkpoint.pth",
    )
    converted = {}
    for key in official:
        main(
            ["--checkpoint", str(tmp_path / "checkpoint.pth"), "--output_dir", str(tmp_path / key)]
            + ["--config", str(config), "--key", key]
        )
        converted[key] = AceModel.from_pretrained(tmp_path / key).double().eval()
    return {key: backbone.double().eval() for key, backbone in official.items()}, converted


def _official_swin_config(tmp_path: Path) -> Path:
    """The official Swin-B structure at a tiny width: 4 stages, patch 4, window 7, at 448 px."""
    return _config_dir(
        tmp_path,
        AceConfig.from_preset(
            "ace-swin-b",
            embed_dim=8,
            depths=[2, 2, 2, 2],
            num_heads=[1, 2, 2, 4],
            drop_path_rate=0.0,
            **TINY_HEADS,
        ),
    )


@pytest.mark.parametrize("size", [448, 320])  # 320: every stage's grid padded to whole windows
def test_official_ace_swin_checkpoint_converts_exactly(tmp_path, one_thread, size) -> None:
    """mask_token dropped, every LayerNorm at eps 1e-6 (the patch embedding's and merging's too)."""
    swin = partial(OfficialAceSwin, embed_dim=8, depths=[2, 2, 2, 2], heads=[1, 2, 2, 4], window=7)
    official, converted = _official_pair(tmp_path, swin, _official_swin_config(tmp_path))
    pixels = torch.randn(2, 3, size, size, dtype=torch.float64)
    for key, model in converted.items():
        norms = [module for module in model.modules() if isinstance(module, nn.LayerNorm)]
        assert len(norms) == 1 + 8 * 2 + 3 + 1 and {norm.eps for norm in norms} == {1e-6}, key
        with torch.no_grad():
            expected = official[key](pixels)
            actual = model(pixels).last_hidden_state
        assert _relative_error(actual, expected) < 1e-12, key


def test_official_ace_vit_checkpoint_converts_exactly_with_dino_interpolation(tmp_path, one_thread) -> None:
    """At 448 px every token matches; at 320 px (10 x 10 tokens from a 14 x 14 grid) only with
    position_interpolation="dino", as the official ViT resizes; its forward returns the CLS token."""
    vit_config = tiny_vit_config(
        image_size=448, patch_size=32, intermediate_size=128, view_tokens=14, grid_size=28
    )
    official, converted = _official_pair(tmp_path, _official_vit, _config_dir(tmp_path, vit_config))
    for key, model in converted.items():
        dino = AceModel.from_pretrained(tmp_path / key, position_interpolation="dino").double().eval()
        for size in (448, 320):
            pixels = torch.randn(2, 3, size, size, dtype=torch.float64)
            with torch.no_grad():
                expected = _official_vit_tokens(official[key], pixels)
                exact, matching = model(pixels).last_hidden_state, dino(pixels).last_hidden_state
            assert _relative_error(matching, expected) < 1e-6, (key, size)
            assert _relative_error(matching[:, 0], expected[:, 0]) < 1e-6, (key, size)
            assert (_relative_error(exact, expected) < 1e-6) == (size == 448), (key, size)


@pytest.mark.parametrize("layer_norm_eps", [1e-5, 1e-6])
def test_swin_exports_saved_before_patch_layer_norm_eps_keep_their_norms(tmp_path, layer_norm_eps) -> None:
    """A Swin config.json without `patch_layer_norm_eps` (older exports, e.g. ace-swin-b converted with eps
    1e-5, or a custom config at the default 1e-6) was trained with transformers' fixed 1e-5 in the patch
    embedding and merging norms, and `layer_norm_eps` elsewhere: it loads that way."""
    model = AceModel(tiny_swin_config(depths=[2, 2], layer_norm_eps=layer_norm_eps))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["patch_layer_norm_eps"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AceModel.from_pretrained(tmp_path)
    swin = loaded.swin
    patch_norms = [swin.embeddings.norm, swin.encoder.layers[0].downsample.norm]
    other_norms = [
        norm for norm in swin.modules() if isinstance(norm, nn.LayerNorm) and norm not in patch_norms
    ]
    assert {norm.eps for norm in patch_norms} == {1e-5}
    assert len(other_norms) == 4 * 2 + 1 and {norm.eps for norm in other_norms} == {
        layer_norm_eps
    }  # 4 blocks, final


def test_an_earlier_export_is_not_replaced_unless_asked(tmp_path, capsys) -> None:
    checkpoint = tmp_path / "ace_vit.pth"
    torch.save(_ace_checkpoint(_timm_vit().state_dict()), checkpoint)
    config = _config_dir(tmp_path, tiny_vit_config())
    argv = ["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--config", str(config)]
    main(argv)
    weights = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(
        SystemExit, match=r"^error: --output_dir .* already holds earlier results \(README.md, config.json"
    ):
        main(argv)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == weights
    main([*argv, "--overwrite_output_dir"])
