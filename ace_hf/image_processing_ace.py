"""Image processor of ACE: X-ray-safe loading and windowing, inference preprocessing, and pretraining views.

Medical images come as 8- or 16-bit grayscale, floats, RGB screenshots, ... The generic transformers path
(`PIL ... convert("RGB")`) clips 16-bit X-rays at 255, so everything here goes through `to_unit_float`, which
windows by dtype into [0, 1] first and then produces the model's channel count.

Inference (`__call__` / `preprocess`) windows, fits the image to `size` by `resize_mode` and normalizes; it
applies no augmentation. `sample_views` cuts ACE's grid-aligned large / small view pair (see
correspondence_ace) for pretraining, with its own geometry and augmentation (the `pretraining` settings), in two
halves: a cheap CPU one (`draw_view_parameters`, `view_sources`: every random draw, the windowed images) and a
batched one (`cut_views`) that pretraining runs on its accelerator (`--views_on_device`). Both live here, in
plain torch, so that `sample_views` and training cut views with one implementation.

This file travels to the Hub as remote code: it imports only the standard library, torch, numpy and
transformers; PIL comes only inside transformers' availability check.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import is_pil_image
from transformers.processing_utils import ImagesKwargs
from transformers.utils import is_vision_available, logging

from .configuration_ace import AceConfig
from .correspondence_ace import sample_view_origins, view_geometry_problems

if is_vision_available():
    import PIL.Image
    import PIL.ImageOps

logger = logging.get_logger(__name__)

# ITU-R 601-2 luma weights, the same as PIL's convert("L").
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# The gray level that torchvision's adjust_contrast blends RGB images with (its rgb_to_grayscale weights).
CONTRAST_LUMA = (0.2989, 0.587, 0.114)

# Value of the border added by resize_mode="pad", in [0, 1] before normalization: black, the value of air and
# of the letterbox borders X-ray datasets already have (after normalization it is -image_mean / image_std).
PAD_VALUE = 0.0

# resize_mode="resize" warns when the image's aspect ratio is off the target's by more than this fraction.
SQUASH_TOLERANCE = 0.05

# A pretraining setting's rule: why `value` cannot produce views, or None when it can.
SettingCheck = Callable[[Any], "str | None"]


def positive_integer(value: Any) -> str | None:
    return None if isinstance(value, int) and value > 0 else "must be a positive integer"


def probability(value: Any) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be in [0, 1]"


def strength(value: Any) -> str | None:
    """A brightness or contrast strength: factors are drawn in [1 - value, 1 + value], so it stays below 1."""
    return None if 0.0 <= value < 1.0 else "must be in [0, 1)"


def clip_limit(value: Any) -> str | None:
    return None if value >= 1.0 else "must be at least 1 (in units of the uniform bin count)"


def ordered_pair(low: float, high: float) -> SettingCheck:
    """The rule of a (low, high) range setting whose ends lie in (`low`, `high`]."""

    def check(value: Any) -> str | None:
        if len(value) == 2 and low < value[0] <= value[1] <= high:
            return None
        return f"must be a (low, high) pair with {low} < low <= high <= {high}"

    return check


def setting(default: Any, description: str, check: SettingCheck | None = None) -> Any:
    """A field of `PretrainingSettings`: its default, what it means, its rule (None: checked with the geometry)."""
    return field(default=default, metadata={"help": description, "check": check})


def view_geometry(config: AceConfig) -> dict[str, Any]:
    """The view geometry an AceConfig sets, in the processor's terms: a cell is a token (`token_stride` px)."""
    return {
        "grid_size": config.grid_size,
        "cell_size": config.token_stride,
        "view_tokens": config.view_tokens,
        "min_overlap": config.min_overlap,
    }


# The view geometry of a processor built without a config: the default AceConfig's (ACE-B), not a copy of it.
DEFAULT_VIEW_GEOMETRY = view_geometry(AceConfig())


