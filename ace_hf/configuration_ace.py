"""Configuration of ACE encoders and of ACE pretraining.

This file travels to the Hub as remote code: it imports only transformers (and the standard library).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .correspondence_ace import view_geometry_problems
from .presets_ace import ACE_PRESETS, IGNORE_INDEX

# Fields only one backbone reads: a config serializes its own backbone's fields, not the other's defaults.
BACKBONE_ONLY_FIELDS: dict[str, tuple[str, ...]] = {
    "vit": (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "position_embedding_init",
        "position_interpolation",
    ),
    "swin": ("embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "patch_layer_norm_eps"),
}


class AceConfig(PretrainedConfig):
    r"""Configuration of an [`AceModel`] encoder (ViT or Swin) and of its ACE pretraining heads and losses.

    Defaults are ACE ViT-B/32 at 448 px. Use [`AceConfig.from_preset`] for "ace-vit-b", "ace-swin-b" or
    the CPU-sized "ace-vit-tiny".

    Args:
        backbone_type: "vit" (written in this package) or "swin" (transformers' Swin).
        image_size: input side in pixels; must equal `view_tokens * token_stride`.
        patch_size: patch side of the patch embedding (ViT: 32, Swin: 4).
        num_channels: input channels produced by the image processor (3 for ImageNet-style weights).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: ViT width and depth.
        hidden_act, layer_norm_eps, qkv_bias, hidden_dropout_prob, attention_probs_dropout_prob,
            drop_path_rate, initializer_range: usual transformer settings.
        position_embedding_init: ViT position embeddings at initialization: "trunc_normal" (std
            `initializer_range`, as ACE and ViT publish) or "sincos" (2-D sin-cos as in MAE, still trained). At
            std 0.02 they are about 30x smaller than the patch embeddings, so a short run starts, and ends, with
            next to no position in its tokens; sin-cos gives it from the first step (docs/results.md).
        position_interpolation: how ViT position embeddings are resized for another input size: "exact"
            (bicubic to the token grid) or "dino" (bicubic with DINO's scale factor, (grid + 0.1) / trained grid,
            as the official ACE and DINO ViTs do, so converted official weights give their outputs at any size).
        embed_dim, depths, num_heads, window_size, mlp_ratio: Swin settings (stage widths double).
        patch_layer_norm_eps: eps of Swin's patch-embedding and patch-merging LayerNorms, which transformers'
            Swin builds with a fixed 1e-5 (its other norms read `layer_norm_eps`). 1e-5 by default: what configs
            saved before this field were trained with. ACE's Swin (the ace-swin-b preset) uses 1e-6 in every norm.
        view_tokens: n, token grid side of one view (14 at 448 px with stride 32).
        grid_size: cells per side of the jittered image the two views are cut from.
        min_overlap: least fraction of the small view's cells that must lie in the large view.
        dino_hidden_dim, dino_bottleneck_dim, dino_out_dim: DINO head MLP sizes and prototypes.
        student_temperature, teacher_temperature, warmup_teacher_temperature,
            warmup_teacher_temperature_epochs: DINO sharpening temperatures (teacher is warmed up).
        center_momentum: EMA momentum of the DINO center.
        local_temperature: temperature of the matrix-matching logits (logit scale = 1 / it).
        decomposition_alpha, composition_alpha: positive-class weights of the soft BCE losses.
        global_loss_weight, local_loss_weight: weights of the two loss terms in the total.
        student_mask_ratio: share of each student view's token cells blanked (set to the normalized mean
            intensity) in pretraining; the teacher sees the whole views, so the student must infer the blanked
            cells' targets from their context. 0 (ACE as published) disables it.
        teacher_momentum, teacher_momentum_end: cosine schedule of the teacher EMA momentum.
        classifier_pooling: input of `AceForImageClassification`'s head: "mean" (the pooled patch tokens) or
            "cls_mean" (ViT only: CLS token and pooled patch tokens concatenated).
        semantic_loss_ignore_index: label value `AceForSemanticSegmentation`'s loss ignores.
    """

    model_type = "ace"

    def __init__(
        self,
        backbone_type: str = "vit",
        image_size: int = 448,
        patch_size: int = 32,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        qkv_bias: bool = True,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.1,
        initializer_range: float = 0.02,
        position_embedding_init: str = "trunc_normal",
        position_interpolation: str = "exact",
        embed_dim: int = 128,
        depths: list[int] | tuple[int, ...] = (2, 2, 18, 2),
        num_heads: list[int] | tuple[int, ...] = (4, 8, 16, 32),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        patch_layer_norm_eps: float = 1e-5,
        view_tokens: int = 14,
        grid_size: int = 32,
        min_overlap: float = 0.5,
        dino_hidden_dim: int = 2048,
        dino_bottleneck_dim: int = 256,
        dino_out_dim: int = 65536,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        warmup_teacher_temperature: float = 0.04,
        warmup_teacher_temperature_epochs: int = 0,
        center_momentum: float = 0.9,
        local_temperature: float = 0.07,
        decomposition_alpha: float = 0.99,
        composition_alpha: float = 0.9,
        global_loss_weight: float = 0.1,
        local_loss_weight: float = 1.0,
        student_mask_ratio: float = 0.0,
        teacher_momentum: float = 0.996,
        teacher_momentum_end: float = 1.0,
        classifier_pooling: str = "mean",
        semantic_loss_ignore_index: int = IGNORE_INDEX,
        **kwargs: Any,
    ) -> None:
        self.backbone_type = backbone_type
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.initializer_range = initializer_range
        self.position_embedding_init = position_embedding_init
        self.position_interpolation = position_interpolation
        self.embed_dim = embed_dim
        self.depths = list(depths)
        self.num_heads = list(num_heads)
        self.window_size = window_size
        self.mlp_ratio = mlp_ratio
        self.patch_layer_norm_eps = patch_layer_norm_eps
        self.view_tokens = view_tokens
        self.grid_size = grid_size
        self.min_overlap = min_overlap
        self.dino_hidden_dim = dino_hidden_dim
        self.dino_bottleneck_dim = dino_bottleneck_dim
        self.dino_out_dim = dino_out_dim
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.warmup_teacher_temperature_epochs = warmup_teacher_temperature_epochs
        self.center_momentum = center_momentum
        self.local_temperature = local_temperature
        self.decomposition_alpha = decomposition_alpha
        self.composition_alpha = composition_alpha
        self.global_loss_weight = global_loss_weight
        self.local_loss_weight = local_loss_weight
        self.student_mask_ratio = student_mask_ratio
        self.teacher_momentum = teacher_momentum
        self.teacher_momentum_end = teacher_momentum_end
        self.classifier_pooling = classifier_pooling
        self.semantic_loss_ignore_index = semantic_loss_ignore_index
        super().__init__(**kwargs)
        self.validate_ace()

    @property
    def token_stride(self) -> int:
        """Pixels per output token side: the patch size for ViT, patch size x 2^(stages-1) for Swin."""
        if self.backbone_type == "swin":
            return self.patch_size * 2 ** (len(self.depths) - 1)
        return self.patch_size

    @property
    def feature_dim(self) -> int:
        """Channels of the final token map (C): ViT width, or the last Swin stage's width."""
        if self.backbone_type == "swin":
            return self.embed_dim * 2 ** (len(self.depths) - 1)
        return self.hidden_size

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> AceConfig:
        """Build a named preset ("ace-vit-b", "ace-swin-b", "ace-vit-tiny"), optionally overriding fields."""
        if name not in ACE_PRESETS:
            raise ValueError(f"Unknown ACE preset {name!r}; choose one of {sorted(ACE_PRESETS)}.")
        return cls(**{**ACE_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Serialize without the other backbone's fields, so a ViT's config.json shows no Swin depths (and a
        Swin's no ViT width) that the model never reads. `to_diff_dict` (config.json) builds on this; configs
        saved with every field still load, the extra fields being ignored by the model."""
        output = super().to_dict()
        for backbone, fields in BACKBONE_ONLY_FIELDS.items():
            if backbone != self.backbone_type:
                for field in fields:
                    output.pop(field, None)
        return output

    def validate_ace(self) -> None:
        """Raise a ValueError naming the field when the configuration cannot build a working model."""

        def fail(field: str, why: str) -> None:
            raise ValueError(f"AceConfig.{field}={getattr(self, field)!r}: {why}")

        if self.backbone_type not in ("vit", "swin"):
            fail("backbone_type", 'must be "vit" or "swin"')
        for field in ("image_size", "patch_size", "num_channels", "view_tokens", "grid_size"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                fail(field, "must be a positive integer")
        if self.classifier_pooling not in ("mean", "cls_mean"):
            fail("classifier_pooling", 'must be "mean" or "cls_mean"')
        if self.classifier_pooling == "cls_mean" and self.backbone_type != "vit":
            fail("classifier_pooling", '"cls_mean" needs backbone_type="vit" (Swin has no CLS token)')
        if self.image_size % self.patch_size:
            fail("image_size", f"must be a multiple of patch_size={self.patch_size}")
        if self.backbone_type == "vit":
            if self.hidden_size % self.num_attention_heads:
                fail("num_attention_heads", f"must divide hidden_size={self.hidden_size}")
            if self.position_embedding_init not in ("trunc_normal", "sincos"):
                fail("position_embedding_init", 'must be "trunc_normal" or "sincos"')
            if self.position_embedding_init == "sincos" and self.hidden_size % 4:
                fail(
                    "position_embedding_init",
                    f'"sincos" needs hidden_size divisible by 4, got {self.hidden_size}',
                )
            if self.position_interpolation not in ("exact", "dino"):
                fail("position_interpolation", 'must be "exact" or "dino"')
        else:
            if len(self.num_heads) != len(self.depths):
                fail("num_heads", f"needs one entry per stage of depths={self.depths}")
            for stage, heads in enumerate(self.num_heads):
                if (self.embed_dim * 2**stage) % heads:
                    fail(
                        "num_heads",
                        f"stage {stage} width {self.embed_dim * 2**stage} is not divisible by {heads}",
                    )
            if self.image_size % self.token_stride:
                fail("image_size", f"must be a multiple of the Swin token stride {self.token_stride}")
            side = self.image_size // self.patch_size
            for stage in range(len(self.depths)):
                if (side >> stage) % self.window_size:
                    fail("window_size", f"must divide the stage-{stage} grid side {side >> stage}")
        for field, why in view_geometry_problems(self.grid_size, self.view_tokens, self.min_overlap):
            fail(field, why)
        if self.view_tokens * self.token_stride != self.image_size:
            fail(
                "image_size",
                f"must equal view_tokens * token_stride = {self.view_tokens} * {self.token_stride}"
                " (one small-view token is one grid cell)",
            )
        for field in (
            "student_temperature",
            "teacher_temperature",
            "warmup_teacher_temperature",
            "local_temperature",
        ):
            if getattr(self, field) <= 0:
                fail(field, "must be positive")
        for field in ("center_momentum", "decomposition_alpha", "composition_alpha"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                fail(field, "must be in [0, 1]")
        if not 0.0 <= self.student_mask_ratio < 1.0:
            fail("student_mask_ratio", "must be in [0, 1): the student needs some visible cells")
        if not 0.0 <= self.teacher_momentum <= self.teacher_momentum_end <= 1.0:
            fail(
                "teacher_momentum",
                f"needs 0 <= teacher_momentum <= teacher_momentum_end={self.teacher_momentum_end} <= 1",
            )


AceConfig.register_for_auto_class()

__all__ = ["BACKBONE_ONLY_FIELDS", "AceConfig"]
