"""`visualize`: what ACE encoders learned, as pictures: PCA colours and query similarity of their patch
embeddings (`pca.png`, `similarity.png`). Its command line is `ace-hf visualize` (`ace_hf.commands.visualize`,
which says what each picture shows); the drawing itself is `ace_hf.visualization`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .arguments import check_results_folder, check_size, read_model_config, resolve_device
from .configuration_ace import AceConfig
from .image_io import decode_image, find_images, readable_suffixes
from .image_processing_ace import AceImageProcessor
from .modeling_ace import AceModel
from .visualization import (
    image_grid,
    mark_point,
    overlay,
    pca_rgb,
    query_embedding,
    similarity_maps,
    to_pil,
)

if TYPE_CHECKING:
    from .commands.visualize import VisualizationArguments

logger = logging.getLogger(__name__)

Encoder = tuple[str, AceModel, AceImageProcessor]  # label, model, the processor its image files go through
PICTURES = ("pca.png", "similarity.png")


class GeometryError(ValueError):
    """--query does not fit the images: a usage error, reported in one line."""


def load_processor(name: str, config: AceConfig) -> AceImageProcessor:
    """The processor saved with the model (its windowing and normalization), else the one its config implies."""
    try:
        return AceImageProcessor.from_pretrained(name)
    except OSError:  # no preprocessor_config.json
        return AceImageProcessor.from_ace_config(config)


@dataclass
class EncoderSource:
    """One --model_name_or_path read without its weights: enough to check the geometry before anything loads."""

    name: str  # as given
    label: str  # its name in the pictures: the folder's name, or the Hub id
    config: AceConfig
    processor: AceImageProcessor


def read_sources(args: VisualizationArguments) -> list[EncoderSource]:
    """Each model's config and processor (ModelSourceError when a config cannot be read)."""
    sources = []
    for name in args.model_name_or_path:
        config = read_model_config(name, "--model_name_or_path", AceConfig)
        sources.append(EncoderSource(name, Path(name).name or name, config, load_processor(name, config)))
    return sources


def load_encoders(args: VisualizationArguments, sources: list[EncoderSource]) -> list[Encoder]:
    """Each model with its processor; the random-init reference copies the first one's architecture."""
    encoders: list[Encoder] = []
    device = resolve_device(args.device)
    for source in sources:
        model = AceModel.from_pretrained(source.name, config=source.config).to(device).eval()
        encoders.append((source.label, model, source.processor))
    if args.random_init:
        first_label, first_model, first_processor = encoders[0]
        torch.manual_seed(args.seed)
        untrained = AceModel(copy.deepcopy(first_model.config)).to(device).eval()
        encoders.append((f"{first_label} (random init, seed {args.seed})", untrained, first_processor))
    return encoders


def window_files(paths: list[Path], size: int) -> torch.Tensor:
    """Images as displayed: windowed by the processor's rules (bit depth aware), grayscale, [N, 1, size, size]."""
    gray = AceImageProcessor(num_channels=1)
    images = [gray.to_unit_float(decode_image(path))[None] for path in paths]
    resized = [F.interpolate(image, size=(size, size), mode="bicubic", antialias=True) for image in images]
    return torch.cat(resized).clamp(0, 1)


@torch.no_grad()
def embed_files(
    model: AceModel, processor: AceImageProcessor, paths: list[Path], size: int, batch_size: int
) -> torch.Tensor:
    """Dense embeddings [N, C, h, w] of image files through the model's own processor, at `size`."""
    processor = copy.deepcopy(processor)
    # Set after construction: the processor ties `size` to its pretraining view geometry, inference does not.
    processor.size = {"height": size, "width": size}
    dense = []
    for start in range(0, len(paths), batch_size):
        pixels = processor.preprocess([decode_image(path) for path in paths[start : start + batch_size]])
        outputs = model(pixel_values=pixels["pixel_values"].to(model.device, model.dtype))
        dense.append(outputs.patch_embeddings.float().cpu())
    return torch.cat(dense)