@dataclass(frozen=True)
class PretrainingSettings:
    """The settings `sample_views` (ACE pretraining) reads: view geometry and augmentation, declared once.

    `AceImageProcessor` takes them as keywords, flat or nested as `pretraining={...}` (how
    preprocessor_config.json saves them), validates them by building this, and keeps them as its attributes.
    Range settings are (low, high) tuples (JSON's lists are turned back into them).
    """

    grid_size: int = setting(
        DEFAULT_VIEW_GEOMETRY["grid_size"],
        "Cells per side of the jittered image that the two views are cut from.",
        positive_integer,
    )
    cell_size: int = setting(
        DEFAULT_VIEW_GEOMETRY["cell_size"],
        "Pixels per cell side (= the model's token stride); views are `view_tokens * cell_size` px.",
        positive_integer,
    )
    view_tokens: int = setting(
        DEFAULT_VIEW_GEOMETRY["view_tokens"],
        "n, token grid side of one view; the large view covers 2n x 2n cells, the small n x n.",
        positive_integer,
    )
    min_overlap: float = setting(
        DEFAULT_VIEW_GEOMETRY["min_overlap"],
        "Least fraction of the small view's cells that lie inside the large view.",
    )
    jitter_scale: tuple[float, float] = setting(
        (0.85, 1.0), "Area fraction range of the random-resized-crop jitter.", ordered_pair(0.0, 1.0)
    )
    jitter_ratio: tuple[float, float] = setting(
        (3 / 4, 4 / 3), "Aspect ratio range of the random-resized-crop jitter.", ordered_pair(0.0, math.inf)
    )
    brightness_contrast_prob: float = setting(
        0.5, "Per-view probability of the brightness and contrast change.", probability
    )
    blur_prob: float = setting(0.5, "Per-view probability of the Gaussian blur.", probability)
    sharpen_prob: float = setting(0.3, "Per-view probability of sharpening.", probability)
    local_contrast_prob: float = setting(
        0.3, "Per-view probability of the local contrast equalization.", probability
    )
    brightness: float = setting(
        0.4, "Brightness factors are drawn uniformly in [1 - value, 1 + value].", strength
    )
    contrast: float = setting(
        0.4, "Contrast factors are drawn uniformly in [1 - value, 1 + value].", strength
    )
    blur_sigma: tuple[float, float] = setting(
        (0.1, 2.0), "Range of the Gaussian blur sigma in view pixels.", ordered_pair(0.0, math.inf)
    )
    sharpness: tuple[float, float] = setting(
        (1.5, 3.0),
        "Range of the `adjust_sharpness` factor (1 = unchanged, 2 = sharpened).",
        ordered_pair(0.0, math.inf),
    )
    local_contrast_tiles: int = setting(
        8, "Tiles per side of the local contrast equalization (`equalize_local_contrast`).", positive_integer
    )
    local_contrast_clip: float = setting(
        2.0, "Clip limit of the local contrast equalization (`equalize_local_contrast`).", clip_limit
    )

    def __post_init__(self) -> None:
        """Range settings as tuples; a ValueError naming the setting when it cannot produce views."""

        def fail(name: str, why: str) -> None:
            raise ValueError(f"AceImageProcessor.{name}={getattr(self, name)!r}: {why}")

        for spec in fields(self):
            if isinstance(spec.default, tuple):
                object.__setattr__(self, spec.name, tuple(getattr(self, spec.name)))
        for spec in fields(self):
            why = spec.metadata["check"] and spec.metadata["check"](getattr(self, spec.name))
            if why:
                fail(spec.name, why)
        for name, why in view_geometry_problems(self.grid_size, self.view_tokens, self.min_overlap):
            fail(name, why)


PRETRAINING_SETTING_NAMES = tuple(spec.name for spec in fields(PretrainingSettings))
PRETRAINING_ABOUT = (
    "Used only by sample_views (ACE pretraining): view geometry and augmentation. Inference (__call__ / "
    "preprocess) applies no augmentation: it windows, fits the image to `size` by `resize_mode`, normalizes."
)

