"""Convert timm-style ViT weights (the format of the published ACE checkpoints) into an [`AceModel`].

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .configuration_ace import AceConfig
from .modeling_ace import AceModel

# Prefixes that wrap the backbone in DINO/ACE training checkpoints ("teacher.backbone.blocks.0...").
_WRAPPER_PREFIXES = ("module.", "teacher.", "backbone.", "encoder.")

_RENAMES = [
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layer.\1.norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layer.\1.norm2."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.o_proj."),
    (r"^blocks\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.mlp.fc2."),
    (r"^norm\.", "layernorm."),
]


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def convert_timm_vit_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm ViT keys to AceModel keys and split the fused qkv projection; heads are dropped."""
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        key = _strip_wrappers(key)
        fused = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if fused:
            layer, kind = fused.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                converted[f"encoder.layer.{layer}.attention.{name}.{kind}"] = part.clone()
            continue
        for pattern, replacement in _RENAMES:
            if re.match(pattern, key):
                converted[re.sub(pattern, replacement, key)] = tensor
                break
    return converted


def ace_model_from_timm_state_dict(state_dict: Mapping[str, torch.Tensor], config: AceConfig) -> AceModel:
    """Build an AceModel (ViT) from a timm ViT state dict; raise if any encoder weight is missing."""
    if config.backbone_type != "vit":
        raise ValueError(
            "Only ViT checkpoints can be converted from timm; config.backbone_type must be 'vit'."
        )
    model = AceModel(config)
    missing, _ = model.load_state_dict(convert_timm_vit_state_dict(state_dict), strict=False)
    if missing:
        raise ValueError(
            f"The timm state dict lacks these AceModel weights: {missing[:8]}{'...' if len(missing) > 8 else ''}"
        )
    return model