def heldout_images(count: int, render_size: int, size: int) -> torch.Tensor:
    """`count` held-out radiographs [N, 1, size, size], rendered (or loaded from the cache) at `render_size`."""
    from ace_hf.evaluation.heldout import load_heldout  # the renderer only when held-out images are asked for

    logger.info(f"Rendering (or loading) {count} held-out radiographs at {render_size} px.")
    images = load_heldout(count, render_size, False, None).images
    if size != render_size:
        images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
    return images


def embed_renders(model: AceModel, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Dense embeddings [N, C, h, w] of windowed renders, normalized as the evaluation suite does."""
    from ace_hf.evaluation.heldout import encode

    return encode(model, images, batch_size=batch_size)[0]


def query_pixel(sources: list[EncoderSource], size: int, query: list[float] | None) -> tuple[float, float]:
    """The query (row, col), default the centre; SizeError when `size` does not fit a model's token stride,
    GeometryError when --query lies outside the image."""
    for source in sources:
        check_size(size, source.config.token_stride, model=source.label)
    row, col = query if query is not None else ((size - 1) / 2, (size - 1) / 2)
    if not (0 <= row <= size - 1 and 0 <= col <= size - 1):
        raise GeometryError(f"--query {row} {col} is outside the {size} x {size} image")
    return row, col


def visualize(args: VisualizationArguments) -> list[Path]:
    """Draw `pca.png` and `similarity.png` into `args.output_dir`; returns their paths (none when no image
    was found). Raises, before any weights load or image is read: OutputDirError (--output_dir holds earlier
    pictures or is unusable), ModelSourceError (a model's config cannot be read), SizeError (--size off a
    model's token stride) or GeometryError (--query outside the image)."""
    check_results_folder(args.output_dir, PICTURES, "--output_dir", args.overwrite_output_dir)
    sources = read_sources(args)
    first = sources[0]

    # The inference size: the first processor's for files, else held-out renders at the first model's
    # pretraining size.
    paths: list[Path] = []
    render_size = first.config.grid_size * first.config.token_stride
    if args.images:
        paths = find_images(args.images)
        if not paths:
            logger.error(f"No images found in {args.images} (suffixes: {', '.join(readable_suffixes())}).")
            return []
        size = args.size or first.processor.size["height"]
    else:
        size = args.size or render_size
    row, col = query_pixel(sources, size, args.query)
    encoders = load_encoders(args, sources)

    if paths:
        images = window_files(paths, size)
        names = [path.name for path in paths]
    else:
        images = heldout_images(args.heldout, render_size, size)
        names = [f"held-out {index}" for index in range(len(images))]
    logger.info(
        f"{len(images)} image(s) at {size} x {size} px; query pixel (row {row:g}, col {col:g}) of {names[0]}."
    )

    # Per encoder: one PCA row and one similarity row.
    plain = [to_pil(image[0]) for image in images]
    pca_rows, pca_labels = [plain], ["input: " + ", ".join(names)]
    similarity_rows, similarity_labels = [], []
    for model_label, model, processor in tqdm(encoders, desc="Encoding", unit="model"):
        if paths:
            dense = embed_files(model, processor, paths, size, args.batch_size)
        else:
            dense = embed_renders(model, images, args.batch_size)
        stride = model.config.token_stride

        colours = pca_rgb(dense)
        pca_rows.append([overlay(image[0], colour) for image, colour in zip(images, colours, strict=True)])
        pca_labels.append(f"{model_label}: PCA of patch embeddings (same colour = same embedding)")

        maps = similarity_maps(query_embedding(dense[0], row, col, stride), dense)
        shown = list(range(1, len(images))) or [0]  # a single image: its own map
        low, high = float(maps[shown].min()), float(maps[shown].max())
        similarity_rows.append(
            [mark_point(plain[0], row, col)]
            + [overlay(images[i, 0], maps[i], value_range=(low, high)) for i in shown]
        )
        similarity_labels.append(f"{model_label}: cosine similarity to + (blue {low:.2f} .. red {high:.2f})")

    pictures = zip(PICTURES, [(pca_rows, pca_labels), (similarity_rows, similarity_labels)], strict=True)
    written = []
    for filename, (rows, labels) in pictures:
        image_grid(rows, labels).save(args.output_dir / filename)
        written.append(args.output_dir / filename)
    return written