# What `from_pretrained(..., key=value)` routes through `__init__`: transformers reads only the keys of
# `valid_kwargs`, and its ImagesKwargs knows only the generic ones (size, image_mean, image_std, ...).
AceImageProcessorKwargs = TypedDict(
    "AceImageProcessorKwargs",
    {
        **ImagesKwargs.__annotations__,
        "num_channels": int,
        "resize_mode": str,
        **{spec.name: spec.type for spec in fields(PretrainingSettings)},
    },
    total=False,
)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Crop box (top, left, crop_height, crop_width) of a random-resized-crop, drawn from `generator`.

    Same rule as torchvision's `RandomResizedCrop.get_params` (area fraction uniform in `scale`, aspect ratio
    log-uniform in `ratio`, 10 tries, then a center crop clamped to `ratio`), which draws from the global RNG
    and so cannot be seeded per call.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u_area, u_ratio, u_top, u_left = torch.rand(4, generator=generator).tolist()
        target_area = area * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(log_low + u_ratio * (log_high - log_low))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return int(u_top * (height - crop_h + 1)), int(u_left * (width - crop_w + 1)), crop_h, crop_w
    crop_h, crop_w = height, width
    if width / height < min(ratio):
        crop_h = round(width / min(ratio))
    elif width / height > max(ratio):
        crop_w = round(height * max(ratio))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def equalize_local_contrast(
    images: torch.Tensor, tiles: int = 8, clip_limit: float = 2.0, bins: int = 256
) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalization (CLAHE) of [B, C, H, W] images in [0, 1], per channel.

    Each image is cut into `tiles x tiles` tiles (edge tiles padded by replication); a tile's histogram is
    clipped at `clip_limit` times the uniform bin count, the excess spread over all bins, and its CDF becomes
    the tile's intensity mapping. Every pixel goes through its four nearest tile mappings, blended bilinearly,
    so no tile seams appear. Local contrast is boosted where X-rays are flat (mediastinum, lung fields).
    """
    batch, channels, height, width = images.shape
    flat = images.reshape(batch * channels, 1, height, width)
    tile_h, tile_w = -(-height // tiles), -(-width // tiles)
    padded = F.pad(flat, (0, tile_w * tiles - width, 0, tile_h * tiles - height), mode="replicate")
    levels = (padded * (bins - 1)).round().long()
    per_tile = (
        levels.reshape(-1, tiles, tile_h, tiles, tile_w)
        .transpose(2, 3)
        .reshape(-1, tiles * tiles, tile_h * tile_w)
    )
    hist = torch.zeros(per_tile.shape[0], tiles * tiles, bins, dtype=images.dtype, device=images.device)
    hist.scatter_add_(2, per_tile, torch.ones_like(per_tile, dtype=images.dtype))
    limit = clip_limit * tile_h * tile_w / bins
    hist = hist.clamp(max=limit) + (hist - limit).clamp(min=0).sum(-1, keepdim=True) / bins
    mapping = (hist.cumsum(-1) / (tile_h * tile_w)).clamp(0, 1).flatten(1)  # [N, tiles * tiles * bins]

    def tile_coordinates(size: int, tile: int) -> tuple[torch.Tensor, ...]:
        """Nearest two tile indices of every pixel center along one axis, and the weight of the second."""
        position = ((torch.arange(size, device=images.device) + 0.5) / tile - 0.5).clamp(0, tiles - 1)
        first = position.floor().long()
        return first, (first + 1).clamp(max=tiles - 1), position - first

    rows0, rows1, weight_y = tile_coordinates(height, tile_h)
    cols0, cols1, weight_x = tile_coordinates(width, tile_w)
    pixel_levels = (flat * (bins - 1)).round().long().flatten(1)  # [N, H * W]

    def lookup(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        tile = (rows[:, None] * tiles + cols[None, :]).flatten()
        return mapping.gather(1, tile * bins + pixel_levels)

    weight_y = weight_y[:, None].expand(height, width).flatten()
    weight_x = weight_x[None, :].expand(height, width).flatten()
    top = torch.lerp(lookup(rows0, cols0), lookup(rows0, cols1), weight_x)
    bottom = torch.lerp(lookup(rows1, cols0), lookup(rows1, cols1), weight_x)
    return torch.lerp(top, bottom, weight_y).reshape(batch, channels, height, width)


# ----------------------------------------------------------------------------------------- batched view ops
# `AceImageProcessor.cut_views` runs these on the training device, on [B, C, H, W] views in [0, 1] with one
# parameter per view ([B] tensors). Only elementwise arithmetic, gathers and exact integer sums: no convolution
# (cuDNN would run float32 convolutions in TF32 on recent GPUs), no float reduction whose order depends on the
# batch, no host sync. So a view comes out the same whatever batch it is cut in, on any device.


def per_view(values: torch.Tensor) -> torch.Tensor:
    """[B] parameters as [B, 1, 1, 1], to broadcast over [B, C, H, W] views."""
    return values.reshape(-1, 1, 1, 1)


def shifted_sum(padded: torch.Tensor, weights: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """A per-view 1-D correlation along `dim`: sum over k of weights[:, k] * padded.narrow(dim, k, length)."""
    total = padded.narrow(dim, 0, length) * per_view(weights[:, 0])
    for k in range(1, weights.shape[1]):
        total = total + padded.narrow(dim, k, length) * per_view(weights[:, k])
    return total


def exact_mean(values: torch.Tensor) -> torch.Tensor:
    """Per-view mean of [B, ...] values in [0, 1], summed exactly in 2^-24 fixed point (integers add in any
    order to the same total): a float sum's rounding would depend on the batch size and the device's kernel."""
    fixed = (values * 2**24).round().long().flatten(1).sum(1)
    return fixed.float() / (values[0].numel() * 2**24)


def select_views(
    selected: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor], views: torch.Tensor
) -> torch.Tensor:
    """`op(views)` for the selected views ([B] bool), the others unchanged.

    On the CPU only the selected views are computed. On an accelerator every view is and torch.where keeps the
    selected ones: indexing by a boolean mask would make the host wait for the device.
    """
    if views.device.type != "cpu":
        return torch.where(per_view(selected), op(views), views)
    views = views.clone()
    if selected.any():
        views[selected] = op(views[selected])
    return views


def batched_adjust_brightness(views: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness with one factor per view (1 = unchanged)."""
    return (views * per_view(factors)).clamp(0, 1)


def batched_adjust_contrast(views: torch.Tensor, factors: torch.Tensor, rgb: bool) -> torch.Tensor:
    """torchvision's adjust_contrast with one factor per view: blend with the view's mean gray level.

    `rgb`: the views are (or, with one channel, stand for) RGB images, whose gray level torchvision takes with
    its luma weights; a one-channel view is then a gray image replicated to three channels.
    """
    if rgb:
        red, green, blue = views.expand(-1, 3, -1, -1).unbind(1)
        gray = red.mul(CONTRAST_LUMA[0]).add(green, alpha=CONTRAST_LUMA[1]).add(blue, alpha=CONTRAST_LUMA[2])
    else:
        gray = views
    mean = per_view(exact_mean(gray))
    return (views * per_view(factors) + (1 - per_view(factors)) * mean).clamp(0, 1)


def batched_gaussian_blur(
    views: torch.Tensor, sigmas: torch.Tensor, radii: torch.Tensor, max_radius: int
) -> torch.Tensor:
    """torchvision's gaussian_blur with one sigma and kernel radius per view (radius 0 = unchanged).

    Every kernel is padded to `max_radius` with zero taps; the views are reflect-padded like torchvision does
    (a reflected pixel does not depend on the padding width). Separable: rows, then columns.
    """
    offsets = torch.arange(-max_radius, max_radius + 1, device=views.device, dtype=views.dtype)
    logits = -(((offsets / math.sqrt(2)) / sigmas[:, None]) ** 2)
    kernels = logits.masked_fill(offsets.abs() > radii[:, None], -math.inf).exp()
    total = kernels[:, 0]
    for k in range(1, kernels.shape[1]):  # term by term, like every sum here: no batch-dependent order
        total = total + kernels[:, k]
    kernels = kernels / total[:, None]
    height, width = views.shape[-2:]
    padded = F.pad(views, (max_radius,) * 4, mode="reflect")
    return shifted_sum(shifted_sum(padded, kernels, -2, height), kernels, -1, width)


