"""Few-shot tasks from k labelled radiographs: a linear head on frozen embeddings ("linear") and full
fine-tuning ("finetune"), scored on held-out test renders.

- dense: anatomy segmentation with a linear head on frozen patch embeddings; mean IoU;
- global: findings inserted into the CT before rendering (`ace_hf.synthetic.findings`: nodule, pleural
  effusion, cardiomegaly), a linear probe on the standardized global embedding; macro ROC-AUC.

Both run through one loop (`run_fewshot`), so draws, seeds and fine-tuning are the same for every task; a
task only says what it trains on and how it is scored (`FewShotTask`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..configuration_ace import AceConfig
from ..metrics import mean_iou, roc_auc
from ..modeling_ace import AceForImageClassification, AceForSemanticSegmentation, AceModel
from ..presets_ace import IGNORE_INDEX
from ..sampling import draw
from .config import EvaluationConfig, num_test_renders
from .heldout import HeldOutData, encode, normalize_pixels

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
HeadLogits = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class FewShotTask:
    """What one few-shot task trains and how it is scored. Rows are renders: the first
    `num_test_renders(len(images), config)` are the test set, the rest the pool of the k training renders."""

    name: str  # "segmentation" or "classification": the `<name>_shots` option in error messages
    metric: str  # suffix of the result keys, e.g. "miou" in "linear_k5_miou"
    shots: list[int]
    seed_offset: int  # keeps the draws of two tasks apart when they share a k
    images: torch.Tensor  # [N, 1, S, S] windowed renders, what fine-tuning sees
    labels: torch.Tensor  # fine-tuning targets, and the references of `score`
    features: torch.Tensor  # frozen embeddings of `images`, what the linear head sees
    probe_targets: torch.Tensor  # the linear head's targets: `labels` or a cheaper stand-in
    probe_loss: Loss
    build_model: Callable[[], AceForSemanticSegmentation | AceForImageClassification]  # head: `.classifier`
    head_logits: HeadLogits  # head, features -> logits shaped like the task model's own
    score: Callable[[torch.Tensor, torch.Tensor], float]  # test logits, test labels -> metric
    valid: Callable[[torch.Tensor], bool] | None = None  # which draws of training indices the task accepts


def run_fewshot(
    task: FewShotTask, encoder: AceModel, config: EvaluationConfig, desc: str
) -> dict[str, float]:
    """The loop of every few-shot task: for each k and repeat, draw k training renders, train a fresh task
    model's linear head on their frozen embeddings and score it on the test renders; in the first
    `finetune_repeats` repeats, also fine-tune that model end to end from `encoder` (a copy: `encoder` is
    left untouched; an encoder without weights is not fine-tuned). Returns the mean score of each (mode, k).
    A progress bar `desc` counts the runs (a linear head or a fine-tuning each) and says which one is under
    way."""
    num_test = num_test_renders(len(task.images), config)
    pool = len(task.images) - num_test
    test_features, test_labels = task.features[:num_test], task.labels[:num_test]
    for k in task.shots:
        if k > pool:
            raise ValueError(f"{task.name}_shots k={k} exceeds the {pool} training renders")
    # An encoder without weights (the pixel baseline) has nothing to fine-tune: linear heads only.
    trainable = next(encoder.parameters(), None) is not None
    finetuned_repeats = (
        min(config.finetune_repeats, config.repeats) if config.finetune_steps and trainable else 0
    )
    progress = tqdm(total=len(task.shots) * (config.repeats + finetuned_repeats), desc=desc, unit="run")
    results: dict[str, float] = {}
    for k in task.shots:
        linear, finetuned = [], []
        for repeat in range(config.repeats):
            progress.set_postfix_str(f"k={k}, draw {repeat + 1}: linear head")
            generator = torch.Generator().manual_seed(config.seed * 1000 + 10 * k + repeat + task.seed_offset)
            chosen = num_test + draw(pool, k, generator, task.valid)
            torch.manual_seed(config.seed + repeat)
            model = task.build_model()
            train_full_batch(
                model.classifier, task.features[chosen], task.probe_targets[chosen], task.probe_loss,
                config.probe_steps, config.probe_learning_rate,
            )  # fmt: skip
            with torch.no_grad():
                linear.append(task.score(task.head_logits(model.classifier, test_features), test_labels))
            progress.update(1)
            if repeat < finetuned_repeats:
                progress.set_postfix_str(f"k={k}, draw {repeat + 1}: fine-tuning")
                logits = _finetuned_logits(
                    model, encoder, task.images[chosen], task.labels[chosen], task.images[:num_test], config,
                    generator,
                )  # fmt: skip
                finetuned.append(task.score(logits, test_labels))
                progress.update(1)
        results[f"linear_k{k}_{task.metric}"] = float(np.mean(linear))
        if finetuned:
            results[f"finetune_k{k}_{task.metric}"] = float(np.mean(finetuned))
    progress.close()
    return results


def segmentation_fewshot(
    encoder: AceModel, data: HeldOutData, config: EvaluationConfig, desc: str = "few-shot segmentation"
) -> dict[str, float]:
    """Anatomy segmentation (background + groups) from k labelled radiographs: a linear head on frozen patch
    embeddings ("linear") and full fine-tuning ("finetune"); mean IoU on the held-out test renders."""
    num_labels = len(data.info["anatomy_labels"])
    dense, _ = encode(encoder, data.images, config.batch_size, desc=f"{desc}: encoding")
    step = max(1, encoder.config.token_stride // 4)

    def head_logits(head: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
        """Upsampled to the renders, as the task model's own logits are."""
        return F.interpolate(
            head(features), size=data.anatomy.shape[-2:], mode="bilinear", align_corners=False
        )

    task = FewShotTask(
        name="segmentation",
        metric="miou",
        shots=config.segmentation_shots,
        seed_offset=0,
        images=data.images,
        labels=data.anatomy,
        features=dense,
        probe_targets=data.anatomy[:, step // 2 :: step, step // 2 :: step],
        probe_loss=segmentation_loss,
        build_model=lambda: AceForSemanticSegmentation(_task_config(encoder.config, num_labels=num_labels)),
        head_logits=head_logits,
        score=lambda logits, masks: segmentation_scores(logits.argmax(1), masks, num_labels),
    )
    return run_fewshot(task, encoder, config, desc)


def classification_fewshot(
    encoder: AceModel, data: HeldOutData, config: EvaluationConfig, desc: str = "few-shot findings"
) -> dict[str, float]:
    """Findings (multi-label) from k labelled radiographs: a linear probe on the frozen global embedding
    (logistic regression on standardized features) and full fine-tuning; macro ROC-AUC on the test renders."""
    labels = data.findings
    num_test = num_test_renders(len(data.images), config)
    _, pooled = encode(encoder, data.images, config.batch_size, desc=f"{desc}: encoding")
    mean, std = pooled[num_test:].mean(0), pooled[num_test:].std(0).clamp(min=1e-6)
    train_labels = labels[num_test:]

    def both_classes(chosen: torch.Tensor) -> bool:
        column_sums = train_labels[chosen].sum(0)
        return bool(((column_sums > 0) & (column_sums < len(chosen))).all())

    def build_model() -> AceForImageClassification:
        return AceForImageClassification(
            _task_config(
                encoder.config, num_labels=labels.shape[1], problem_type="multi_label_classification"
            )
        )

    task = FewShotTask(
        name="classification",
        metric="auc",
        shots=config.classification_shots,
        seed_offset=500,
        images=data.images,
        labels=labels,
        features=(pooled - mean) / std,
        probe_targets=labels,
        probe_loss=F.binary_cross_entropy_with_logits,
        build_model=build_model,
        head_logits=lambda head, features: head(features),
        score=lambda logits, references: float(roc_auc(logits, references)["roc_auc"]),
        valid=both_classes,
    )
    return run_fewshot(task, encoder, config, desc)


def segmentation_scores(predictions: torch.Tensor, references: torch.Tensor, num_labels: int) -> float:
    """Mean IoU of label maps [N, H, W] through the project's `mean_iou` metric module."""
    return float(mean_iou(predictions, references, num_labels, IGNORE_INDEX)["mean_iou"])


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy of token logits upsampled to the label maps (the probe trains on label maps
    subsampled to 4 pixels per token side: the same optimum, 16x less work than at full resolution)."""
    logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)


def train_full_batch(
    head: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: Loss, steps: int, lr: float
) -> None:
    """Full-batch AdamW training of a head on frozen features (few-shot sets are small)."""
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    head.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(head(inputs), targets).backward()
        optimizer.step()
    head.eval()


def _task_config(config: AceConfig, **task: Any) -> AceConfig:
    """The encoder's config for a task head (the encoder's own config object is left untouched)."""
    task_config = copy.deepcopy(config)
    for key, value in task.items():
        setattr(task_config, key, value)
    return task_config


def _finetuned_logits(
    task: torch.nn.Module,
    encoder: AceModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    config: EvaluationConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Start a task model's encoder from `encoder`, fine-tune it end to end, and predict the test images."""
    task.ace.load_state_dict(encoder.state_dict())
    task.to(encoder.device)
    _finetune(
        task, images, labels, config.finetune_steps, config.finetune_learning_rate,
        config.finetune_batch_size, generator,
    )  # fmt: skip
    return _predict(task, test_images, config.batch_size)


def _finetune(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """End-to-end AdamW fine-tuning of a task model; its head learns 10x faster than the encoder."""
    head = [p for name, p in model.named_parameters() if not name.startswith("ace.")]
    encoder = [p for name, p in model.named_parameters() if name.startswith("ace.")]
    optimizer = torch.optim.AdamW(
        [{"params": encoder, "lr": lr}, {"params": head, "lr": 10 * lr}], weight_decay=0.05
    )
    model.train()
    device = model.device
    for _ in tqdm(range(steps), desc="fine-tuning", unit="step", leave=False):
        batch = torch.randperm(len(images), generator=generator)[:batch_size]
        pixels = normalize_pixels(images[batch], model.config).to(device)
        loss = model(pixel_values=pixels, labels=labels[batch].to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def _predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits of the test images, batch by batch, on the CPU."""
    model.eval()
    logits = [
        model(
            pixel_values=normalize_pixels(images[s : s + batch_size], model.config).to(model.device)
        ).logits.cpu()
        for s in range(0, len(images), batch_size)
    ]
    return torch.cat(logits).float()
