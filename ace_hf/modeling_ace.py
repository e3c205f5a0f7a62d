"""ACE encoders (ViT written here in the style of transformers' Dinov2, or transformers' Swin) and ACE pretraining.

This file travels to the Hub as remote code: it imports only torch, transformers and, with single-dot
relative imports, the other ACE files that travel with it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, SwinConfig, SwinModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    SemanticSegmenterOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_ace import AceConfig
from .correspondence_ace import correspondence_targets
from .losses_ace import DinoLoss, MatrixMatchingLoss

logger = logging.get_logger(__name__)


@dataclass
class AceModelOutput(BaseModelOutputWithPooling):
    r"""
    Output of [`AceModel`].

    last_hidden_state: final normed tokens, [B, 1 + h*w, C] for ViT (CLS first, like ViTModel) and [B, h*w, C]
        for Swin.
    pooler_output: mean of the patch tokens, [B, C]: the global embedding (ACE's global loss pools patch tokens).
        The official ACE ViT's `forward` returns the CLS token instead: `last_hidden_state[:, 0]`.
    patch_embeddings: the patch tokens as a map, [B, C, h, w]: the dense (per-patch) embeddings.
    """

    patch_embeddings: torch.FloatTensor | None = None


@dataclass
class AcePreTrainingOutput(ModelOutput):
    """Output of [`AceForPreTraining`]: the total loss, its components, and the local branch's matching
    accuracies (share of matched rows whose most similar column is the target's peak; all scalars)."""

    loss: torch.FloatTensor | None = None
    global_loss: torch.FloatTensor | None = None
    local_loss: torch.FloatTensor | None = None
    decomposition_loss: torch.FloatTensor | None = None
    composition_loss: torch.FloatTensor | None = None
    decomposition_accuracy: torch.FloatTensor | None = None
    composition_accuracy: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# ViT encoder
# ----------------------------------------------------------------------------------------------------------------


class AcePatchEmbeddings(nn.Module):
    """Cut the image into non-overlapping patches and project each to the model width."""

    def __init__(self, config: AceConfig) -> None:
        super().__init__()
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the model expects "
                f"config.num_channels={self.num_channels}."
            )
        pixel_values = pixel_values.to(self.projection.weight.dtype)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


def sincos_position_embeddings(side: int, dim: int) -> torch.Tensor:
    """[1, 1 + side*side, dim] 2-D sin-cos position embeddings of a square grid, laid out as MAE's
    (`[sin(row) | cos(row) | sin(col) | cos(col)]`, frequencies 1 / 10000^(k / (dim / 4))), with a zero row for
    the CLS token. Written here because transformers' own helper is private to ViT-MAE and renamed across 5.x."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    positions = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")
    row_angles, col_angles = (coordinate.flatten().outer(omega) for coordinate in (rows, cols))
    grid = torch.cat([row_angles.sin(), row_angles.cos(), col_angles.sin(), col_angles.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), grid]).unsqueeze(0).float()


class AceEmbeddings(nn.Module):
    """CLS token plus patch embeddings plus position embeddings, interpolated to any (also non-square) grid."""

    def __init__(self, config: AceConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.position_interpolation = config.position_interpolation
        self.grid_side = config.image_size // config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = AcePatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.grid_side**2 + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for a `height x width` token grid (bicubic in float32, no antialias for ONNX).

        "dino" samples with DINO's scale factor (grid + 0.1) / trained grid instead of the exact grid ratio: the
        official ACE ViT's interpolation, which its weights were evaluated with at other sizes."""
        if height == width == self.grid_side and not torch.jit.is_tracing():
            return self.position_embeddings
        class_pos_embed = self.position_embeddings[:, :1]
        patch_pos_embed = self.position_embeddings[:, 1:]
        dim = patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.reshape(1, self.grid_side, self.grid_side, dim).permute(0, 3, 1, 2)
        if self.position_interpolation == "dino":
            scale = ((height + 0.1) / self.grid_side, (width + 0.1) / self.grid_side)
            resize: dict = {"scale_factor": scale}
        else:
            resize = {"size": (height, width)}
        patch_pos_embed = F.interpolate(
            patch_pos_embed.float(), mode="bicubic", align_corners=False, **resize
        ).to(class_pos_embed.dtype)
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, height * width, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        embeddings = self.patch_embeddings(pixel_values)
        cls_tokens = self.cls_token.expand(embeddings.shape[0], -1, -1)
        embeddings = torch.cat((cls_tokens, embeddings), dim=1)
        embeddings = embeddings + self.interpolate_pos_encoding(height, width)
        return self.dropout(embeddings)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; the reference the SDPA/flash back-ends must match."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class AceAttention(nn.Module):
    """Multi-head self-attention dispatched through transformers' attention interface (SDPA by default)."""

    def __init__(self, config: AceConfig) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1)), attn_weights


