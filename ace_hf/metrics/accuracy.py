"""Plain accuracy, numpy only, loadable offline (the Hub's `accuracy` needs the network and scikit-learn)."""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy: the fraction of examples whose predicted class equals the reference class.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): reference class ids.

Returns:
    accuracy (`float`): correct / total, in [0, 1].

Examples:
    >>> accuracy = evaluate.load("ace_hf/metrics/accuracy.py")
    >>> accuracy.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction of exact matches."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions: Any, references: Any) -> dict[str, Any]:
        predictions = np.asarray(predictions).reshape(-1)
        references = np.asarray(references).reshape(-1)
        if predictions.shape != references.shape:
            raise ValueError(
                f"predictions and references differ in length: {predictions.size} vs {references.size}"
            )
        if references.size == 0:
            raise ValueError("accuracy needs at least one example")
        return {"accuracy": float(np.mean(predictions == references))}