def batched_adjust_sharpness(views: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness with one factor per view (1 = unchanged): blend the view's interior with
    its smoothed version ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13); the one-pixel border is kept."""
    height, width = views.shape[-2:]
    if height <= 2 or width <= 2:
        return views
    ones = views.new_ones(views.shape[0], 3)
    box = shifted_sum(shifted_sum(views, ones, -2, height - 2), ones, -1, width - 2)
    inner = views[..., 1:-1, 1:-1]
    smoothed = (box + 4 * inner) / 13
    sharpened = views.clone()
    sharpened[..., 1:-1, 1:-1] = inner + (1 - per_view(factors)) * (smoothed - inner)
    return sharpened.clamp(0, 1)


def cut_cells(
    images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, cells: int, cell: int
) -> torch.Tensor:
    """The `cells x cells` cells from cell (rows[b], cols[b]) of each [B, C, H, W] image: two batched gathers."""
    span = torch.arange(cells * cell, device=images.device)
    channels, width = images.shape[1], images.shape[-1]
    row_index = (rows[:, None] * cell + span)[:, None, :, None].expand(-1, channels, -1, width)
    picked = images.gather(2, row_index)
    col_index = (cols[:, None] * cell + span)[:, None, None, :].expand(-1, channels, cells * cell, -1)
    return picked.gather(3, col_index)


def pad_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack [C, H, W] images of any sizes into one [B, C, H_max, W_max] batch, zero-padded at the bottom and
    right; one-channel images are replicated when others have more channels."""
    channels = max(image.shape[0] for image in images)
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = images[0].new_zeros(len(images), channels, height, width)
    for slot, image in zip(batch, images, strict=True):
        slot[:, : image.shape[1], : image.shape[2]] = image
    return batch


