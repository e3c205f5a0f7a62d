"""Convert published ACE / DINO checkpoints into an [`AceModel`], and start pretraining from timm's weights.

    ace-hf convert --checkpoint ace_swin_b.pth --output_dir ace-swin-b --model_preset ace-swin-b

Source layouts: ViT in timm's (= DINO's) key names; Swin in Microsoft's (the official ACE code) or timm's key
names; either bare or inside a training checkpoint (`{"teacher": {"module.backbone.<key>": ...}, ...}`, as the
official ACE `main.py` saves). Official ACE checkpoints convert exactly (see `_source_config` for Swin's eps).
Training-side module: never imported by the files that travel to the Hub. Its command line is
`ace_hf.commands.convert`, so that initializing pretraining from timm does not load the export code.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .configuration_ace import AceConfig
from .modeling_ace import AceForPreTraining, AceModel

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Folder files tried first by `--init_from_timm` (what timm's Hub repos and `save_pretrained` write).
PREFERRED_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Entries of a training checkpoint that hold an encoder, in the order `key="auto"` tries them: ACE and DINO
# publish the teacher; ImageNet checkpoints (Microsoft Swin, DeiT) keep theirs under "model" or "state_dict".
CHECKPOINT_KEYS = ("teacher", "student", "model", "state_dict")
# LayerNorm eps of a Swin's weights, in every norm: the official ACE Swin (`SwinTransformerForSimMIM`, told apart
# by its `mask_token`) builds them with 1e-6; Microsoft's and timm's ImageNet Swins with LayerNorm's default.
# (ACE's ViT, like DINO's and timm's, uses 1e-6, AceConfig's default.)
ACE_SWIN_LAYER_NORM_EPS = 1e-6
IMAGENET_SWIN_LAYER_NORM_EPS = 1e-5

# Source weights with no counterpart in the encoder: classifier heads, buffers AceModel recomputes, and the
# official ACE backbones' SimMIM `mask_token` (it stands in for masked patches in training only).
_IGNORED = re.compile(
    r"^(head|head_dense|fc_norm|head_drop)\.|(relative_position_index|attn_mask)$|^mask_token$"
)

_VIT_QKV = (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"encoder.layer.\1.attention.")
_VIT_RENAMES = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.norm2."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layer.\1.mlp."),
    (r"^norm\.", "layernorm."),
]

_SWIN_BLOCK = r"^layers\.(\d+)\.blocks\.(\d+)\."
_SWIN_BLOCK_TARGET = r"swin.encoder.layers.\1.blocks.\2."
_SWIN_QKV = (_SWIN_BLOCK + r"attn\.qkv\.(weight|bias)$", _SWIN_BLOCK_TARGET + "attention.")
_SWIN_RENAMES = [
    (r"^patch_embed\.proj\.", "swin.embeddings.patch_embeddings.projection."),
    (r"^patch_embed\.norm\.", "swin.embeddings.norm."),
    (_SWIN_BLOCK + r"norm1\.", _SWIN_BLOCK_TARGET + "layernorm_before."),
    (_SWIN_BLOCK + r"norm2\.", _SWIN_BLOCK_TARGET + "layernorm_after."),
    (_SWIN_BLOCK + r"attn\.proj\.", _SWIN_BLOCK_TARGET + "attention.o_proj."),
    (
        _SWIN_BLOCK + r"attn\.relative_position_bias_table$",
        _SWIN_BLOCK_TARGET + "attention.relative_position_bias.relative_position_bias_table",
    ),
    (_SWIN_BLOCK + r"mlp\.", _SWIN_BLOCK_TARGET + "mlp."),
    # Microsoft and transformers both merge patches at the end of stage N (timm's layout is shifted first).
    (r"^layers\.(\d+)\.downsample\.", r"swin.encoder.layers.\1.downsample."),
    (r"^norm\.", "swin.layernorm."),
]


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# ----------------------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, unsafe_load: bool = False) -> Mapping[str, Any]:
    """Read a .safetensors file or a torch checkpoint, refusing pickled code unless `unsafe_load`.

    `argparse.Namespace` is allowed: the official ACE/DINO checkpoints store their arguments as one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} not found.")
    if path.suffix == ".safetensors":
        return load_file(path)
    if unsafe_load:
        logger.warning(
            f"--unsafe_load: unpickling {path} runs any code it contains; only use files you trust."
        )
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        raise ValueError(
            f"{str(path)!r} holds pickled objects besides tensors"
            f"{f' ({found.group(1)})' if found else ''}, and unpickling them could run arbitrary code. "
            "If you trust the file, rerun with --unsafe_load."
        ) from error


