"""`ace-hf extract-features`: ACE embeddings for an image file or a folder of images, a global vector and a patch
map per image (`ace_hf.features.extract_features`).

    ace-hf extract-features --model_name_or_path org/ace-vit-b --input xrays/ --output features/
    ace-hf extract-features ... --size 512x640 --resize_mode pad   # another input size

--size (N or HxW, multiples of the model's token stride) and --resize_mode ("resize" stretches, "pad" keeps the
aspect ratio with black borders, "shortest_edge_crop" keeps it by center cropping) override the processor's own;
the patch map's h x w is the size divided by the stride.

Outputs, for an image `<relative name>` (its path under --input, extension included):
- npy: `<relative name>.global.npy` [C] and `<relative name>.patch.npy` [C, h, w], mirroring the input folders;
- safetensors: one `features.safetensors` with keys `<relative name>.global` / `.patch`, and
  `features_index.json` mapping each key to its image file (all features are held in memory until the end).

Images go through the model's image processor directly (not PIL's 8-bit RGB conversion), so 16-bit X-rays keep
their full range. Files that cannot be read are skipped (`ace_hf.image_io.load_or_skip`), counted and named at
the end.

An --output that already holds features is refused unless --overwrite_output_dir; a missing model folder, a
--size off the model's token stride or an unusable --output is one `error:` line before the model loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..arguments import (
    ModelSourceError,
    SizeError,
    check_model_source,
    parse_arguments,
    parse_size,
    run_or_exit,
)
from ..runs import OutputDirError


@dataclass
class FeatureExtractionArguments:
    """What to embed, with which model, and where the features go."""

    model_name_or_path: str = field(metadata={"help": "exported model folder or Hub model id"})
    input: Path = field(metadata={"help": "an image file, or a folder (searched recursively)"})
    output: Path = field(metadata={"help": "folder for the features"})
    format: Literal["npy", "safetensors"] = field(
        default="npy", metadata={"help": "one .npy pair per image, or one features.safetensors"}
    )
    batch_size: int = field(default=16, metadata={"help": "images per forward pass"})
    size: str | None = field(
        default=None, metadata={"help": "model input size, N or HxW pixels (default: the processor's own)"}
    )
    resize_mode: Literal["resize", "shortest_edge_crop", "pad"] | None = field(
        default=None,
        metadata={"help": "how images meet the size (default: the processor's own, normally resize)"},
    )
    device: str | None = field(
        default=None, metadata={"help": "where the model runs (default: cuda when available, else cpu)"}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "write over the features an earlier run left in --output (npy: features of images this run "
            "does not read stay)"
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "allow code stored with the model (ACE models load with the ace_hf classes either way)"
        },
    )

    def __post_init__(self) -> None:
        # Paths from a .json/.yaml file arrive as strings.
        self.input, self.output = Path(self.input), Path(self.output)
        check_model_source(self.model_name_or_path, "--model_name_or_path")
        if not self.input.exists():
            raise ValueError(f"--input {str(self.input)!r} does not exist")
        if self.batch_size < 1:
            raise ValueError("--batch_size must be at least 1")
        if self.size is not None:
            parse_size(self.size)  # a malformed size fails with the arguments, not after the model loads


def main(argv: list[str] | None = None) -> int:
    """Run the extraction; returns the exit status (1 when no image could be read). A mistake found after
    parsing exits with one `error:` line (status 1)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_arguments(FeatureExtractionArguments, argv, description=__doc__)
    # Imported once the arguments hold: it loads torch, which `--help` and argument mistakes need not wait for.
    from ..features import extract_features

    summary = run_or_exit(lambda: extract_features(args), (OutputDirError, ModelSourceError, SizeError))
    return 0 if summary.written else 1
