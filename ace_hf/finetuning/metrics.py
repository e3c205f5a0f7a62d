"""Validation scores of a fine-tuning epoch (with the offline metric modules of `ace_hf.metrics`), and which
epoch is the best.

Training-side module: never imported by the files that travel to the Hub.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..metrics import load_metric, mean_iou, roc_auc


def classification_metrics(
    logits: torch.Tensor, references: torch.Tensor, names: list[str]
) -> dict[str, Any]:
    """Accuracy and balanced accuracy; ROC-AUC of the second class too when there are two."""
    predictions = logits.argmax(-1)
    metrics = {
        **load_metric("accuracy").compute(predictions=predictions, references=references),
        **load_metric("balanced_accuracy").compute(predictions=predictions, references=references),
    }
    if len(names) == 2:
        metrics |= roc_auc(logits.softmax(-1)[:, 1], references, "binary")
    return metrics


def multi_label_metrics(logits: torch.Tensor, references: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Macro ROC-AUC over the labels, and each label's."""
    scores = roc_auc(logits.sigmoid(), references, "multilabel")
    per_label = scores.pop("per_label_roc_auc", [math.nan] * len(names))
    return scores | {"per_label_roc_auc": dict(zip(names, per_label, strict=True))}


def segmentation_metrics(
    predictions: torch.Tensor, references: torch.Tensor, names: list[str], ignore_index: int
) -> dict[str, Any]:
    """Mean IoU (and pixel accuracies) at the model's input resolution, where the masks were resized."""
    scores = mean_iou(predictions, references, len(names), ignore_index)
    per_category = {name: float(iou) for name, iou in zip(names, scores.pop("per_category_iou"), strict=True)}
    scores.pop("per_category_accuracy")
    return {key: float(value) for key, value in scores.items()} | {"per_category_iou": per_category}


def task_metrics(
    task_kind: str, outputs: torch.Tensor, references: torch.Tensor, names: list[str], ignore_index: int
) -> dict[str, Any]:
    """The scores of one kind of task: `outputs` are logits, or label maps for segmentation."""
    if task_kind == "segmentation":
        return segmentation_metrics(outputs, references, names, ignore_index)
    if task_kind == "multi_label":
        return multi_label_metrics(outputs, references, names)
    return classification_metrics(outputs, references, names)


def improved(metrics: dict[str, Any], best: dict[str, Any], metric: str) -> bool:
    """Is this epoch better than the best so far (empty: none yet)? A tie goes to the lower validation loss
    (accuracies saturate on small validation sets); NaN is never better than a number."""
    if not best:
        return True

    def rank(results: dict[str, Any]) -> tuple[bool, float, float]:
        value = results[metric] * (-1 if metric.endswith("loss") else 1)
        return not math.isnan(value), 0.0 if math.isnan(value) else value, -results["loss"]

    return rank(metrics) > rank(best)


def format_metrics(metrics: dict[str, Any]) -> str:
    """The scalar metrics on one log line."""
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float))
