"""What the evaluation suite renders and runs: one dataclass, shared by the suite, the few-shot tasks and the
command line (every field is an option of `ace-hf evaluate`, `ace_hf.evaluation.cli`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ..arguments import option_field

# The values of the size fields left unset (None): the full suite, and --quick's smaller one.
FULL_SUITE: dict[str, Any] = {
    "num_anatomy_images": 64,
    "num_findings_images": 120,
    "segmentation_shots": [1, 5, 20],
    "classification_shots": [10, 40],
    "repeats": 2,
    "finetune_steps": 40,
}
QUICK_SUITE: dict[str, Any] = {
    "num_anatomy_images": 24,
    "num_findings_images": 48,
    "segmentation_shots": [1, 5],
    "classification_shots": [10],
    "repeats": 1,
    "finetune_steps": 0,
}


class ShotsError(ValueError):
    """A few-shot k that the training renders cannot supply: found before anything is rendered."""


@dataclass
class EvaluationConfig:
    """What the suite renders and runs (its time, measured on a 2-core CPU: `ace_hf.evaluation.cli`). Each field's
    help says what it sets."""

    quick: bool = field(
        default=False,
        metadata={
            "help": "A quick look: 24 + 48 renders instead of 64 + 120, k = 1, 5 (segmentation) and 10 "
            "(findings), one draw each and no fine-tuning, for the options not set. It trades precision: "
            "matching over 24 renders moves by 0.02 to 0.04 with the crops' seed (docs/results.md), each few-shot "
            "score rests on one draw, and the fine-tuning rows are missing."
        },
    )
    render_size: int | None = option_field(
        "Side of the held-out renders in pixels (unset: the model's pretraining image, grid_size * token_stride, "
        "so that one token covers the same anatomy as in pretraining).",
        None,
    )
    num_anatomy_images: int | None = option_field(
        "Held-out renders for property analysis and segmentation (unset: 64, or 24 with --quick)."
    )
    num_findings_images: int | None = option_field(
        "Held-out renders with findings (unset: 120, or 48 with --quick)."
    )
    crop_fraction: float = option_field(
        "Side of the random crops of the property analysis, as a fraction of the render.", 0.7
    )
    matching_images: int | None = option_field(
        "Renders used for anatomical and landmark matching, all ordered pairs (unset: all of "
        "--num_anatomy_images). With 24 the crops of two seeds moved the scores by 0.02 to 0.04 (docs/results.md).",
        None,
    )
    min_label_fraction: float = option_field(
        "A patch gets a structure label when that structure covers at least this fraction of its pixels (else "
        "it is ignored).",
        0.5,
    )
    segmentation_shots: list[int] | None = option_field(
        "k of few-shot segmentation (unset: 1 5 20, or 1 5 with --quick)."
    )
    classification_shots: list[int] | None = option_field(
        "k of few-shot findings (unset: 10 40, or 10 with --quick)."
    )
    test_fraction: float = option_field("Share of the renders held back as the few-shot test set.", 0.375)
    repeats: int | None = option_field(
        "Draws of the k training renders per task and k (unset: 2, or 1 with --quick)."
    )
    probe_steps: int = option_field("Full-batch AdamW steps of the linear heads on frozen features.", 300)
    probe_learning_rate: float = option_field("Learning rate of the linear heads.", 1e-2)
    finetune_steps: int | None = option_field(
        "End-to-end fine-tuning steps, 0 skips it (unset: 40, or 0 with --quick)."
    )
    finetune_learning_rate: float = option_field(
        "Encoder learning rate of end-to-end fine-tuning (the head gets 10x).", 1e-4
    )
    finetune_batch_size: int = option_field("Renders per fine-tuning step.", 4)
    finetune_repeats: int = option_field(
        "How many of the --repeats draws are also fine-tuned (it costs far more than a linear head).", 1
    )
    batch_size: int = option_field("Images per forward pass when extracting features.", 16)
    seed: int = option_field("Seed of the crops, the few-shot draws and the heads' initialization.", 0)
    cache_dir: str | None = option_field(
        "Folder of the cached held-out renders (unset: HF_DATASETS_CACHE/ace_hf).", None
    )

    def __post_init__(self) -> None:
        for name, value in (QUICK_SUITE if self.quick else FULL_SUITE).items():
            if getattr(self, name) is None:
                setattr(self, name, copy.copy(value))
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"EvaluationConfig.crop_fraction={self.crop_fraction}: must be in (0, 1]")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"EvaluationConfig.test_fraction={self.test_fraction}: must be in (0, 1)")
        if self.matching_images is None:
            if self.num_anatomy_images < 2:
                raise ValueError(
                    f"EvaluationConfig.num_anatomy_images={self.num_anatomy_images}: matching needs at least 2 renders"
                )
            self.matching_images = self.num_anatomy_images
        if self.matching_images < 2 or self.matching_images > self.num_anatomy_images:
            raise ValueError(
                f"EvaluationConfig.matching_images={self.matching_images}: needs 2 <= it <= "
                f"num_anatomy_images={self.num_anatomy_images}"
            )


def num_test_renders(num_images: int, config: EvaluationConfig) -> int:
    """How many of the first renders are held back as the few-shot test set."""
    return max(1, round(num_images * config.test_fraction))


def check_shots(config: EvaluationConfig) -> None:
    """ShotsError naming the option when a few-shot k exceeds the training renders the suite will have (the
    renders less the test share): said before the renders are made, not after the matching."""
    for option, shots, num_images in (
        ("segmentation_shots", config.segmentation_shots, config.num_anatomy_images),
        ("classification_shots", config.classification_shots, config.num_findings_images),
    ):
        pool = num_images - num_test_renders(num_images, config)
        too_many = [k for k in shots if not 1 <= k <= pool]
        if too_many:
            raise ShotsError(
                f"--{option} {' '.join(map(str, too_many))}: k must be 1 to {pool}, the training renders of "
                f"{num_images} less the --test_fraction {config.test_fraction} held back"
            )
