"""A non-learned baseline for every column of the suite: what the pixels alone score, so that an encoder is
measured against a floor that is not another network.

`PixelEncoder` stands in for `AceModel` wherever the suite calls `encode`, so every metric runs the same code on
the same crops, pairs and draws: it takes the model's normalized `pixel_values` and returns

- `patch_embeddings` [B, C, h, w] at the model's token stride: each token described by its own pixels (pooled to
  4 x 4) and the mean pixel of each token of the (2r+1) x (2r+1) neighbourhood around it, centred and
  L2-normalized (a cosine between two of them is a correlation, blind to exposure). Radius 4 matched fine
  anatomy across held-out radiographs at 0.407 where trained tiny encoders reached 0.2 to 0.3 (evidence notes):
  the task rewards anatomical context, which this descriptor has by construction. Matching, view
  correspondence and the linear segmentation head see it (a head on a token's pooled pixels alone scored
  mIoU 0.12 / 0.11 at k = 1 / 5, near chance: a token's own intensity does not say which organ it is);
- `pooler_output` [B, C]: the image pooled to 16 x 16, the findings probe's input (docs/results.md, "Pixel
  baseline of the findings task").

The narrower of the two is zero-padded to C = 256, so that one `config` sizes every task head: it is the model's
config reshaped into a one-layer ViT of the same token grid whose width is C (zero channels change neither a
cosine nor a linear head). It has no weights: the suite does not fine-tune it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..configuration_ace import AceConfig
from ..image_processing_ace import AceImageProcessor
from ..modeling_ace import AceModelOutput
from .arguments import CONTEXT_RADIUS

OWN_PIXELS_SIDE = 4  # a token's own pixels in the descriptor: pooled to 4 x 4
POOLED_SIDE = 16  # the global embedding: the image pooled to 16 x 16
WIDTH = POOLED_SIDE**2  # channels of both embeddings (the descriptor is zero-padded to it)


def pooled_tokens(images: torch.Tensor, stride: int, side: int) -> torch.Tensor:
    """[N, 1, H, W] -> [N, side * side, h, w]: each stride x stride token's pixels average-pooled to
    side x side, channel `row * side + col` (a token of fewer pixels than side x side repeats them)."""
    h, w = images.shape[-2] // stride, images.shape[-1] // stride
    pooled = F.adaptive_avg_pool2d(images[..., : h * stride, : w * stride], (h * side, w * side))
    return F.pixel_unshuffle(pooled, side)


def context_descriptor(images: torch.Tensor, stride: int, radius: int = CONTEXT_RADIUS) -> torch.Tensor:
    """[N, 1, H, W] -> [N, 16 + (2r+1)^2, h, w]: per token its own pixels pooled to 4 x 4, then the mean pixel of
    every token (dr, dc) with |dr|, |dc| <= r in row-major order (the border tokens repeated outside the
    image), minus the descriptor's own mean, L2-normalized."""
    own = pooled_tokens(images, stride, OWN_PIXELS_SIDE)
    means = F.avg_pool2d(images[..., : own.shape[-2] * stride, : own.shape[-1] * stride], stride)
    side = 2 * radius + 1
    padded = F.pad(means, (radius,) * 4, mode="replicate") if radius else means
    context = F.unfold(padded, side).reshape(len(images), side * side, *means.shape[-2:])
    features = torch.cat([own, context], dim=1)
    return F.normalize(features - features.mean(dim=1, keepdim=True), dim=1)


def feature_config(config: AceConfig, width: int) -> AceConfig:
    """The model's config as a one-layer ViT of the same token grid, views and channels whose width is `width`:
    what `AceForSemanticSegmentation` / `AceForImageClassification` read to size a head for these features."""
    features = copy.deepcopy(config)
    stride = config.token_stride
    for name, value in {
        "backbone_type": "vit",
        "patch_size": stride,
        "hidden_size": width,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "intermediate_size": width,
        "position_embedding_init": "trunc_normal",
        "classifier_pooling": "mean",
    }.items():
        setattr(features, name, value)
    features.validate_ace()
    return features


class PixelEncoder(torch.nn.Module):
    """Pixel features with AceModel's interface (see the module docstring)."""

    def __init__(self, config: AceConfig, context_radius: int = CONTEXT_RADIUS) -> None:
        super().__init__()
        if OWN_PIXELS_SIDE**2 + (2 * context_radius + 1) ** 2 > WIDTH:
            raise ValueError(
                f"context_radius={context_radius}: at most 7 (the descriptor must fit {WIDTH} channels)"
            )
        self.context_radius = context_radius
        self.stride = config.token_stride
        self.config = feature_config(config, WIDTH)
        processor = AceImageProcessor(num_channels=config.num_channels)
        # Channel 0's normalization (a scalar or one value per channel): the channels are one repeated image.
        self.mean, self.std = (
            float(torch.as_tensor(v).reshape(-1)[0]) for v in (processor.image_mean, processor.image_std)
        )
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # gives the module a device

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def forward(self, pixel_values: torch.Tensor) -> AceModelOutput:
        images = pixel_values[:, :1] * self.std + self.mean  # back to the windowed image in [0, 1]
        dense = context_descriptor(images, self.stride, self.context_radius)
        dense = F.pad(dense, (0, 0, 0, 0, 0, WIDTH - dense.shape[1]))
        pooled = F.adaptive_avg_pool2d(images, POOLED_SIDE).flatten(1)
        return AceModelOutput(patch_embeddings=dense, pooler_output=pooled)


def baseline_description(context_radius: int) -> str:
    """What the baseline column is, for results.json and the table's notes."""
    side = 2 * context_radius + 1
    return (
        f"no model; each token described by its own pixels (4 x 4) and the mean pixels of its {side} x {side} "
        "token neighbourhood, centred and normalized (matching, view correspondence, segmentation heads); "
        f"the image pooled to {POOLED_SIDE} x {POOLED_SIDE} for the findings"
    )