def encoder_state_dict(checkpoint: Mapping[str, Any], key: str = "auto") -> dict[str, torch.Tensor]:
    """The encoder's tensors without training wrappers: picks the `key` entry ("auto": the first of
    CHECKPOINT_KEYS present, else the checkpoint itself), strips DDP's `module.` and keeps only `backbone.*`
    when present (the DINO/ACE wrapper also holds the projection heads)."""
    state_dict = _checkpoint_entry(checkpoint, key)
    state_dict = {re.sub(r"^(module\.)+", "", name): value for name, value in state_dict.items()}
    if any(name.startswith("backbone.") for name in state_dict):
        state_dict = {
            name[len("backbone.") :]: v for name, v in state_dict.items() if name.startswith("backbone.")
        }
    not_tensors = [name for name, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"The checkpoint entry has non-tensor values ({_few(not_tensors)}); top-level keys are "
            f"{_few(list(checkpoint))}: pick the encoder's entry with --key."
        )
    return state_dict


def _checkpoint_entry(checkpoint: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    if key != "auto":
        if not isinstance(checkpoint.get(key), Mapping):
            raise ValueError(
                f"The checkpoint has no {key!r} state dict; its top-level keys: {_few(list(checkpoint))}"
            )
        return checkpoint[key]
    for candidate in CHECKPOINT_KEYS:
        if isinstance(checkpoint.get(candidate), Mapping):
            logger.info(f"Using the checkpoint's {candidate!r} weights.")
            return checkpoint[candidate]
    return checkpoint


def detect_backbone(state_dict: Mapping[str, torch.Tensor]) -> str:
    """ "vit" (timm/DINO `blocks.*`) or "swin" (Microsoft/timm `layers.*`), so a wrong preset fails early."""
    if any(name.startswith("layers.") for name in state_dict):
        return "swin"
    if any(name.startswith("blocks.") for name in state_dict):
        return "vit"
    raise ValueError(
        f"Found neither ViT (blocks.*) nor Swin (layers.*) weights; the keys start with {_few(list(state_dict))}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Key conversion
# ----------------------------------------------------------------------------------------------------------------


def convert_timm_vit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm/DINO ViT keys -> AceModel keys, fused qkv split; heads dropped, unknown keys kept as they are."""
    return _rename(state_dict, _VIT_RENAMES, *_VIT_QKV)


def convert_swin_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Microsoft (or timm) Swin keys -> AceModel's transformers Swin keys; relative position indices and
    attention masks are dropped (transformers recomputes them)."""
    if _is_timm_swin(state_dict):
        state_dict = {_microsoft_downsample_key(name): value for name, value in state_dict.items()}
    return _rename(state_dict, _SWIN_RENAMES, *_SWIN_QKV)


def _is_timm_swin(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """timm merges patches at the start of stage N+1 (no `layers.0.downsample`), Microsoft at the end of N."""
    merges = [name for name in state_dict if re.match(r"^layers\.\d+\.downsample\.", name)]
    return bool(merges) and not any(name.startswith("layers.0.downsample.") for name in merges)


def _microsoft_downsample_key(name: str) -> str:
    return re.sub(
        r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", name
    )


def _rename(
    state_dict: Mapping[str, torch.Tensor], renames: list[tuple[str, str]], qkv_pattern: str, qkv_target: str
) -> dict[str, torch.Tensor]:
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if _IGNORED.search(name):
            continue
        fused = re.match(qkv_pattern, name)
        if fused:
            prefix, kind = fused.expand(qkv_target), fused.groups()[-1]
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                converted[f"{prefix}{proj}.{kind}"] = part.clone()
            continue
        converted[_renamed(name, renames)] = tensor
    return converted


def _renamed(name: str, renames: list[tuple[str, str]]) -> str:
    for pattern, replacement in renames:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return name  # reported as unexpected by load_encoder_weights


# ----------------------------------------------------------------------------------------------------------------
# Loading into an AceModel
# ----------------------------------------------------------------------------------------------------------------


def fit_to_model(converted: dict[str, torch.Tensor], model: AceModel) -> dict[str, torch.Tensor]:
    """Resample ViT position embeddings to the model's grid; refuse another patch size (its resampling is lossy)."""
    expected = model.state_dict()
    patch_key = next(name for name in expected if name.endswith("patch_embeddings.projection.weight"))
    if patch_key in converted and converted[patch_key].shape[-2:] != expected[patch_key].shape[-2:]:
        raise ValueError(
            f"The weights use patch size {tuple(converted[patch_key].shape[-2:])} but the model uses "
            f"{tuple(expected[patch_key].shape[-2:])} (config.patch_size={model.config.patch_size}); pick "
            "weights or a config with the same patch size."
        )
    pos_key = "embeddings.position_embeddings"
    if pos_key in converted and converted[pos_key].shape[1] != expected[pos_key].shape[1]:
        converted = {
            **converted,
            pos_key: _resample_position_embeddings(converted[pos_key], expected[pos_key]),
        }
    return converted


def _resample_position_embeddings(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    resample_abs_pos_embed = _import_timm().layers.resample_abs_pos_embed
    old_side, new_side = math.isqrt(source.shape[1] - 1), math.isqrt(target.shape[1] - 1)
    logger.info(
        f"Resampling position embeddings from a {old_side}x{old_side} to a {new_side}x{new_side} grid."
    )
    return resample_abs_pos_embed(source, new_size=[new_side, new_side], num_prefix_tokens=1)


def load_encoder_weights(model: AceModel, converted: Mapping[str, torch.Tensor]) -> None:
    """Load every encoder weight or raise one error naming the missing, unexpected and misshapen keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    misshapen = [
        f"{name} {tuple(converted[name].shape)} vs {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(converted))
        if converted[name].shape != expected[name].shape
    ]
    problems = [
        f"{label} ({len(names)}): {_few(names)}"
        for label, names in (
            ("AceModel weights missing from the checkpoint", missing),
            ("unexpected checkpoint weights", unexpected),
            ("shapes differ (checkpoint vs model)", misshapen),
        )
        if names
    ]
    if problems:
        raise ValueError(
            f"The weights do not fit a {model.config.backbone_type} AceModel with this config: "
            + "; ".join(problems)
            + ". Check --model_preset / --config against the checkpoint."
        )
    model.load_state_dict(converted)


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], backbone_type: str) -> dict[str, torch.Tensor]:
    """Check that the weights are a `backbone_type` ("vit" or "swin") and rename them to AceModel keys."""
    source = detect_backbone(state_dict)
    if source != backbone_type:
        raise ValueError(
            f"The weights are a {source} but the model is a {backbone_type}; use a {source} preset or config "
            f"(e.g. ace-{source}-b)."
        )
    return (
        convert_swin_state_dict(state_dict) if source == "swin" else convert_timm_vit_state_dict(state_dict)
    )


def ace_model_from_timm_state_dict(state_dict: Mapping[str, torch.Tensor], config: AceConfig) -> AceModel:
    """Build an AceModel from encoder weights in timm/DINO (ViT) or Microsoft/timm (Swin) key names."""
    converted = convert_state_dict(state_dict, config.backbone_type)
    model = AceModel(_source_config(config, state_dict))
    load_encoder_weights(model, fit_to_model(converted, model))
    return model


def _source_config(config: AceConfig, state_dict: Mapping[str, torch.Tensor]) -> AceConfig:
    """The config the weights were trained with: a Swin's norms take its source's eps, so outputs match exactly."""
    if config.backbone_type != "swin":
        return config
    eps = ACE_SWIN_LAYER_NORM_EPS if "mask_token" in state_dict else IMAGENET_SWIN_LAYER_NORM_EPS
    if config.layer_norm_eps == config.patch_layer_norm_eps == eps:
        return config
    logger.info(
        f"Setting layer_norm_eps and patch_layer_norm_eps to {eps}, the source Swin's, instead of "
        f"{config.layer_norm_eps} and {config.patch_layer_norm_eps}."
    )
    config = copy.deepcopy(config)
    config.layer_norm_eps = config.patch_layer_norm_eps = eps
    return config


# ----------------------------------------------------------------------------------------------------------------
# Pretraining from timm's ImageNet weights
# ----------------------------------------------------------------------------------------------------------------


def load_timm_state_dict(name_or_path: str) -> dict[str, torch.Tensor]:
    """Encoder weights from a local file or folder (.safetensors/.pth/.bin) or, for a timm model name, from
    `timm.create_model(name, pretrained=True)` (downloads)."""
    path = Path(name_or_path)
    if path.is_dir():
        path = _weights_file_in(path)
    if path.is_file():
        return encoder_state_dict(load_checkpoint(path))
    if path.suffix in WEIGHT_SUFFIXES:
        raise FileNotFoundError(f"--init_from_timm: {name_or_path!r} not found.")
    logger.info(f"Loading timm's pretrained {name_or_path!r} (downloads on first use).")
    return _import_timm().create_model(name_or_path, pretrained=True, num_classes=0).state_dict()


def _weights_file_in(folder: Path) -> Path:
    for name in PREFERRED_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(path for path in folder.iterdir() if path.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        raise FileNotFoundError(
            f"Expected one weights file ({', '.join(WEIGHT_SUFFIXES)}) in {str(folder)!r}, found "
            f"{[path.name for path in found]}."
        )
    return found[0]


def init_from_timm(model: AceForPreTraining, name_or_path: str) -> None:
    """Start the student and teacher encoders from timm's ImageNet weights, as the official recipe does;
    the heads keep their fresh initialization."""
    converted = convert_state_dict(load_timm_state_dict(name_or_path), model.config.backbone_type)
    encoder = model.student.ace
    load_encoder_weights(encoder, fit_to_model(converted, encoder))
    model.reset_teacher()
    logger.info(
        f"Initialized the student and teacher encoders from {name_or_path} ({len(converted)} tensors)."
    )


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as error:
        raise ImportError("This needs timm: pip install timm") from error
    return timm


def _few(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
