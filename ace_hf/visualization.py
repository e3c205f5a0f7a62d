"""Pictures of dense embeddings: do the same anatomy get the same embedding, as ACE promises?

- `pca_rgb`: the first three principal components of the patch tokens as RGB, fitted jointly over all images
  and scaled by shared percentiles, so that one colour means one embedding in every image of the set;
- `query_embedding` + `similarity_maps`: the embedding at one pixel of one image, and its cosine similarity to
  every token of every image (where does "this point" appear elsewhere?);
- `overlay`, `mark_point`, `image_grid`: blend a map over the radiograph and tile the results, with PIL only.

`ace_hf.visualize` draws them for one or more encoders (`examples/visualize.py`).

Training-side module (numpy, torch and PIL): never imported by the files that travel to the Hub.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
import torch.nn.functional as F

GAP = 4  # pixels between tiles and around the grid
LABEL_HEIGHT = 14  # pixels of the strip above a labelled row
BACKGROUND = (255, 255, 255)

# Blue -> cyan -> yellow -> red, a few anchors linearly interpolated: dark ends stay readable over an X-ray.
_HEAT_ANCHORS = np.array(
    [[0.0, 0.0, 0.5], [0.0, 0.2, 1.0], [0.0, 0.9, 1.0], [1.0, 0.9, 0.0], [1.0, 0.1, 0.0], [0.6, 0.0, 0.0]]
)


def pca_rgb(
    embeddings: torch.Tensor,
    foreground: torch.Tensor | None = None,
    percentiles: tuple[float, float] = (1, 99),
) -> torch.Tensor:
    """First three principal components of the tokens of all images, as RGB colours.

    The PCA is fitted jointly over every (foreground) token of every image and each component is scaled by
    percentiles over those same tokens, so colours are comparable across images: the same embedding gets the
    same colour wherever it is. Percentiles (not min-max) keep a few outlier tokens from washing out the rest.
    Component signs are fixed (largest loading positive) so that reruns give the same colours.

    Args:
        embeddings: [N, C, h, w] dense embeddings.
        foreground: optional [N, h, w] bool; only these tokens fit the PCA and the scaling, the others are black.
        percentiles: low and high percentile mapped to 0 and 255.
    Returns:
        [N, h, w, 3] uint8.
    """
    n, channels, h, w = embeddings.shape
    tokens = embeddings.permute(0, 2, 3, 1).reshape(-1, channels).double()
    keep = (
        torch.ones(len(tokens), dtype=torch.bool)
        if foreground is None
        else foreground.reshape(-1).bool().cpu()
    )
    tokens = tokens.cpu()
    fitted = tokens[keep]
    if len(fitted) == 0:
        return torch.zeros(n, h, w, 3, dtype=torch.uint8)
    mean = fitted.mean(0)
    _, _, components = torch.linalg.svd(fitted - mean, full_matrices=False)  # rows: principal directions
    components = components[:3]
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    projected = torch.zeros(len(tokens), 3, dtype=torch.float64)  # fewer than 3 components: zeros
    projected[:, : len(components)] = (tokens - mean) @ components.T
    low = torch.quantile(projected[keep], percentiles[0] / 100, dim=0)
    high = torch.quantile(projected[keep], percentiles[1] / 100, dim=0)
    scaled = ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    rgb = (scaled * 255).round().to(torch.uint8)
    rgb[~keep] = 0
    return rgb.reshape(n, h, w, 3)


def query_embedding(embeddings: torch.Tensor, row_px: float, col_px: float, stride: int) -> torch.Tensor:
    """The embedding [C] at pixel (row, col) of one image's token map [C, h, w], bilinear between tokens.

    Pixel centres are at integers and token i's centre at pixel (i + 0.5) * stride - 0.5 (as in
    `ace_hf.evaluation.properties.landmark_matching`), so a point between tokens blends its neighbours
    instead of snapping to one; past the outer token centres the border tokens are used.
    """
    channels, h, w = embeddings.shape
    x = (col_px + 0.5) / (w * stride) * 2 - 1
    y = (row_px + 0.5) / (h * stride) * 2 - 1
    grid = torch.tensor([[[[x, y]]]], dtype=torch.float64)
    sampled = F.grid_sample(
        embeddings[None].double(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled.reshape(channels).to(embeddings.dtype)


def similarity_maps(query: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [N, h, w] of a query embedding [C] to every token of [N, C, h, w]."""
    unit = F.normalize(embeddings.double(), dim=1)
    return torch.einsum("c,nchw->nhw", F.normalize(query.double(), dim=0), unit).to(embeddings.dtype)


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> float RGB in [0, 1] (shape + (3,)), blue (low) to red (high)."""
    positions = np.linspace(0, 1, len(_HEAT_ANCHORS))
    flat = np.clip(values, 0, 1).reshape(-1)
    rgb = np.stack([np.interp(flat, positions, _HEAT_ANCHORS[:, k]) for k in range(3)], -1)
    return rgb.reshape(*values.shape, 3)


def overlay(
    image: torch.Tensor,
    heat: torch.Tensor,
    alpha: float = 0.5,
    value_range: tuple[float, float] | None = None,
) -> PIL.Image.Image:
    """Blend a token map over a grayscale image [H, W] in [0, 1]; returns an RGB PIL image of the image's size.

    `heat` is either an RGB map [h, w, 3] uint8 (e.g. `pca_rgb`), upsampled nearest so each token stays one
    flat block, or a scalar map [h, w], upsampled bilinearly (between token centres) and coloured blue -> red
    over `value_range` (default: the map's own min and max; pass a shared range to compare several maps).
    """
    height, width = image.shape
    gray = image.detach().float().clamp(0, 1).cpu().numpy()[..., None].repeat(3, -1)
    if heat.ndim == 3:
        tile = PIL.Image.fromarray(heat.detach().cpu().to(torch.uint8).numpy(), mode="RGB")
        colours = np.asarray(tile.resize((width, height), PIL.Image.NEAREST), dtype=np.float64) / 255
    else:
        values = F.interpolate(
            heat.detach().double().cpu()[None, None],
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        )[0, 0].numpy()
        low, high = value_range if value_range is not None else (float(heat.min()), float(heat.max()))
        colours = heat_colors((values - low) / max(high - low, 1e-12))
    blended = (1 - alpha) * gray + alpha * colours
    return PIL.Image.fromarray((blended * 255).round().clip(0, 255).astype(np.uint8), mode="RGB")


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """A grayscale image [H, W] in [0, 1] as an RGB PIL image (so crosses and grids can be coloured)."""
    array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(array, mode="L").convert("RGB")


def mark_point(
    image: PIL.Image.Image, row: float, col: float, radius: int | None = None, color: tuple = (0, 255, 0)
) -> PIL.Image.Image:
    """A copy of `image` with a small cross at pixel (row, col), outlined in black to show on any background."""
    marked = image.copy()
    draw = PIL.ImageDraw.Draw(marked)
    r = radius if radius is not None else max(3, min(marked.size) // 25)
    for width, fill in ((3, (0, 0, 0)), (1, color)):
        draw.line([(col - r, row), (col + r, row)], fill=fill, width=width)
        draw.line([(col, row - r), (col, row + r)], fill=fill, width=width)
    return marked


def image_grid(
    rows: Sequence[Sequence[PIL.Image.Image]], labels: Sequence[str] | None = None, gap: int = GAP
) -> PIL.Image.Image:
    """Tile rows of images, left-aligned with `gap` pixels between and around them; with `labels`, each row
    gets a `LABEL_HEIGHT` strip above it with its label in PIL's default font (no plotting library needed)."""
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"image_grid: {len(labels)} labels for {len(rows)} rows")
    strip = LABEL_HEIGHT if labels is not None else 0
    widths = [sum(tile.width for tile in row) + gap * (len(row) + 1) for row in rows]
    heights = [max((tile.height for tile in row), default=0) for row in rows]
    grid = PIL.Image.new(
        "RGB", (max(widths, default=2 * gap), sum(heights) + len(rows) * (strip + gap) + gap)
    )
    grid.paste(BACKGROUND, (0, 0, *grid.size))
    draw, font = PIL.ImageDraw.Draw(grid), PIL.ImageFont.load_default()
    top = gap
    for index, (row, height) in enumerate(zip(rows, heights, strict=True)):
        if labels is not None:
            draw.text((gap, top), labels[index], fill=(0, 0, 0), font=font)
        top += strip
        left = gap
        for tile in row:
            grid.paste(tile.convert("RGB"), (left, top))
            left += tile.width + gap
        top += height + gap
    return grid


__all__ = [
    "heat_colors",
    "image_grid",
    "mark_point",
    "overlay",
    "pca_rgb",
    "query_embedding",
    "similarity_maps",
    "to_pil",
]
