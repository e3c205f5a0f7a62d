"""Image processor of ACE: X-ray-safe loading and windowing, inference preprocessing, and pretraining views.

Medical images come as 8- or 16-bit grayscale, floats, RGB screenshots, ... The generic transformers path
(`PIL ... convert("RGB")`) clips 16-bit X-rays at 255, so everything here goes through `to_unit_float`, which
windows by dtype into [0, 1] first and then produces the model's channel count.

Inference (`__call__` / `preprocess`) windows, fits the image to `size` by `resize_mode` and normalizes; it
applies no augmentation. `sample_views` cuts ACE's grid-aligned large / small view pair (see
correspondence_ace) for pretraining, with its own geometry and augmentation (the `pretraining` settings).

This file travels to the Hub as remote code: it imports only the standard library, torch, numpy and
transformers; PIL and torchvision come only inside transformers' availability checks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import is_pil_image
from transformers.processing_utils import ImagesKwargs
from transformers.utils import is_torchvision_available, is_vision_available, logging

from .configuration_ace import AceConfig
from .correspondence_ace import sample_view_origins, view_geometry_problems

if is_vision_available():
    import PIL.Image
    import PIL.ImageOps

if is_torchvision_available():
    from torchvision.transforms.v2 import functional as tvF

logger = logging.get_logger(__name__)

# ITU-R 601-2 luma weights, the same as PIL's convert("L").
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Value of the border added by resize_mode="pad", in [0, 1] before normalization: black, the value of air and
# of the letterbox borders X-ray datasets already have (after normalization it is -image_mean / image_std).
PAD_VALUE = 0.0

# resize_mode="resize" warns when the image's aspect ratio is off the target's by more than this fraction.
SQUASH_TOLERANCE = 0.05

# Settings used only by `sample_views` (ACE pretraining), with their defaults; saved under "pretraining".
PRETRAINING_DEFAULTS: dict[str, Any] = {
    "grid_size": 32,
    "cell_size": 32,
    "view_tokens": 14,
    "min_overlap": 0.5,
    "jitter_scale": (0.85, 1.0),
    "jitter_ratio": (3 / 4, 4 / 3),
    "brightness_contrast_prob": 0.5,
    "blur_prob": 0.5,
    "sharpen_prob": 0.3,
    "local_contrast_prob": 0.3,
    "brightness": 0.4,
    "contrast": 0.4,
    "blur_sigma": (0.1, 2.0),
    "sharpness": (1.5, 3.0),
    "local_contrast_tiles": 8,
    "local_contrast_clip": 2.0,
}
PAIR_SETTINGS = ("jitter_scale", "jitter_ratio", "blur_sigma", "sharpness")
PRETRAINING_ABOUT = (
    "Used only by sample_views (ACE pretraining): view geometry and augmentation. Inference (__call__ / "
    "preprocess) applies no augmentation: it windows, fits the image to `size` by `resize_mode`, normalizes."
)


class AceImageProcessorKwargs(ImagesKwargs, total=False):
    """Keys that `from_pretrained(..., key=value)` routes through `__init__` (the base class only knows ImagesKwargs)."""

    num_channels: int
    resize_mode: str
    grid_size: int
    cell_size: int
    view_tokens: int
    min_overlap: float
    jitter_scale: Sequence[float]
    jitter_ratio: Sequence[float]
    brightness_contrast_prob: float
    blur_prob: float
    sharpen_prob: float
    local_contrast_prob: float
    brightness: float
    contrast: float
    blur_sigma: Sequence[float]
    sharpness: Sequence[float]
    local_contrast_tiles: int
    local_contrast_clip: float


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


def resize_unit(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of [C, H, W] in [0, 1], clamped (bicubic overshoots); same size is kept."""
    if pixels.shape[-2:] == (height, width):
        return pixels
    resized = F.interpolate(
        pixels[None], size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return resized[0].clamp(0, 1)


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

    Pretraining settings (used only by `sample_views`; saved under "pretraining" in preprocessor_config.json,
    given flat here or nested as `pretraining={...}`, flat winning; left out = PRETRAINING_DEFAULTS):
        grid_size: cells per side of the jittered image that the two views are cut from.
        cell_size: pixels per cell side (= the model's token stride); views are `view_tokens * cell_size` px.
        view_tokens: n, token grid side of one view; the large view covers 2n x 2n cells, the small n x n.
        min_overlap: least fraction of the small view's cells that lie inside the large view.
        jitter_scale, jitter_ratio: area fraction and aspect ratio range of the random-resized-crop jitter.
        brightness_contrast_prob, blur_prob, sharpen_prob, local_contrast_prob: per-view probabilities of
            the photometric augmentations.
        brightness, contrast: factors are drawn uniformly in [1 - value, 1 + value].
        blur_sigma: range of the Gaussian blur sigma in view pixels.
        sharpness: range of the `adjust_sharpness` factor (1 = unchanged, 2 = sharpened).
        local_contrast_tiles, local_contrast_clip: tiles per side and clip limit of the CLAHE-like
            equalization (see `equalize_local_contrast`).
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
        grid_size: int | None = None,
        cell_size: int | None = None,
        view_tokens: int | None = None,
        min_overlap: float | None = None,
        jitter_scale: Sequence[float] | None = None,
        jitter_ratio: Sequence[float] | None = None,
        brightness_contrast_prob: float | None = None,
        blur_prob: float | None = None,
        sharpen_prob: float | None = None,
        local_contrast_prob: float | None = None,
        brightness: float | None = None,
        contrast: float | None = None,
        blur_sigma: Sequence[float] | None = None,
        sharpness: Sequence[float] | None = None,
        local_contrast_tiles: int | None = None,
        local_contrast_clip: float | None = None,
        pretraining: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # The pretraining keywords given here (None = not given), read before any other local exists.
        flat = {
            key: value for key, value in locals().items() if key in PRETRAINING_DEFAULTS and value is not None
        }
        super().__init__(**kwargs)
        for key, value in {**PRETRAINING_DEFAULTS, **self._saved_pretraining(pretraining), **flat}.items():
            setattr(self, key, tuple(value) if key in PAIR_SETTINGS else value)
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
        unknown = sorted(set(settings) - set(PRETRAINING_DEFAULTS))
        if unknown:
            raise ValueError(f"AceImageProcessor.pretraining: unknown setting(s) {', '.join(unknown)}")
        return settings

    def _validate(self) -> None:
        """Raise a ValueError naming the field when the settings cannot produce model inputs or views."""

        def fail(field: str, why: str) -> None:
            raise ValueError(f"AceImageProcessor.{field}={getattr(self, field)!r}: {why}")

        if self.num_channels not in (1, 3):
            fail("num_channels", "must be 1 or 3")
        for field in ("grid_size", "cell_size", "view_tokens", "local_contrast_tiles"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                fail(field, "must be a positive integer")
        self.size = checked_size(self.size, self.cell_size)
        checked_resize_mode(self.resize_mode)
        for field, why in view_geometry_problems(self.grid_size, self.view_tokens, self.min_overlap):
            fail(field, why)
        for field in ("image_mean", "image_std"):
            value = getattr(self, field)
            if isinstance(value, list) and len(value) != self.num_channels:
                fail(field, f"needs one value or one per channel (num_channels={self.num_channels})")
        if min(np.atleast_1d(self.image_std)) <= 0:
            fail("image_std", "must be positive")
        for field in ("brightness_contrast_prob", "blur_prob", "sharpen_prob", "local_contrast_prob"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                fail(field, "must be in [0, 1]")
        for field, low, high in (
            ("jitter_scale", 0.0, 1.0),
            ("jitter_ratio", 0.0, math.inf),
            ("blur_sigma", 0.0, math.inf),
            ("sharpness", 0.0, math.inf),
        ):
            value = getattr(self, field)
            if len(value) != 2 or not low < value[0] <= value[1] <= high:
                fail(field, f"must be a (low, high) pair with {low} < low <= high <= {high}")
        for field in ("brightness", "contrast"):
            if not 0.0 <= getattr(self, field) < 1.0:
                fail(field, "must be in [0, 1)")
        if self.local_contrast_clip < 1.0:
            fail("local_contrast_clip", "must be at least 1 (in units of the uniform bin count)")

    @classmethod
    def from_ace_config(cls, config: AceConfig, **overrides: Any) -> AceImageProcessor:
        """Build the processor matching an AceConfig's cell grid and channels; inference size = the view side."""
        settings = {
            "size": {"height": config.image_size, "width": config.image_size},
            "num_channels": config.num_channels,
            "grid_size": config.grid_size,
            "cell_size": config.token_stride,
            "view_tokens": config.view_tokens,
            "min_overlap": config.min_overlap,
        }
        return cls(**{**settings, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Inference settings at the top level, pretraining ones nested under "pretraining" with a note."""
        output = super().to_dict()
        output.pop("_warned_squash", None)
        pretraining = {key: output.pop(key) for key in PRETRAINING_DEFAULTS}
        output["pretraining"] = {"about": PRETRAINING_ABOUT, **pretraining}
        return output

    # ----------------------------------------------------------------------------------------- loading

    def to_unit_float(self, image: Any) -> torch.Tensor:
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
        (ITU-R 601-2) to match `num_channels`.

        Raises:
            ValueError: naming the file or the problem, for missing or unreadable files, NaN / inf values,
                wrong rank, zero size, unsupported channel counts, dtypes or input types.
        """
        array, name = self._as_array(image)
        pixels = torch.from_numpy(self._window(array, name)).permute(2, 0, 1)
        if pixels.shape[0] == 4:
            pixels = pixels[:3]
        if pixels.shape[0] == 1 and self.num_channels == 3:
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
        mean = torch.tensor(self.image_mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).reshape(-1, 1, 1)
        return (pixels - mean) / std

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
        """
        if not is_torchvision_available():
            raise ImportError("AceImageProcessor.sample_views needs torchvision")
        images = self._as_list(images)
        n, cell = self.view_tokens, self.cell_size
        side = self.grid_size * cell
        origins = sample_view_origins(len(images), self.grid_size, n, self.min_overlap, generator=generator)
        large, small = [], []
        for image, (row1, col1, row2, col2) in zip(images, origins.tolist(), strict=True):
            pixels = self.to_unit_float(image)
            if do_jitter:
                box = random_resized_crop_box(
                    *pixels.shape[-2:], self.jitter_scale, self.jitter_ratio, generator
                )
                pixels = tvF.resized_crop(
                    pixels, *box, [side, side], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True
                ).clamp(0, 1)
            else:
                pixels = resize_unit(pixels, side, side)
            large.append(pixels[:, row1 * cell : (row1 + 2 * n) * cell, col1 * cell : (col1 + 2 * n) * cell])
            small.append(pixels[:, row2 * cell : (row2 + n) * cell, col2 * cell : (col2 + n) * cell])
        views = {
            "pixel_values_large": F.avg_pool2d(torch.stack(large), 2),
            "pixel_values_small": torch.stack(small),
        }
        for key, pixels in views.items():
            views[key] = self._normalize(self._augment(pixels, generator) if do_augment else pixels)
        return BatchFeature({**views, "view_origins": origins}, tensor_type="pt")

    def _augment(self, views: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Photometric augmentation of [B, C, H, W] views in [0, 1], drawn per view from `generator`.

        Local contrast equalization runs first (it remaps intensities, so it would undo what comes before),
        then brightness / contrast, Gaussian blur, sharpening.
        """
        probs = torch.tensor(
            [self.local_contrast_prob, self.brightness_contrast_prob, self.blur_prob, self.sharpen_prob]
        )
        apply = torch.rand(views.shape[0], 4, generator=generator) < probs
        strength = torch.rand(views.shape[0], 4, generator=generator)
        views = views.clone()
        equalize = apply[:, 0]
        if equalize.any():
            views[equalize] = equalize_local_contrast(
                views[equalize], self.local_contrast_tiles, self.local_contrast_clip
            )
        max_radius = min(views.shape[-2:]) - 1  # reflect padding needs a radius below the view side
        for i in range(views.shape[0]):
            brightness, contrast, sigma, sharpness = strength[i].tolist()
            if apply[i, 1]:
                views[i] = tvF.adjust_brightness(views[i], 1 + self.brightness * (2 * brightness - 1))
                views[i] = tvF.adjust_contrast(views[i], 1 + self.contrast * (2 * contrast - 1))
            if apply[i, 2]:
                sigma = self.blur_sigma[0] + sigma * (self.blur_sigma[1] - self.blur_sigma[0])
                kernel = 2 * min(math.ceil(3 * sigma), max_radius) + 1
                views[i] = tvF.gaussian_blur(views[i], [kernel, kernel], [sigma, sigma])
            if apply[i, 3]:
                factor = self.sharpness[0] + sharpness * (self.sharpness[1] - self.sharpness[0])
                views[i] = tvF.adjust_sharpness(views[i], factor)
        return views


__all__ = [
    "PAD_VALUE",
    "RESIZERS",
    "AceImageProcessor",
    "equalize_local_contrast",
    "random_resized_crop_box",
    "resize_and_crop",
    "resize_and_pad",
    "resize_unit",
]


AceImageProcessor.register_for_auto_class("AutoImageProcessor")
