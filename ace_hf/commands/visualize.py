"""`ace-hf visualize`: what ACE encoders learned, as pictures: PCA colours and query similarity of their patch
embeddings (`ace_hf.visualize.visualize`).

    ace-hf visualize --model_name_or_path outputs/ace-pretrain --heldout 4 --output_dir outputs/vis
    ace-hf visualize --model_name_or_path outputs/ace-pretrain org/ace-vit-b --images xrays/ \\
        --query 200 150 --random_init --output_dir outputs/vis

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
An --output_dir that already holds the pictures is refused unless --overwrite_output_dir; a missing model folder,
a --size or --query that does not fit is one `error:` line before any model loads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..arguments import ModelSourceError, SizeError, check_model_source, parse_arguments, run_or_exit
from ..runs import OutputDirError


@dataclass
class VisualizationArguments:
    """Which encoders to picture, on which images, and where the pictures go."""

    model_name_or_path: list[str] = field(metadata={"help": "one or more encoders (folders or Hub ids)"})
    output_dir: Path = field(metadata={"help": "folder for pca.png and similarity.png"})
    images: list[Path] | None = field(
        default=None, metadata={"help": "image files or folders (searched recursively)"}
    )
    heldout: int = field(default=4, metadata={"help": "held-out radiographs to render without --images"})
    size: int | None = field(
        default=None,
        metadata={"help": "inference size in pixels (default: the held-out render size or the processor's)"},
    )
    query: list[float] | None = field(
        default=None,
        metadata={"help": "query pixel ROW COL in the first image (at --size; default: the centre)"},
    )
    random_init: bool = field(
        default=False, metadata={"help": "add the first model's architecture, untrained"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the --random_init weights"})
    batch_size: int = field(default=16, metadata={"help": "images per forward pass"})
    device: str | None = field(
        default=None, metadata={"help": "where the models run (default: cuda when available, else cpu)"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace the pictures an earlier run left in --output_dir"}
    )

    def __post_init__(self) -> None:
        # Paths from a .json/.yaml file arrive as strings.
        self.output_dir = Path(self.output_dir)
        self.images = None if self.images is None else [Path(path) for path in self.images]
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path needs at least one encoder")
        for name in self.model_name_or_path:
            check_model_source(name, "--model_name_or_path")
        for path in self.images or []:
            if not path.exists():
                raise ValueError(f"--images {str(path)!r} does not exist")
        if self.images is None and self.heldout < 1:
            raise ValueError("--heldout must be at least 1")
        if self.size is not None and self.size < 1:
            raise ValueError("--size must be positive")
        if self.query is not None and len(self.query) != 2:
            raise ValueError(f"--query takes two numbers, ROW COL, got {self.query}")


def main(argv: list[str] | None = None) -> int:
    """Draw both pictures and print their paths; returns the exit status (1 when no image was found)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_arguments(VisualizationArguments, argv, description=__doc__)
    # Imported once the arguments hold: it loads torch, which `--help` and argument mistakes need not wait for.
    from ..visualize import GeometryError, visualize

    written = run_or_exit(
        lambda: visualize(args), (OutputDirError, ModelSourceError, SizeError, GeometryError)
    )
    for path in written:
        print(path)
    return 0 if written else 1