class AceMLP(nn.Module):
    def __init__(self, config: AceConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.activation(self.fc1(hidden_states)))))


class AceDropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample during training."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        mask = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * mask / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class AceLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block (timm's `Block`)."""

    def __init__(self, config: AceConfig, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = AceAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = AceMLP(config)
        self.drop_path = AceDropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_output, attn_weights = self.attention(self.norm1(hidden_states), **kwargs)
        hidden_states = hidden_states + self.drop_path(attn_output)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states, attn_weights


class AceEncoder(nn.Module):
    def __init__(self, config: AceConfig) -> None:
        super().__init__()
        rates = [
            config.drop_path_rate * i / max(config.num_hidden_layers - 1, 1)
            for i in range(config.num_hidden_layers)
        ]
        self.layer = nn.ModuleList([AceLayer(config, rate) for rate in rates])

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layer:
            hidden_states, attn_weights = layer(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        return hidden_states, all_hidden_states, all_attentions


def _swin_config(config: AceConfig) -> SwinConfig:
    """The transformers SwinConfig equivalent to an ACE Swin config."""
    return SwinConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        embed_dim=config.embed_dim,
        depths=config.depths,
        num_heads=config.num_heads,
        window_size=config.window_size,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        drop_path_rate=config.drop_path_rate,
        layer_norm_eps=config.layer_norm_eps,
        initializer_range=config.initializer_range,
    )


def _set_patch_layer_norm_eps(swin: SwinModel, eps: float) -> None:
    """transformers' Swin builds its patch-embedding and patch-merging LayerNorms with a fixed eps 1e-5, not
    `layer_norm_eps`; ACE's Swin uses 1e-6 in every norm, so the config's `patch_layer_norm_eps` sets them."""
    merging_norms = [stage.downsample.norm for stage in swin.encoder.layers if stage.downsample is not None]
    for norm in [swin.embeddings.norm, *merging_norms]:
        norm.eps = eps


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


# from_pretrained arguments that also locate the config (not `trust_remote_code`: a config class, unlike
# AutoConfig, warns that it "has no effect here").
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


class AcePreTrainedModel(PreTrainedModel):
    config_class = AceConfig
    config: AceConfig
    base_model_prefix = "ace"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["AceEmbeddings", "AceLayer", "SwinStage"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load as usual; an ACE checkpoint of the other kind is converted instead of loading random weights:
        a pretraining checkpoint loaded as `AceModel` gives its teacher encoder (what ACE publishes), and an
        encoder loaded as `AceForPreTraining` starts pretraining from it (see `from_encoder`)."""
        config = kwargs.get("config")
        # Any config object, not only this module's AceConfig: as remote code, AutoModel passes the AceConfig
        # of another copy of configuration_ace.py (transformers imports each auto class's files separately).
        if not isinstance(config, PretrainedConfig):
            config_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
            config = AceConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
        saved_as = (config.architectures or [cls.__name__])[0]
        if cls.__name__ == "AceModel" and saved_as == "AceForPreTraining":
            kwargs.setdefault("key_mapping", {r"^teacher\.ace\.": ""})
        elif cls.__name__ == "AceForPreTraining" and saved_as == "AceModel":
            logger.warning(
                f"{pretrained_model_name_or_path} is an encoder: its pretraining heads start fresh here. "
                "ace_hf.hub.pretraining_model_from_export also loads an export's pretraining_heads.safetensors."
            )
            return cls.from_encoder(
                AceModel.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
            )
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal linear/conv weights (ViT/DINO recipe), zero biases, unit norms."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(
                module, nn.BatchNorm2d
            ):  # buffers too: from_pretrained allocates them uninitialized
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, AceEmbeddings):
            if self.config.position_embedding_init == "sincos":
                init.copy_(
                    module.position_embeddings,
                    sincos_position_embeddings(module.grid_side, module.position_embeddings.shape[-1]),
                )
            else:
                init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, AceNormalizedLinear):
            init.trunc_normal_(module.weight, mean=0.0, std=self.config.initializer_range)


class AceModel(AcePreTrainedModel):
    """ACE encoder: global embedding (`pooler_output`, mean of patch tokens) and dense embeddings
    (`patch_embeddings`, [B, C, h, w]) for any input size."""

    def __init__(self, config: AceConfig) -> None:
        super().__init__(config)
        if config.backbone_type == "swin":
            self.swin = SwinModel(_swin_config(config), add_pooling_layer=False)
            _set_patch_layer_norm_eps(self.swin, config.patch_layer_norm_eps)
        else:
            self.embeddings = AceEmbeddings(config)
            self.encoder = AceEncoder(config)
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        if self.config.backbone_type == "swin":
            return self.swin.get_input_embeddings()
        return self.embeddings.patch_embeddings

    def _restore_swin_windows(self) -> None:
        """transformers' SwinLayer shrinks its window and drops its shift in place when an input's stage grid is
        not larger than the window; reset them so that one small input does not change every later call."""
        for stage in self.swin.encoder.layers:
            for index, block in enumerate(stage.blocks):
                block.window_size = self.config.window_size
                block.shift_size = 0 if index % 2 == 0 else self.config.window_size // 2

    def _check_pixel_values(self, pixel_values: torch.Tensor | None) -> torch.Tensor:
        if pixel_values is None:
            raise ValueError("AceModel needs pixel_values of shape [batch, channels, height, width].")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be 4-D [batch, channels, height, width], got {tuple(pixel_values.shape)}"
            )
        stride = self.config.token_stride
        if pixel_values.shape[-2] % stride or pixel_values.shape[-1] % stride:
            raise ValueError(
                f"pixel_values height and width {tuple(pixel_values.shape[-2:])} must be multiples of the token "
                f"stride {stride}; resize with AceImageProcessor."
            )
        if (
            self.config.backbone_type == "swin"
            and min(pixel_values.shape[-2:]) < self.config.window_size * stride
        ):
            raise ValueError(
                f"pixel_values height and width {tuple(pixel_values.shape[-2:])} must be at least window_size * "
                f"token stride = {self.config.window_size * stride} for Swin (its last stage needs one full window)."
            )
        return pixel_values.to(self.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AceModelOutput | tuple:
        pixel_values = self._check_pixel_values(pixel_values)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = (
            output_attentions if output_attentions is not None else self.config.output_attentions
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        height, width = (side // self.config.token_stride for side in pixel_values.shape[-2:])

        if self.config.backbone_type == "swin":
            self._restore_swin_windows()
            swin_output = self.swin(
                pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions
            )
            sequence_output = swin_output.last_hidden_state
            patch_tokens = sequence_output
            hidden_states, attentions = swin_output.hidden_states, swin_output.attentions
        else:
            embeddings = self.embeddings(pixel_values)
            hidden, hidden_states, attentions = self.encoder(
                embeddings, output_hidden_states, output_attentions
            )
            sequence_output = self.layernorm(hidden)
            patch_tokens = sequence_output[:, 1:]

        patch_map = patch_tokens.transpose(1, 2).reshape(patch_tokens.shape[0], -1, height, width)
        output = AceModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=patch_tokens.mean(dim=1),
            hidden_states=hidden_states,
            attentions=attentions,
            patch_embeddings=patch_map,
        )
        return output if return_dict else output.to_tuple()


# ----------------------------------------------------------------------------------------------------------------
# Pretraining heads
# ----------------------------------------------------------------------------------------------------------------


class AceNormalizedLinear(nn.Module):
    """Bias-free linear layer whose weight rows are unit-norm: DINO's weight-normalized last layer with its
    norm fixed to 1, written without a frozen gain so DDP and EMA need no special cases."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, F.normalize(self.weight, dim=-1))


class AceGlobalHead(nn.Module):
    """DINO head: MLP C -> hidden -> hidden -> bottleneck (GELU), L2-normalize, unit-norm prototypes."""

    def __init__(self, config: AceConfig) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(config.feature_dim, config.dino_hidden_dim),
            nn.GELU(),
            nn.Linear(config.dino_hidden_dim, config.dino_hidden_dim),
            nn.GELU(),
            nn.Linear(config.dino_hidden_dim, config.dino_bottleneck_dim),
        )
        self.last_layer = AceNormalizedLinear(config.dino_bottleneck_dim, config.dino_out_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(pooled), dim=-1))