def resize_bicubic(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of [C, H, W], not clamped; same size is kept.

    Unclamped so that resizing one axis here and the other later (`AceImageProcessor.view_sources`) equals one
    resize of both: the antialiased kernel is separable and leaves an axis of unchanged size as it is.
    """
    if pixels.shape[-2:] == (height, width):
        return pixels
    return F.interpolate(
        pixels[None], size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )[0]


def resize_unit(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of [C, H, W] in [0, 1], clamped (bicubic overshoots)."""
    return resize_bicubic(pixels, height, width).clamp(0, 1)


def resize_and_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale so the image covers height x width (aspect ratio kept), then cut the center out."""
    image_height, image_width = pixels.shape[-2:]
    scale = max(height / image_height, width / image_width)
    resized = resize_unit(
        pixels, max(height, round(image_height * scale)), max(width, round(image_width * scale))
    )
    top, left = (resized.shape[-2] - height) // 2, (resized.shape[-1] - width) // 2
    return resized[:, top : top + height, left : left + width]


def resize_and_pad(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale so the image fits inside height x width (aspect ratio kept), then pad it centered with PAD_VALUE."""
    image_height, image_width = pixels.shape[-2:]
    scale = min(height / image_height, width / image_width)
    resized = resize_unit(
        pixels,
        min(height, max(1, round(image_height * scale))),
        min(width, max(1, round(image_width * scale))),
    )
    pad_height, pad_width = height - resized.shape[-2], width - resized.shape[-1]
    borders = (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
    return F.pad(resized, borders, value=PAD_VALUE)


# resize_mode -> how one [C, H, W] image in [0, 1] is fitted to the inference size.
RESIZERS = {"resize": resize_unit, "shortest_edge_crop": resize_and_crop, "pad": resize_and_pad}


def checked_size(size: Any, stride: int) -> dict[str, int]:
    """An inference size (int = square, or {"height", "width"}) as a dict; ValueError naming `size` otherwise."""
    as_dict = (
        {"height": size, "width": size} if isinstance(size, int) and not isinstance(size, bool) else size
    )
    if (
        not isinstance(as_dict, dict)
        or set(as_dict) != {"height", "width"}
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in as_dict.values())
    ):
        raise ValueError(
            f"AceImageProcessor.size={size!r}: must be a positive int or {{'height': int, 'width': int}}"
        )
    if as_dict["height"] % stride or as_dict["width"] % stride:
        raise ValueError(
            f"AceImageProcessor.size={size!r}: height and width must be multiples of the model's token stride "
            f"cell_size={stride}"
        )
    return dict(as_dict)


def checked_resize_mode(resize_mode: Any) -> str:
    """The resize mode itself; ValueError naming `resize_mode` and the choices otherwise."""
    if not isinstance(resize_mode, str) or resize_mode not in RESIZERS:
        raise ValueError(f"AceImageProcessor.resize_mode={resize_mode!r}: must be one of {sorted(RESIZERS)}")
    return resize_mode


class AceImageProcessor(BaseImageProcessor):
    r"""Image processor of ACE encoders: robust windowing, resize and normalize; and ACE's two-view cropping.

    Inference settings (`__call__` / `preprocess`, which apply no augmentation):
        size: model input `{"height", "width"}` in pixels (an int means square); each side a multiple of the
            token stride `cell_size`. It is free of the pretraining geometry: ViT interpolates its position
            embeddings to any such size; Swin (transformers' SwinModel) pads to its windows but needs every side
            above `window_size * cell_size` (224 px for ace-swin-b): at or below it, transformers clamps the
            windows and drops the shift on the model's layers, and that sticks for all later calls.
            Defaults to the view side `view_tokens * cell_size` (448 for ACE-B); override per call with `size=`.
        resize_mode: how an image meets `size`: "resize" (stretch, the default; warns once when that squashes
            the aspect ratio), "shortest_edge_crop" (scale to cover, center crop) or "pad" (scale to fit,
            centered, borders black: 0 in [0, 1] before normalization, see PAD_VALUE).
        num_channels: channels of the output (1 or 3); grayscale is repeated, RGB goes to luminance.
        image_mean, image_std: normalization, a scalar or one value per channel (ChestX-ray14 statistics).

    Pretraining settings (used only by `sample_views`): the fields of `PretrainingSettings`, given flat here
    or nested as `pretraining={...}` (flat winning; left out = its defaults) and saved under "pretraining" in
    preprocessor_config.json. Their view geometry (grid_size, cell_size, view_tokens, min_overlap) is an
    AceConfig's: `from_ace_config` takes a config's, and the defaults are the default AceConfig's.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = AceImageProcessorKwargs

    def __init__(
        self,
        size: dict[str, int] | int | None = None,
        resize_mode: str = "resize",
        num_channels: int = 3,
        image_mean: float | Sequence[float] = 0.5056,
        image_std: float | Sequence[float] = 0.252,
        pretraining: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # The pretraining settings given flat (None = not given); the other keywords are transformers' own.
        flat = {name: kwargs.pop(name) for name in PRETRAINING_SETTING_NAMES if name in kwargs}
        super().__init__(**kwargs)
        given = {name: value for name, value in flat.items() if value is not None}
        settings = PretrainingSettings(**{**self._saved_pretraining(pretraining), **given})
        for name in PRETRAINING_SETTING_NAMES:
            setattr(self, name, getattr(settings, name))
        self.size = size if size is not None else self.view_tokens * self.cell_size
        self.resize_mode = resize_mode
        self.num_channels = num_channels
        self.image_mean = (
            image_mean if isinstance(image_mean, int | float) else [float(v) for v in image_mean]
        )
        self.image_std = image_std if isinstance(image_std, int | float) else [float(v) for v in image_std]
        self._warned_squash = False
        self._validate()

    @staticmethod
    def _saved_pretraining(pretraining: dict[str, Any] | None) -> dict[str, Any]:
        """The nested "pretraining" settings of a saved config, without its "about" note; unknown keys raise."""
        settings = {key: value for key, value in (pretraining or {}).items() if key != "about"}
        unknown = sorted(set(settings) - set(PRETRAINING_SETTING_NAMES))
        if unknown:
            raise ValueError(f"AceImageProcessor.pretraining: unknown setting(s) {', '.join(unknown)}")
        return settings

    def _validate(self) -> None:
        """Raise a ValueError naming the field when the inference settings cannot produce model inputs (the
        pretraining ones are checked by `PretrainingSettings`)."""

        def fail(name: str, why: str) -> None:
            raise ValueError(f"AceImageProcessor.{name}={getattr(self, name)!r}: {why}")

        if self.num_channels not in (1, 3):
            fail("num_channels", "must be 1 or 3")
        self.size = checked_size(self.size, self.cell_size)
        checked_resize_mode(self.resize_mode)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != self.num_channels:
                fail(name, f"needs one value or one per channel (num_channels={self.num_channels})")
        if min(np.atleast_1d(self.image_std)) <= 0:
            fail("image_std", "must be positive")

    @classmethod
    def from_ace_config(cls, config: AceConfig, **overrides: Any) -> AceImageProcessor:
        """The processor with an AceConfig's view geometry and channels; inference size = the view side."""
        settings = {
            "size": {"height": config.image_size, "width": config.image_size},
            "num_channels": config.num_channels,
            **view_geometry(config),
        }
        return cls(**{**settings, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Inference settings at the top level, pretraining ones nested under "pretraining" with a note."""
        output = super().to_dict()
        output.pop("_warned_squash", None)
        pretraining = {name: output.pop(name) for name in PRETRAINING_SETTING_NAMES}
        output["pretraining"] = {"about": PRETRAINING_ABOUT, **pretraining}
        return output

    # ----------------------------------------------------------------------------------------- loading

    def to_unit_float(self, image: Any, keep_gray: bool = False) -> torch.Tensor:
        """Load one image and window it into float32 [num_channels, H, W] in [0, 1].

        Accepts a file path (str or Path, anything PIL reads), a PIL image of any mode, a numpy array
        (H, W) or (H, W, C), or a torch tensor (H, W) or (C, H, W), with C in 1, 3, 4.

        Windowing by dtype, so no bit depth saturates or comes out dark:
        - uint8: divided by 255; bool: 0 / 1;
        - floats already inside [0, 1]: kept as they are;
        - 16-bit and other integers, and floats outside [0, 1]: min-max over the image's own range (a 12-bit
          X-ray in uint16 fills [0, 1]);
        - constant images that would need min-max: zeros.
        Then the alpha channel is dropped, grayscale is repeated to 3 channels or RGB turned into luminance
        (ITU-R 601-2) to match `num_channels`. `keep_gray` keeps grayscale in one channel: `cut_views` works on it
        and replicates it last (a third of the work and of the host-to-device traffic).

        Raises:
            ValueError: naming the file or the problem, for missing or unreadable files, NaN / inf values,
                wrong rank, zero size, unsupported channel counts, dtypes or input types.
        """
        array, name = self._as_array(image)
        pixels = torch.from_numpy(self._window(array, name)).permute(2, 0, 1)
        if pixels.shape[0] == 4:
            pixels = pixels[:3]
        if pixels.shape[0] == 1 and self.num_channels == 3 and not keep_gray:
            pixels = pixels.expand(3, -1, -1)
        elif pixels.shape[0] == 3 and self.num_channels == 1:
            pixels = torch.einsum("chw,c->hw", pixels, torch.tensor(LUMA_WEIGHTS)).clamp(0, 1)[None]
        return pixels.contiguous()

    @staticmethod
    def _as_array(image: Any) -> tuple[np.ndarray, str]:
        """Any accepted input as a channels-last numpy array (H, W, C), with a name for error messages."""
        name = f"{type(image).__name__} image"
        if isinstance(image, str | Path):
            name = f"image file {str(image)!r}"
            if not os.path.isfile(image):
                raise ValueError(f"{name}: no such file")
            try:
                with PIL.Image.open(image) as opened:
                    opened.load()
                    image = PIL.ImageOps.exif_transpose(opened)
            except Exception as err:
                raise ValueError(f"{name}: cannot be read ({err})") from err
        if is_pil_image(image):
            if image.mode == "LA":
                image = image.convert("L")
            elif image.mode not in ("1", "L", "I", "F", "RGB", "RGBA") and not image.mode.startswith("I;16"):
                image = image.convert("RGB")  # P, PA, CMYK, YCbCr, ...: through their RGB rendering
            array = np.asarray(image)
        elif isinstance(image, torch.Tensor):
            tensor = image.detach().cpu()
            if tensor.dtype in (torch.float16, torch.bfloat16):
                tensor = tensor.float()
            if tensor.is_complex():
                raise ValueError(f"{name}: unsupported dtype {tensor.dtype}")
            array = tensor.numpy()
        elif isinstance(image, np.ndarray):
            array = image
        else:
            raise ValueError(
                f"Unsupported image type {type(image).__name__}; pass a file path, a PIL image, "
                "a numpy array or a torch tensor (or a list of them)"
            )
        channels_first = isinstance(image, torch.Tensor)
        if array.ndim not in (2, 3) or (
            array.ndim == 3 and array.shape[0 if channels_first else -1] not in (1, 3, 4)
        ):
            layout = "(C, H, W)" if channels_first else "(H, W, C)"
            raise ValueError(
                f"{name}: unsupported shape {array.shape}; expected (H, W) or {layout} with 1, 3 or 4 channels"
            )
        if array.size == 0:
            raise ValueError(f"{name}: zero-size image of shape {array.shape}")
        if array.ndim == 2:
            return array[..., None], name
        return (np.moveaxis(array, 0, -1) if channels_first else array), name

    @staticmethod
    def _window(array: np.ndarray, name: str) -> np.ndarray:
        """Window by dtype into float32 [0, 1] (the rules are in `to_unit_float`)."""
        if array.dtype.kind == "b":
            return array.astype(np.float32)
        if array.dtype == np.uint8:
            return array.astype(np.float32) / 255
        if array.dtype.kind not in "iuf":
            raise ValueError(f"{name}: unsupported dtype {array.dtype}")
        if array.dtype.kind in "iu" and array.dtype.itemsize <= 2:
            # Up to 16 bits, x - low and high - low are exact in float32 and one IEEE division rounds the true
            # quotient, as float64 then float32 does: the same values at a fifth of the time.
            low, high = array.min(), array.max()
            if high == low:
                return np.zeros(array.shape, dtype=np.float32)
            return (array.astype(np.float32) - np.float32(low)) / np.float32(int(high) - int(low))
        values = array.astype(np.float64)
        if array.dtype.kind == "f" and not np.isfinite(values).all():
            raise ValueError(f"{name}: contains NaN or infinite values")
        low, high = values.min(), values.max()
        if array.dtype.kind == "f" and low >= 0 and high <= 1:
            return values.astype(np.float32)
        if high == low:
            return np.zeros(array.shape, dtype=np.float32)
        return ((values - low) / (high - low)).astype(np.float32)

    # ----------------------------------------------------------------------------------------- inference

    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        *,
        size: dict[str, int] | int | None = None,
        resize_mode: str | None = None,
    ) -> BatchFeature:
        """Window, fit to the size (bicubic, antialiased) and normalize images: `pixel_values` [B, C, H, W].

        `images` is one image or a list of them (any kind `to_unit_float` accepts, sizes may differ). `size` and
        `resize_mode` override the processor's own for this call (the pipeline passes `image_processor_kwargs`
        here). No augmentation is applied.
        """
        size = checked_size(self.size if size is None else size, self.cell_size)
        fit = RESIZERS[checked_resize_mode(self.resize_mode if resize_mode is None else resize_mode)]
        pixels = []
        for image in self._as_list(images):
            unit = self.to_unit_float(image)
            if fit is resize_unit:
                self._warn_if_squashed(unit.shape[-2:], size)
            pixels.append(fit(unit, size["height"], size["width"]))
        return BatchFeature(
            {"pixel_values": self._normalize(torch.stack(pixels))}, tensor_type=return_tensors
        )

    def _warn_if_squashed(self, image_size: Sequence[int], size: dict[str, int]) -> None:
        """Warn once per processor when a plain resize distorts the aspect ratio (anatomy gets squashed)."""
        image_ratio = image_size[1] / image_size[0]
        target_ratio = size["width"] / size["height"]
        if self._warned_squash or abs(math.log(image_ratio / target_ratio)) <= math.log1p(SQUASH_TOLERANCE):
            return
        self._warned_squash = True
        logger.warning(
            f"AceImageProcessor: resize_mode='resize' squashes a {image_size[0]}x{image_size[1]} image (aspect "
            f"ratio {image_ratio:.2f}) to {size['height']}x{size['width']} ({target_ratio:.2f}). To keep the "
            "aspect ratio pass resize_mode='shortest_edge_crop' (center crop) or 'pad' (black borders), or a "
            "size of the image's aspect ratio. Warned once per processor."
        )

    @staticmethod
    def _as_list(images: Any) -> list[Any]:
        images = list(images) if isinstance(images, list | tuple) else [images]
        if not images:
            raise ValueError("No images given")
        return images

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(pixels - mean) / std per channel of [B, C, H, W], one channel replicated to num_channels; with Python
        scalars, so that no small tensor is copied to the device."""
        channels = pixels.expand(-1, self.num_channels, -1, -1)
        means = np.broadcast_to(self.image_mean, self.num_channels)
        stds = np.broadcast_to(self.image_std, self.num_channels)
        return torch.stack(
            [
                (channel - float(mean)) / float(std)
                for channel, mean, std in zip(channels.unbind(1), means, stds, strict=True)
            ],
            dim=1,
        )

    # ----------------------------------------------------------------------------------------- pretraining

    def sample_views(
        self,
        images: Any,
        do_augment: bool = True,
        do_jitter: bool = True,
        generator: torch.Generator | None = None,
    ) -> BatchFeature:
        """Cut ACE's grid-aligned view pairs: `pixel_values_large`, `pixel_values_small`, `view_origins`.

        Per image: window (`to_unit_float`); jitter by random-resized-crop to S x S, S = grid_size * cell_size
        (or a plain resize without jitter); the large view is the image under cells [R1, R1 + 2n) x
        [C1, C1 + 2n) average-pooled 2 x 2 (pixel-exact, so one large token covers exactly 2 x 2 cells); the
        small view is the image under cells [R2, R2 + n) x [C2, C2 + n). Each view is then augmented on its
        own (no geometric changes, they would break the correspondence) and normalized. `view_origins` is
        LongTensor [B, 4] = (R1, C1, R2, C2) in cells. Every random draw uses `generator`.

        The two halves of the training pipeline, chained on the CPU: `draw_view_parameters` + `view_sources`
        (what DataLoader workers do) and `cut_views` (what the training device does with `--views_on_device`).
        """
        pixels = [self.to_unit_float(image, keep_gray=True) for image in self._as_list(images)]
        parameters = self.draw_view_parameters(
            [image.shape[-2:] for image in pixels], do_augment, do_jitter, generator
        )
        sources, crop_boxes = self.view_sources(pixels, parameters["crop_boxes"])
        return self.cut_views(sources, **{**parameters, "crop_boxes": crop_boxes})

    def draw_view_parameters(
        self,
        sizes: Sequence[Sequence[int]],
        do_augment: bool = True,
        do_jitter: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """Every random choice behind the view pairs of images of these (height, width) sizes, from `generator`.

        The draws and their order are those `sample_views` has always made (so one seed gives the same views):
        the view origins of all images, each image's jitter box, then per view (all large views, then all small
        ones) the augmentation flags and strengths. Returns the keyword arguments of `cut_views`:
        `view_origins` [B, 4]; `crop_boxes`, a list of (top, left, height, width) in each image's pixels (the
        whole image without jitter); with `do_augment`, per view ([B, 2]: large, small) `local_contrast`
        (bool), `brightness_factors`, `contrast_factors`, `sharpness_factors` (1 = unchanged), `blur_sigmas` and
        `blur_radii` (0 = unblurred). The factors are worked out in float64, as Python floats were.
        """
        count = len(sizes)
        parameters: dict[str, Any] = {
            "view_origins": sample_view_origins(
                count, self.grid_size, self.view_tokens, self.min_overlap, generator=generator
            )
        }
        parameters["crop_boxes"] = [
            random_resized_crop_box(int(height), int(width), self.jitter_scale, self.jitter_ratio, generator)
            if do_jitter
            else (0, 0, int(height), int(width))
            for height, width in sizes
        ]
        if do_augment:
            large, small = (self._draw_augmentation(count, generator) for _ in range(2))
            parameters.update({key: torch.stack([large[key], small[key]], dim=1) for key in large})
        return parameters

    def _draw_augmentation(self, count: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Augmentation parameters of `count` views: flags, then strengths, each op's identity where unflagged."""
        probabilities = torch.tensor(
            [self.local_contrast_prob, self.brightness_contrast_prob, self.blur_prob, self.sharpen_prob]
        )
        apply = torch.rand(count, 4, generator=generator) < probabilities
        brightness, contrast, sigma, sharpness = torch.rand(count, 4, generator=generator).double().unbind(1)
        sigma = self.blur_sigma[0] + sigma * (self.blur_sigma[1] - self.blur_sigma[0])
        return {
            "local_contrast": apply[:, 0],
            "brightness_factors": torch.where(
                apply[:, 1], 1 + self.brightness * (2 * brightness - 1), 1.0
            ).float(),
            "contrast_factors": torch.where(apply[:, 1], 1 + self.contrast * (2 * contrast - 1), 1.0).float(),
            "blur_sigmas": sigma.float(),
            "blur_radii": torch.where(
                apply[:, 2], (3 * sigma).ceil().clamp(max=self._max_blur_radius()), 0
            ).long(),
            "sharpness_factors": torch.where(
                apply[:, 3], self.sharpness[0] + sharpness * (self.sharpness[1] - self.sharpness[0]), 1.0
            ).float(),
        }

    def _max_blur_radius(self) -> int:
        """Largest Gaussian kernel radius: 3 sigma, below the view side (reflect padding needs it)."""
        return min(math.ceil(3 * self.blur_sigma[1]), self.view_tokens * self.cell_size - 1)

    def view_sources(
        self, images: Sequence[torch.Tensor], crop_boxes: Sequence[Sequence[int]], downsample: bool = True
    ) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
        """The batch `cut_views` reads: windowed [C, H, W] images zero-padded to one size, and their crop boxes.

        With `downsample`, each image is first cut to its jitter box and each side of that crop longer than the
        grid side S shrunk to S (bicubic, antialiased), so no image sent to the device is over S x S (a 2048 px
        radiograph: 4 MB in float32 instead of 16). The box becomes the whole shrunk crop, exactly. Nothing is
        approximated: along each axis one resize happens, here (down to S) or in `cut_views` (up to S), and
        the kernel is separable, so the views equal those without `downsample` up to float rounding.
        """
        if not downsample:
            return pad_images(images), [tuple(box) for box in crop_boxes]
        side = self.grid_size * self.cell_size
        crops = [
            resize_bicubic(
                image[:, top : top + height, left : left + width], min(height, side), min(width, side)
            )
            for image, (top, left, height, width) in zip(images, crop_boxes, strict=True)
        ]
        return pad_images(crops), [(0, 0, *crop.shape[-2:]) for crop in crops]

    def cut_views(
        self,
        images: torch.Tensor,
        crop_boxes: Sequence[Sequence[int]],
        view_origins: torch.Tensor,
        **augmentation: torch.Tensor,
    ) -> BatchFeature:
        """Cut, augment and normalize the view pairs of a batch on its device: the output of `sample_views`.

        `images` [B, 1 or num_channels, H, W] in [0, 1] (`view_sources`); the other arguments come from
        `draw_view_parameters`, tensors on the images' device, `crop_boxes` as Python ints (they set each
        resize's shape, so they stay on the host). Per image, its crop is resized to S x S (a loop over the
        batch: PyTorch's antialiased bicubic kernel, the one `sample_views` always used, has no batched form for
        crops of different sizes); the rest is batched: both views cut by cell gathers, the large one pooled
        2 x 2, augmentation with per-view parameters, normalization. Computed in float32 with autocast off, so
        mixed precision cannot change the views. Nothing is drawn at random here.
        """
        with torch.autocast(images.device.type, enabled=False):
            side = self.grid_size * self.cell_size
            jittered = torch.stack(
                [
                    resize_unit(image[:, top : top + height, left : left + width], side, side)
                    for image, (top, left, height, width) in zip(images.float(), crop_boxes, strict=True)
                ]
            )
            n, cell = self.view_tokens, self.cell_size
            views = {
                "pixel_values_large": F.avg_pool2d(
                    cut_cells(jittered, view_origins[:, 0], view_origins[:, 1], 2 * n, cell), 2
                ),
                "pixel_values_small": cut_cells(jittered, view_origins[:, 2], view_origins[:, 3], n, cell),
            }
            for position, key in enumerate(views):
                if augmentation:
                    views[key] = self._augment(
                        views[key], **{name: value[:, position] for name, value in augmentation.items()}
                    )
                views[key] = self._normalize(views[key])
        return BatchFeature({**views, "view_origins": view_origins})

    def _augment(
        self,
        views: torch.Tensor,
        local_contrast: torch.Tensor,
        brightness_factors: torch.Tensor,
        contrast_factors: torch.Tensor,
        blur_sigmas: torch.Tensor,
        blur_radii: torch.Tensor,
        sharpness_factors: torch.Tensor,
    ) -> torch.Tensor:
        """Photometric augmentation of [B, C, H, W] views in [0, 1], one parameter per view.

        Local contrast equalization runs first (it remaps intensities, so it would undo what comes before),
        then brightness / contrast, Gaussian blur, sharpening. An op a view is not drawn for leaves it as it is.
        """
        views = select_views(
            local_contrast,
            lambda selected: equalize_local_contrast(
                selected, self.local_contrast_tiles, self.local_contrast_clip
            ),
            views,
        )
        views = batched_adjust_brightness(views, brightness_factors)
        views = batched_adjust_contrast(views, contrast_factors, rgb=self.num_channels == 3)
        views = batched_gaussian_blur(views, blur_sigmas, blur_radii, self._max_blur_radius())
        return batched_adjust_sharpness(views, sharpness_factors)


__all__ = [
    "PAD_VALUE",
    "PRETRAINING_SETTING_NAMES",
    "RESIZERS",
    "AceImageProcessor",
    "PretrainingSettings",
    "batched_adjust_brightness",
    "batched_adjust_contrast",
    "batched_adjust_sharpness",
    "batched_gaussian_blur",
    "cut_cells",
    "equalize_local_contrast",
    "pad_images",
    "random_resized_crop_box",
    "resize_and_crop",
    "resize_and_pad",
    "resize_bicubic",
    "resize_unit",
    "view_geometry",
]


AceImageProcessor.register_for_auto_class("AutoImageProcessor")
