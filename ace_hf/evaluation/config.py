"""What the evaluation suite renders and runs: one dataclass, shared by the suite, the few-shot tasks and the
command line (every field is an option of `ace_hf.evaluation.run`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

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


def _sized(help_text: str) -> Any:
    """A field whose default comes from FULL_SUITE, or QUICK_SUITE with --quick."""
    return field(default=None, metadata={"help": help_text})


@dataclass
class EvaluationConfig:
    """What the suite renders and runs (its time, measured on a 2-core CPU: `ace_hf.evaluation.run`).

    Args:
        quick: the smaller suite of QUICK_SUITE for the fields left unset (None), FULL_SUITE otherwise.
        render_size: side of the held-out renders in pixels; None: the model's pretraining image
            (`grid_size * token_stride`), so that one token covers the same anatomy as in pretraining.
        num_anatomy_images: held-out renders for property analysis and segmentation.
        num_findings_images: held-out renders with findings for the global task.
        crop_fraction: side of the random crops of the property analysis, as a fraction of the render.
        matching_images: renders used for anatomical and landmark matching (all ordered pairs); None: all
            `num_anatomy_images`. Fewer renders make matching depend on which crops were drawn: with 24 (the
            default until 2026-11-26) the crops of two seeds moved the scores by 0.02 to 0.04 (docs/results.md).
        min_label_fraction: a patch gets a structure label when that structure covers at least this
            fraction of its pixels (else it is ignored).
        segmentation_shots, classification_shots: k labelled radiographs of the few-shot tasks.
        test_fraction: share of the renders held back as the few-shot test set.
        repeats: draws of the k training radiographs per (task, k); results are averaged.
        probe_steps, probe_learning_rate: full-batch AdamW training of the linear heads on frozen features.
        finetune_steps, finetune_learning_rate, finetune_batch_size: end-to-end fine-tuning (the head gets
            10x the encoder's learning rate). `finetune_steps=0` skips fine-tuning.
        finetune_repeats: how many of the `repeats` draws are also fine-tuned (fine-tuning costs far more
            than a linear head on cached features).
        batch_size: images per forward pass when extracting features.
        seed: seed of crops, few-shot draws and head initialization.
    """

    quick: bool = field(
        default=False,
        metadata={
            "help": "A quick look: 24 + 48 renders instead of 64 + 120, k = 1, 5 (segmentation) and 10 "
            "(findings), one draw each and no fine-tuning, for the options not set. It trades precision: "
            "matching over 24 renders moves by 0.02 to 0.04 with the crops' seed (docs/results.md), each few-shot "
            "score rests on one draw, and the fine-tuning rows are missing."
        },
    )
    render_size: int | None = None
    num_anatomy_images: int | None = _sized(
        "Held-out renders for property analysis and segmentation (unset: 64, or 24 with --quick)."
    )
    num_findings_images: int | None = _sized(
        "Held-out renders with findings (unset: 120, or 48 with --quick)."
    )
    crop_fraction: float = 0.7
    matching_images: int | None = None
    min_label_fraction: float = 0.5
    segmentation_shots: list[int] | None = _sized(
        "k of few-shot segmentation (unset: 1 5 20, or 1 5 with --quick)."
    )
    classification_shots: list[int] | None = _sized(
        "k of few-shot findings (unset: 10 40, or 10 with --quick)."
    )
    test_fraction: float = 0.375
    repeats: int | None = _sized(
        "Draws of the k training renders per task and k (unset: 2, or 1 with --quick)."
    )
    probe_steps: int = 300
    probe_learning_rate: float = 1e-2
    finetune_steps: int | None = _sized(
        "End-to-end fine-tuning steps, 0 skips it (unset: 40, or 0 with --quick)."
    )
    finetune_learning_rate: float = 1e-4
    finetune_batch_size: int = 4
    finetune_repeats: int = 1
    batch_size: int = 16
    seed: int = 0
    cache_dir: str | None = None

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
