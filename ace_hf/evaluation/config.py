"""What the evaluation suite renders and runs: one dataclass, shared by the suite, the few-shot tasks and the
command line (every field is an option of `ace_hf.evaluation.run`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvaluationConfig:
    """What the suite renders and runs. Defaults take a few minutes for the tiny preset on a 2-core CPU.

    Args:
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

    render_size: int | None = None
    num_anatomy_images: int = 64
    num_findings_images: int = 120
    crop_fraction: float = 0.7
    matching_images: int | None = None
    min_label_fraction: float = 0.5
    segmentation_shots: list[int] = field(default_factory=lambda: [1, 5, 20])
    classification_shots: list[int] = field(default_factory=lambda: [10, 40])
    test_fraction: float = 0.375
    repeats: int = 2
    probe_steps: int = 300
    probe_learning_rate: float = 1e-2
    finetune_steps: int = 40
    finetune_learning_rate: float = 1e-4
    finetune_batch_size: int = 4
    finetune_repeats: int = 1
    batch_size: int = 16
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
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
