"""Look at what ACE encoders learned: PCA colours and query similarity of their patch embeddings.

    python examples/visualize.py --model_name_or_path outputs/ace-pretrain --heldout 4 --output_dir vis
    python examples/visualize.py --model_name_or_path outputs/ace-pretrain org/ace-vit-b --images xrays/ \\
        --query 200 150 --random_init --output_dir vis

Writes two pictures to --output_dir:
- `pca.png`: a row of the input images, then per model a row with the first three principal components of its
  patch embeddings as RGB, fitted jointly over all images: the same colour is the same embedding in every image,
  so an anatomically consistent encoder paints the same anatomy the same colour;
- `similarity.png`: per model, the first image with the query point (a cross; `--query ROW COL`, default the
  centre), then the other images coloured by the cosine similarity of each patch to the query's embedding
  (blue: least similar, red: most, on a range shared by the row).

Images are `--images` (files or folders) or, without them, `--heldout N` held-out chest radiographs rendered at the
first model's pretraining size (`grid_size * token_stride`), never seen in pretraining. `--random_init` adds the
first model's architecture with random weights as a reference: what position embeddings and pixels alone give.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ace_hf import AceImageProcessor, AceModel
from ace_hf.evaluation import encode, load_heldout
from ace_hf.image_io import IMAGE_SUFFIXES, decode_image, list_image_files
from ace_hf.visualization import (
    image_grid,
    mark_point,
    overlay,
    pca_rgb,
    query_embedding,
    similarity_maps,
    to_pil,
)

logger = logging.getLogger("visualize")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model_name_or_path", required=True, nargs="+", help="one or more encoders (folders or Hub ids)"
    )
    parser.add_argument(
        "--images", nargs="+", type=Path, help="image files or folders (searched recursively)"
    )
    parser.add_argument(
        "--heldout", type=int, default=4, help="held-out radiographs to render without --images"
    )
    parser.add_argument(
        "--size",
        type=int,
        help="inference size in pixels (default: the held-out render size or the processor's)",
    )
    parser.add_argument(
        "--query",
        type=float,
        nargs=2,
        metavar=("ROW", "COL"),
        help="query pixel in the first image (at --size)",
    )
    parser.add_argument(
        "--random_init", action="store_true", help="add the first model's architecture, untrained"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random_init weights")
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for path in args.images or []:
        if not path.exists():
            parser.error(f"--images {str(path)!r} does not exist")
    if args.images is None and args.heldout < 1:
        parser.error("--heldout must be at least 1")
    if args.size is not None and args.size < 1:
        parser.error("--size must be positive")
    return args


def find_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted)."""
    return [found for path in inputs for found in ([path] if path.is_file() else list_image_files(path))]


def load_processor(name: str, model: AceModel) -> AceImageProcessor:
    """The processor saved with the model (its windowing and normalization), else the one its config implies."""
    try:
        return AceImageProcessor.from_pretrained(name)
    except OSError:  # no preprocessor_config.json
        return AceImageProcessor.from_ace_config(model.config)


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


def main(argv: list[str] | None = None) -> int:
    """Draw both pictures; returns the exit status (1 when no image was found)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)

    # Encoders, each with the processor its files go through; the random-init reference copies the first.
    encoders: list[tuple[str, AceModel, AceImageProcessor]] = []
    for name in args.model_name_or_path:
        model = AceModel.from_pretrained(name).to(args.device).eval()
        encoders.append((Path(name).name or name, model, load_processor(name, model)))
    first_label, first_model, first_processor = encoders[0]
    if args.random_init:
        torch.manual_seed(args.seed)
        untrained = AceModel(copy.deepcopy(first_model.config)).to(args.device).eval()
        encoders.append((f"{first_label} (random init, seed {args.seed})", untrained, first_processor))

    # Images at the inference size: files, or held-out renders at the first model's pretraining size.
    if args.images:
        paths = find_images(args.images)
        if not paths:
            logger.error(f"No images found in {args.images} (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}).")
            return 1
        size = args.size or first_processor.size["height"]
        images = window_files(paths, size)
        names = [path.name for path in paths]
    else:
        render_size = first_model.config.grid_size * first_model.config.token_stride
        size = args.size or render_size
        logger.info(f"Rendering (or loading) {args.heldout} held-out radiographs at {render_size} px.")
        images = load_heldout(args.heldout, render_size, False, None).images
        if size != render_size:
            images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
        names = [f"held-out {index}" for index in range(len(images))]
    for label, model, _ in encoders:
        if size % model.config.token_stride:
            raise SystemExit(
                f"--size {size} is not a multiple of {label}'s token stride {model.config.token_stride}"
            )
    row, col = args.query if args.query is not None else ((size - 1) / 2, (size - 1) / 2)
    if not (0 <= row <= size - 1 and 0 <= col <= size - 1):
        raise SystemExit(f"--query {row} {col} is outside the {size} x {size} image")
    logger.info(
        f"{len(images)} image(s) at {size} x {size} px; query pixel (row {row:g}, col {col:g}) of {names[0]}."
    )

    # Per encoder: one PCA row and one similarity row.
    plain = [to_pil(image[0]) for image in images]
    pca_rows, pca_labels = [plain], ["input: " + ", ".join(names)]
    similarity_rows, similarity_labels = [], []
    for label, model, processor in tqdm(encoders, desc="Encoding", unit="model"):
        if args.images:
            dense = embed_files(model, processor, paths, size, args.batch_size)
        else:
            dense = encode(model, images, batch_size=args.batch_size)[0]
        stride = model.config.token_stride

        colours = pca_rgb(dense)
        pca_rows.append([overlay(image[0], colour) for image, colour in zip(images, colours, strict=True)])
        pca_labels.append(f"{label}: PCA of patch embeddings (same colour = same embedding)")

        maps = similarity_maps(query_embedding(dense[0], row, col, stride), dense)
        shown = list(range(1, len(images))) or [0]  # a single image: its own map
        low, high = float(maps[shown].min()), float(maps[shown].max())
        similarity_rows.append(
            [mark_point(plain[0], row, col)]
            + [overlay(images[i, 0], maps[i], value_range=(low, high)) for i in shown]
        )
        similarity_labels.append(f"{label}: cosine similarity to + (blue {low:.2f} .. red {high:.2f})")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    outputs = {"pca.png": (pca_rows, pca_labels), "similarity.png": (similarity_rows, similarity_labels)}
    for filename, (rows, labels) in outputs.items():
        grid: PIL.Image.Image = image_grid(rows, labels)
        grid.save(args.output_dir / filename)
        print(args.output_dir / filename)
    return 0


if __name__ == "__main__":
    sys.exit(main())