class AceDenseHead(nn.Module):
    """Three (1x1 conv, BatchNorm, ReLU) on the token map, then each token L2-normalized: [B, h*w, C]."""

    def __init__(self, config: AceConfig) -> None:
        super().__init__()
        channels = config.feature_dim
        layers: list[nn.Module] = []
        for _ in range(3):
            layers += [
                nn.Conv2d(channels, channels, kernel_size=1),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        self.layers = nn.Sequential(*layers)

    def forward(self, patch_map: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(patch_map).flatten(2).transpose(1, 2), dim=-1)


class AceUpsampler(nn.Module):
    """Decompose each token into its 2 x 2 sub-tokens: [B, n*n, C] -> [B, 2n*2n, C] (row-major sub-token grid)."""

    def __init__(self, config: AceConfig) -> None:
        super().__init__()
        channels = config.feature_dim
        self.mlp = nn.Sequential(
            nn.Linear(channels, 4 * channels, bias=False),
            nn.LayerNorm(4 * channels),
            nn.ReLU(inplace=True),
            nn.Linear(4 * channels, 4 * channels),
        )

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        batch, _, channels = tokens.shape
        expanded = self.mlp(tokens).view(batch, side, side, 2, 2, channels)  # (row, col, sub-row, sub-col)
        return expanded.permute(0, 1, 3, 2, 4, 5).reshape(batch, 4 * side * side, channels)


class AceDownsampler(nn.Module):
    """Compose each 2 x 2 block of tokens into one: [B, n*n, C] -> [B, (n/2)*(n/2), C]."""

    def __init__(self, config: AceConfig) -> None:
        super().__init__()
        channels = config.feature_dim
        self.mlp = nn.Sequential(
            nn.Linear(4 * channels, channels, bias=False),
            nn.LayerNorm(channels),
            nn.ReLU(inplace=True),
            nn.Linear(channels, channels),
        )

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        batch, _, channels = tokens.shape
        blocks = tokens.view(batch, side // 2, 2, side // 2, 2, channels).permute(0, 1, 3, 2, 4, 5)
        return self.mlp(blocks.reshape(batch, (side // 2) ** 2, 4 * channels))


def blank_random_cells(pixels: torch.Tensor, ratio: float, stride: int) -> torch.Tensor:
    """`pixels` with round(ratio * tokens) random `stride x stride` token cells per image set to 0 (the normalized
    mean intensity), a different draw per image; at least one cell stays visible."""
    batch, _, height, width = pixels.shape
    rows, cols = height // stride, width // stride
    count = min(round(ratio * rows * cols), rows * cols - 1)
    rank = torch.rand(batch, rows * cols, device=pixels.device).argsort(1).argsort(1)
    keep = (rank >= count).view(batch, 1, rows, cols)
    keep = keep.repeat_interleave(stride, 2).repeat_interleave(stride, 3)
    return pixels * keep.to(pixels.dtype)


class AceBranch(nn.Module):
    """Encoder + global head + dense head: the part the teacher mirrors from the student."""

    def __init__(self, config: AceConfig, encoder: AceModel) -> None:
        super().__init__()
        self.ace = encoder
        self.global_head = AceGlobalHead(config)
        self.dense_head = AceDenseHead(config)

    def forward(self, pixel_values: torch.Tensor, overlap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global prototype scores of the overlap-pooled tokens [B, K] and normalized dense tokens [B, h*w, C]."""
        patch_map = self.ace(pixel_values).patch_embeddings
        tokens = patch_map.flatten(2).transpose(1, 2)
        weights = overlap.to(tokens.dtype).unsqueeze(-1)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.global_head(pooled), self.dense_head(patch_map)


class AceForPreTraining(AcePreTrainedModel):
    """ACE pretraining: student (encoder, global and dense heads, up- and down-sampler) and its EMA teacher.

    `forward(pixel_values_large, pixel_values_small, view_origins)` returns the total loss and its parts. Call
    `update_teacher(momentum)` after each optimizer step; publish `export_teacher()` (an [`AceModel`]).
    """

    def __init__(self, config: AceConfig) -> None:
        super().__init__(config)
        self.student = AceBranch(config, AceModel(config))
        self.upsampler = AceUpsampler(config)
        self.downsampler = AceDownsampler(config)
        # The teacher is deterministic (no drop path, no dropout), as in DINO: its outputs are the targets.
        teacher_config = copy.deepcopy(config)
        teacher_config.drop_path_rate = teacher_config.hidden_dropout_prob = 0.0
        teacher_config.attention_probs_dropout_prob = 0.0
        self.teacher = AceBranch(teacher_config, AceModel(teacher_config))
        self.teacher.requires_grad_(False)
        self.dino_loss = DinoLoss(config.dino_out_dim, config.student_temperature, config.center_momentum)
        self.decomposition_loss = MatrixMatchingLoss(config.local_temperature, config.decomposition_alpha)
        self.composition_loss = MatrixMatchingLoss(config.local_temperature, config.composition_alpha)
        self.post_init()
        self.reset_teacher()

    @property
    def ace(self) -> AceModel:
        """The student encoder (what `base_model_prefix` points at)."""
        return self.student.ace

    @classmethod
    def from_encoder(
        cls, encoder: AceModel, heads: Mapping[str, torch.Tensor] | None = None
    ) -> AceForPreTraining:
        """Continue pretraining from a published encoder: student and teacher both start from its weights, and
        from `heads` (a `pretraining_heads_state_dict()`, as saved in pretraining_heads.safetensors) when given;
        without them the heads start from scratch and the first epochs re-learn them."""
        model = cls(encoder.config)
        model.student.ace.load_state_dict(encoder.state_dict())
        model.reset_teacher()
        if heads is not None:
            model.load_pretraining_heads(heads)
        return model

    def _pretraining_heads(self) -> dict[str, nn.Module]:
        """The modules saved with an export as its pretraining heads, by key prefix: the teacher's where both
        branches have one (see `pretraining_heads_state_dict`)."""
        return {
            "global_head": self.teacher.global_head,
            "dense_head": self.teacher.dense_head,
            "upsampler": self.upsampler,
            "downsampler": self.downsampler,
        }

    def pretraining_heads_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything beyond the encoder that continued pretraining needs, as float32 CPU tensors.

        - The teacher's global (DINO) and dense heads: the export is the teacher encoder, and these heads are
          averaged (EMA) over the same steps, so they match it; the student's heads match the student encoder,
          which is not published. Both branches restart from them, as both restart from the exported encoder.
        - The up- and down-samplers: they exist once, on the student side.
        - The DINO center (`dino_center`): the running mean of the teacher head's outputs. Restarting it at
          zero leaves the teacher's targets uncentered until the EMA catches up.
        Optimizer state and schedules are not included: they belong to a training checkpoint, not an export.
        """
        state = {
            f"{prefix}.{key}": value
            for prefix, module in self._pretraining_heads().items()
            for key, value in module.state_dict().items()
        }
        state["dino_center"] = self.dino_loss.center
        return {
            key: (value.float() if value.is_floating_point() else value).detach().cpu().contiguous()
            for key, value in state.items()
        }

    @torch.no_grad()
    def load_pretraining_heads(self, heads: Mapping[str, torch.Tensor]) -> None:
        """Load a `pretraining_heads_state_dict()` into the teacher and the student alike.

        Raises:
            ValueError: tensors are missing, unexpected or of another shape (the heads were trained with other
                `dino_*` sizes or another backbone width); nothing is loaded then.
        """
        expected = {key: tuple(value.shape) for key, value in self.pretraining_heads_state_dict().items()}
        problems = [f"missing {key}" for key in expected if key not in heads]
        problems += [f"unexpected {key}" for key in heads if key not in expected]
        problems += [
            f"{key} has shape {tuple(heads[key].shape)}, the model {shape}"
            for key, shape in expected.items()
            if key in heads and tuple(heads[key].shape) != shape
        ]
        if problems:
            raise ValueError(f"The pretraining heads do not fit this configuration: {'; '.join(problems)}.")
        for prefix, module in self._pretraining_heads().items():
            start = f"{prefix}."
            module.load_state_dict(
                {key[len(start) :]: value for key, value in heads.items() if key.startswith(start)}
            )
        self.student.global_head.load_state_dict(self.teacher.global_head.state_dict())
        self.student.dense_head.load_state_dict(self.teacher.dense_head.state_dict())
        self.dino_loss.center.copy_(heads["dino_center"])

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Make the teacher an exact copy of the student (encoder, global head, dense head)."""
        self.teacher.load_state_dict(self.student.state_dict())

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step: teacher = momentum * teacher + (1 - momentum) * student, parameters only.

        Keep the weights in float32 (Accelerate's mixed precision does): in bf16 a (1 - 0.996) update rounds away.
        """
        teacher_params = list(self.teacher.parameters())
        student_params = [param.detach().to(teacher_params[0].dtype) for param in self.student.parameters()]
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)

    def export_teacher(self) -> AceModel:
        """The teacher encoder as a stand-alone [`AceModel`] (ACE evaluates and publishes the teacher)."""
        encoder = AceModel(self.config)
        encoder.load_state_dict(self.teacher.ace.state_dict())
        return encoder.to(next(self.teacher.parameters()).device)

    def forward(
        self,
        pixel_values_large: torch.Tensor,
        pixel_values_small: torch.Tensor,
        view_origins: torch.Tensor,
        teacher_temperature: float | torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AcePreTrainingOutput | tuple:
        config = self.config
        side = config.view_tokens
        expected = (config.num_channels, config.image_size, config.image_size)
        for name, pixels in (
            ("pixel_values_large", pixel_values_large),
            ("pixel_values_small", pixel_values_small),
        ):
            if tuple(pixels.shape[1:]) != expected:
                raise ValueError(
                    f"{name} must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}], got {tuple(pixels.shape)}"
                )
        if not pixel_values_large.shape[0] == pixel_values_small.shape[0] == view_origins.shape[0]:
            raise ValueError(
                f"pixel_values_large, pixel_values_small and view_origins must have the same batch size, got "
                f"{pixel_values_large.shape[0]}, {pixel_values_small.shape[0]} and {view_origins.shape[0]}"
            )
        teacher_temperature = (
            teacher_temperature if teacher_temperature is not None else config.teacher_temperature
        )
        targets = correspondence_targets(view_origins.to(pixel_values_large.device), side)

        # Both views go through each branch as one batch: [large; small].
        pixels = torch.cat([pixel_values_large, pixel_values_small])
        overlap = torch.cat([targets.overlap_large, targets.overlap_small])
        student_pixels = pixels
        if self.training and config.student_mask_ratio > 0:
            student_pixels = blank_random_cells(pixels, config.student_mask_ratio, config.token_stride)
        student_global, student_dense = self.student(student_pixels, overlap)
        with torch.no_grad():
            teacher_global, teacher_dense = self.teacher(pixels, overlap)
        student_global_large, student_global_small = student_global.chunk(2)
        teacher_global_large, teacher_global_small = teacher_global.chunk(2)
        student_dense_large, student_dense_small = student_dense.chunk(2)
        teacher_dense_large, teacher_dense_small = teacher_dense.chunk(2)

        global_loss = self.dino_loss(
            student_global_large,
            student_global_small,
            teacher_global_large,
            teacher_global_small,
            teacher_temperature,
        )
        decomposition = self.decomposition_loss(
            teacher_dense_small, self.upsampler(student_dense_large, side), targets.decomposition
        )
        composition = self.composition_loss(
            teacher_dense_large, self.downsampler(student_dense_small, side), targets.composition
        )
        local_loss = (decomposition.loss + composition.loss) / 2
        loss = config.global_loss_weight * global_loss + config.local_loss_weight * local_loss
        if self.training:
            self.dino_loss.update_center(teacher_global)

        output = AcePreTrainingOutput(
            loss=loss,
            global_loss=global_loss.detach(),
            local_loss=local_loss.detach(),
            decomposition_loss=decomposition.loss.detach(),
            composition_loss=composition.loss.detach(),
            decomposition_accuracy=decomposition.hit_rate,
            composition_accuracy=composition.hit_rate,
        )
        return_dict = return_dict if return_dict is not None else config.return_dict
        return output if return_dict else output.to_tuple()


# ----------------------------------------------------------------------------------------------------------------
# Task heads
# ----------------------------------------------------------------------------------------------------------------


class AceForImageClassification(AcePreTrainedModel):
    """ACE encoder with a linear head on the global embedding (`pooler_output`; with
    `config.classifier_pooling="cls_mean"`, a ViT's CLS token concatenated to it, as DINOv2's linear probes do).

    `config.problem_type` picks the loss as in transformers: "single_label_classification" (cross-entropy),
    "multi_label_classification" (BCE on float 0/1 labels) or "regression" (MSE); inferred from the labels
    when unset.
    """

    def __init__(self, config: AceConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.ace = AceModel(config)
        use_cls = config.classifier_pooling == "cls_mean"
        self.classifier = nn.Linear(config.feature_dim * (2 if use_cls else 1), config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        outputs = self.ace(
            pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        features = outputs.pooler_output
        if self.config.classifier_pooling == "cls_mean":
            features = torch.cat([outputs.last_hidden_state[:, 0], features], dim=-1)
        logits = self.classifier(features)
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


class AceForSemanticSegmentation(AcePreTrainedModel):
    """ACE encoder with a light segmentation head: BatchNorm and a 1 x 1 convolution on the dense embeddings
    (`patch_embeddings`), i.e. a linear classifier per patch as in DINOv2's linear segmentation probes.

    `logits` are upsampled (bilinear) to the input size, [B, num_labels, H, W]; label pixels equal to
    `config.semantic_loss_ignore_index` do not count in the loss.
    """

    def __init__(self, config: AceConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.ace = AceModel(config)
        self.classifier = nn.Sequential(
            nn.BatchNorm2d(config.feature_dim),
            nn.Conv2d(config.feature_dim, config.num_labels, kernel_size=1),
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        outputs = self.ace(
            pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        logits = self.classifier(outputs.patch_embeddings)
        logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, ignore_index=self.config.semantic_loss_ignore_index)
        output = SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


AceModel.register_for_auto_class("AutoModel")
AceForImageClassification.register_for_auto_class("AutoModelForImageClassification")
AceForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__all__ = [
    "AceForImageClassification",
    "AceForPreTraining",
    "AceForSemanticSegmentation",
    "AceModel",
    "AceModelOutput",
    "AcePreTrainedModel",
    "AcePreTrainingOutput",
]
