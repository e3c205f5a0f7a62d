"""The options of an evaluation beyond what the suite runs (`EvaluationConfig`): which encoders, which baseline
columns, where the results go. Plain data, so that `ace-hf evaluate --help` does not load torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..arguments import check_model_source

# The pixel baseline's column name, and the default radius (in tokens) of its matching descriptor's context.
BASELINE_COLUMN = "pixel baseline"
CONTEXT_RADIUS = 4


@dataclass
class EvaluationArguments:
    """Which encoders to compare and where the results go; what the suite runs is `EvaluationConfig`."""

    model_name_or_path: list[str] = field(
        default_factory=list, metadata={"help": "ACE encoders: folders, Hub ids or pretraining checkpoints."}
    )
    names: list[str] = field(default_factory=list, metadata={"help": "Column names (default: the paths)."})
    random_init: bool = field(
        default=False, metadata={"help": "Also evaluate the first model's architecture at random init."}
    )
    random_init_seeds: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Random-init columns of the first model's architecture for these seeds (the weights a "
            "from-scratch `ace-hf pretrain --seed s` run starts from under the same torch version), all on the same "
            "crops and draws (--seed): paired comparisons over several seeds."
        },
    )
    output_dir: str = field(
        default="outputs/evaluation", metadata={"help": "Folder of results.json and results.md."}
    )
    device: str | None = field(
        default=None, metadata={"help": "Device of the encoders (default: cuda when available, else cpu)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace the results an earlier evaluation left in --output_dir."}
    )
    pixel_baseline: bool = field(
        default=True,
        metadata={
            "help": f'A "{BASELINE_COLUMN}" column (no model, 30 to 45 s here): every metric on each token\'s '
            "pixels and its neighbourhood's, the findings on the image pooled to 16 x 16 "
            "(ace_hf.evaluation.baseline). --no_pixel_baseline leaves it out."
        },
    )
    pixel_context_radius: int = field(
        default=CONTEXT_RADIUS,
        metadata={"help": "Tokens around each token in the pixel baseline's matching descriptor (radius)."},
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ValueError("--model_name_or_path is required (one or more encoders)")
        if self.names and len(self.names) != len(self.model_name_or_path):
            raise ValueError(f"--names needs one name per --model_name_or_path, got {self.names}")
        for path in self.model_name_or_path:
            check_model_source(path, "--model_name_or_path")
        if self.pixel_baseline and BASELINE_COLUMN in (self.names or self.model_name_or_path):
            raise ValueError(
                f'--names "{BASELINE_COLUMN}" is the pixel baseline\'s column: name it otherwise'
            )
        if not 0 <= self.pixel_context_radius <= 7:
            raise ValueError(f"--pixel_context_radius {self.pixel_context_radius}: must be 0 to 7")
