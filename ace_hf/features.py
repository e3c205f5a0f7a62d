"""`extract_features`: ACE embeddings for an image file or a folder of images, a global vector and a patch map per
image, written as .npy pairs or one safetensors file. Its command line is `ace-hf extract-features`
(`ace_hf.commands.extract_features`, which says what is written where).

Images go through the model's image processor directly (not PIL's 8-bit RGB conversion), so 16-bit X-rays keep
their full range. Files that cannot be read are skipped (`ace_hf.image_io.load_or_skip`), counted and named at
the end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.numpy import save_file
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel
from transformers.image_processing_utils import BaseImageProcessor

from .arguments import check_results_folder, check_size, parse_size, read_model_config, resolve_device
from .image_io import decode_image, find_images, load_or_skip, readable_suffixes
from .runs import normal_file_permissions

if TYPE_CHECKING:
    from .commands.extract_features import FeatureExtractionArguments

logger = logging.getLogger(__name__)

SKIPPED_NAMES_SHOWN = 5
# What an earlier extraction left in --output, per --format (glob patterns).
RESULTS = {
    "npy": ("**/*.global.npy", "**/*.patch.npy"),
    "safetensors": ("features.safetensors", "features_index.json"),
}


@dataclass
class ExtractionSummary:
    """Which images got features (names relative to --input) and which were skipped ("path (reason)")."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def processor_overrides(args: FeatureExtractionArguments) -> dict[str, Any]:
    """The processor settings given as arguments (left-out ones keep the saved values)."""
    given = {"size": None if args.size is None else parse_size(args.size), "resize_mode": args.resize_mode}
    return {key: value for key, value in given.items() if value is not None}


def load_pixels(processor: BaseImageProcessor, path: Path) -> torch.Tensor:
    """One image as model input [num_channels, H, W]; DICOM is read with its LUTs applied, the rest by the
    processor's own windowing (8-bit, 16-bit and float images by bit depth)."""
    return processor(decode_image(path), return_tensors="pt")["pixel_values"][0]


def extract_features(args: FeatureExtractionArguments) -> ExtractionSummary:
    """Embed every image of `args.input` and write the features to `args.output`.

    Raises, before the model loads (a mistake should cost one line, not a load and a traceback): OutputDirError
    for an --output holding earlier features or unusable, ModelSourceError for a model whose config cannot be
    read, SizeError for a --size off the model's token stride.
    """
    check_results_folder(args.output, RESULTS[args.format], "--output", args.overwrite_output_dir)
    config = read_model_config(
        args.model_name_or_path, "--model_name_or_path", trust_remote_code=args.trust_remote_code
    )
    if args.size is not None and hasattr(config, "token_stride"):
        check_size(parse_size(args.size), config.token_stride)
    model = AutoModel.from_pretrained(
        args.model_name_or_path, config=config, trust_remote_code=args.trust_remote_code
    )
    device = resolve_device(args.device)
    model = model.to(device).eval()
    # Overrides go through the processor's __init__, so a bad size fails here, not as a skip of every file.
    processor = AutoImageProcessor.from_pretrained(
        args.model_name_or_path, trust_remote_code=args.trust_remote_code, **processor_overrides(args)
    )

    summary = ExtractionSummary()
    paths = find_images([args.input])
    if not paths:
        logger.error(f"No images found at {args.input} (suffixes: {', '.join(readable_suffixes())}).")
        return summary
    root = args.input if args.input.is_dir() else args.input.parent
    features: dict[str, np.ndarray] = {}  # safetensors format: written at the end
    index: dict[str, str] = {}  # safetensors key -> image file, relative to --input

    with torch.no_grad(), tqdm(total=len(paths), desc="Extracting", unit="image") as progress:
        for start in range(0, len(paths), args.batch_size):
            batch = paths[start : start + args.batch_size]
            names, pixels = [], []
            for position, path in enumerate(batch, start):
                loaded, reason = load_or_skip(path, position, partial(load_pixels, processor))
                if loaded is None:
                    summary.skipped.append(reason)
                else:
                    pixels.append(loaded)
                    names.append(path.relative_to(root).as_posix())
            if pixels:
                outputs = model(pixel_values=torch.stack(pixels).to(device))
                global_embeddings = outputs.pooler_output.float().cpu().numpy()
                # contiguous: safetensors writes an array's raw buffer, whatever its strides
                patch_maps = outputs.patch_embeddings.float().cpu().contiguous().numpy()
                for name, global_embedding, patch_map in zip(
                    names, global_embeddings, patch_maps, strict=True
                ):
                    arrays = {f"{name}.global": global_embedding, f"{name}.patch": patch_map}
                    if args.format == "npy":
                        (args.output / name).parent.mkdir(parents=True, exist_ok=True)
                        for key, array in arrays.items():
                            np.save(args.output / f"{key}.npy", array)
                    else:
                        features.update(arrays)
                        index.update(dict.fromkeys(arrays, name))
                summary.written += names
            progress.update(len(batch))

    if args.format == "safetensors" and features:
        metadata = {"model": str(args.model_name_or_path)}
        save_file(features, args.output / "features.safetensors", metadata=metadata)
        (args.output / "features_index.json").write_text(json.dumps(index, indent=2))
        normal_file_permissions(args.output, ["features.safetensors"])  # safetensors writes 0600
    logger.info(f"Wrote features of {len(summary.written)} image(s) to {args.output}.")
    if summary.skipped:
        shown = "\n  ".join(summary.skipped[:SKIPPED_NAMES_SHOWN]) + (
            "\n  ..." if len(summary.skipped) > SKIPPED_NAMES_SHOWN else ""
        )
        logger.warning(f"Skipped {len(summary.skipped)} unreadable file(s):\n  {shown}")
    return summary
