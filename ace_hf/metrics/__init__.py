"""Offline `evaluate` metrics shipped with ace-hf.

`evaluate.load("roc_auc")` fetches the metric script from the Hugging Face Hub, so evaluation breaks on
machines without network access (clusters, air-gapped hospitals). The scripts in this folder are
loaded from their file path instead: `evaluate` copies them into its modules cache and never contacts the
Hub. Each script imports only numpy, datasets and evaluate, because `evaluate` loads it standalone (no
relative imports).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import evaluate

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES: tuple[str, ...] = ("accuracy", "balanced_accuracy", "mean_iou", "roc_auc")

__all__ = ["METRICS_DIR", "METRIC_NAMES", "load_metric", "mean_iou", "metric_path", "roc_auc"]


def metric_path(name: str) -> Path:
    """Absolute path of the shipped script for `name` (what `evaluate.load` needs to stay offline)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; available metrics: {', '.join(METRIC_NAMES)}")
    return METRICS_DIR / f"{name}.py"


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load a shipped metric by name, without network; `kwargs` go to `evaluate.load` (e.g. `config_name`)."""
    return evaluate.load(str(metric_path(name)), **kwargs)


def roc_auc(scores: Any, references: Any, config_name: str = "multilabel") -> dict[str, Any]:
    """ROC-AUC of scores against 0/1 references ("binary": [N] scores; "multilabel": [N, F], macro plus
    `per_label_roc_auc`), or NaN with a warning when a label has a single class in the references."""
    try:
        return load_metric("roc_auc", config_name=config_name).compute(
            prediction_scores=scores.tolist(), references=references.int().tolist()
        )
    except ValueError as error:
        logger.warning(f"ROC-AUC is undefined on these references: {error}")
        return {"roc_auc": math.nan}


def mean_iou(predictions: Any, references: Any, num_labels: int, ignore_index: int) -> dict[str, Any]:
    """Mean IoU, pixel accuracies and per-class IoU and accuracy of label maps [N, H, W] (CPU tensors), pixels
    whose reference is `ignore_index` left out."""
    return load_metric("mean_iou").compute(
        predictions=predictions.numpy(),
        references=references.numpy(),
        num_labels=num_labels,
        ignore_index=ignore_index,
    )
