"""Balanced accuracy (mean per-class recall), numpy only, loadable offline.

Medical labels are usually imbalanced: plain accuracy rewards predicting the majority class, balanced
accuracy does not (always predicting one class scores 1 / number of classes).
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Balanced accuracy: the recall of each class that occurs in the references, averaged with equal weight per
class. Predicted classes that never occur in the references add no term (as in scikit-learn).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): reference class ids.

Returns:
    balanced_accuracy (`float`): mean over reference classes of correct / occurrences.
    num_classes (`int`): number of distinct reference classes averaged over.

Examples:
    >>> balanced_accuracy = evaluate.load("ace_hf/metrics/balanced_accuracy.py")
    >>> balanced_accuracy.compute(predictions=[0, 0, 0, 0], references=[0, 0, 0, 1])
    {'balanced_accuracy': 0.5, 'num_classes': 2}
"""

_CITATION = """\
@inproceedings{brodersen2010balanced,
  title={The balanced accuracy and its posterior distribution},
  author={Brodersen, Kay H. and Ong, Cheng Soon and Stephan, Klaas E. and Buhmann, Joachim M.},
  booktitle={20th International Conference on Pattern Recognition},
  pages={3121--3124},
  year={2010}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class BalancedAccuracy(evaluate.Metric):
    """Mean per-class recall without scikit-learn."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://doi.org/10.1109/ICPR.2010.764"],
        )

    def _compute(self, predictions: Any, references: Any) -> dict[str, Any]:
        predictions = np.asarray(predictions).reshape(-1)
        references = np.asarray(references).reshape(-1)
        if predictions.shape != references.shape:
            raise ValueError(
                f"predictions and references differ in length: {predictions.size} vs {references.size}"
            )
        if references.size == 0:
            raise ValueError("balanced accuracy needs at least one example")
        classes, class_index = np.unique(references, return_inverse=True)
        class_index = class_index.reshape(-1)
        occurrences = np.bincount(class_index, minlength=classes.size)
        correct = np.bincount(class_index, weights=predictions == references, minlength=classes.size)
        return {"balanced_accuracy": float(np.mean(correct / occurrences)), "num_classes": int(classes.size)}
