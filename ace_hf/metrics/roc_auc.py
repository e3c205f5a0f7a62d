"""ROC-AUC (binary and multilabel) in numpy, so that it loads offline and needs no scikit-learn.

The area is the Mann-Whitney U statistic normalised by the number of (positive, negative) pairs: the
probability that a random positive scores above a random negative, ties counting one half. Average ranks
make the ties exact, which is what the trapezoidal ROC curve gives too.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Area under the Receiver Operating Characteristic curve, computed with the rank-sum (Mann-Whitney) formula
with average ranks for ties. 1.0 means every positive scores above every negative, 0.5 is chance and 0.0 is a
perfectly reversed ranking.

Configurations:
    - `default` / `binary`: one 0/1 reference and one score per example.
    - `multilabel`: a 0/1 reference vector and a score vector per example (same length); the result is the
      unweighted (macro) mean of the per-label areas.
"""

_KWARGS_DESCRIPTION = """
Args:
    prediction_scores: scores, higher meaning more likely positive. Shape (n_samples,) for binary,
        (n_samples, n_labels) for multilabel.
    references: 0/1 labels with the same shape as `prediction_scores`.

Returns:
    roc_auc (`float`): the area (binary) or the macro mean over labels (multilabel).
    per_label_roc_auc (`list[float]`, multilabel only): the area for each label.

Raises:
    ValueError: when a label has only positives or only negatives (the area is undefined), when a reference
        is not 0/1, or when a score is not finite.

Examples:
    >>> roc_auc = evaluate.load("ace_hf/metrics/roc_auc.py")
    >>> roc_auc.compute(references=[1, 0, 1, 1, 0, 0], prediction_scores=[0.5, 0.2, 0.99, 0.3, 0.1, 0.7])
    {'roc_auc': 0.7777777777777778}
"""

_CITATION = """\
@article{hanley1982meaning,
  title={The meaning and use of the area under a receiver operating characteristic (ROC) curve},
  author={Hanley, James A. and McNeil, Barbara J.},
  journal={Radiology},
  volume={143},
  number={1},
  pages={29--36},
  year={1982}
}
"""

_CONFIGS = ("default", "binary", "multilabel")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2.0)[inverse.reshape(-1)]


def binary_roc_auc(references: np.ndarray, scores: np.ndarray, label: str = "") -> float:
    """Mann-Whitney AUC of one binary label; `label` names it in error messages."""
    references = np.asarray(references).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    where = f" for label {label}" if label else ""
    if references.shape != scores.shape:
        raise ValueError(f"references and prediction_scores differ in length{where}")
    if not np.isin(references, (0, 1)).all():
        raise ValueError(f"ROC-AUC needs 0/1 references{where}, got values {np.unique(references).tolist()}")
    if not np.isfinite(scores).all():
        raise ValueError(f"ROC-AUC needs finite prediction_scores{where}")
    positives = references == 1
    n_pos = int(positives.sum())
    n_neg = references.size - n_pos
    if n_pos == 0 or n_neg == 0:
        present = "positive" if n_pos else "negative"
        raise ValueError(
            f"ROC-AUC is undefined{where}: the references contain only one class ({n_pos + n_neg} {present} "
            "examples); it needs at least one positive and one negative example"
        )
    rank_sum = _average_ranks(scores)[positives].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RocAuc(evaluate.Metric):
    """Binary and multilabel ROC-AUC without scikit-learn."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in _CONFIGS:
            raise ValueError(f"Unknown roc_auc configuration {self.config_name!r}; choose one of {_CONFIGS}")
        if self.config_name == "multilabel":
            features = {
                "prediction_scores": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Sequence(datasets.Value("int32")),
            }
        else:
            features = {
                "prediction_scores": datasets.Value("float64"),
                "references": datasets.Value("int32"),
            }
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
            reference_urls=[
                "https://en.wikipedia.org/wiki/Mann%E2%80%93Whitney_U_test#Area-under-curve_(AUC)"
            ],
        )

    def _compute(self, prediction_scores: Any, references: Any) -> dict[str, Any]:
        if self.config_name != "multilabel":
            return {"roc_auc": binary_roc_auc(references, prediction_scores)}
        scores = np.asarray(prediction_scores, dtype=np.float64)
        refs = np.asarray(references)
        if scores.ndim != 2 or refs.shape != scores.shape:
            raise ValueError(
                "multilabel ROC-AUC needs references and prediction_scores of the same shape "
                f"(n_samples, n_labels), got {refs.shape} and {scores.shape}"
            )
        per_label = [binary_roc_auc(refs[:, j], scores[:, j], label=str(j)) for j in range(scores.shape[1])]
        return {"roc_auc": float(np.mean(per_label)), "per_label_roc_auc": per_label}
