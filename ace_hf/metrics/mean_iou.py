"""Mean IoU for semantic segmentation, numpy only, loadable offline.

Same semantics as the Hub's `mean_iou` metric (MMSegmentation's definition): per-class areas are summed over
all maps before dividing, pixels whose reference equals `ignore_index` are dropped, labels outside
`[0, num_labels)` count for no class, and classes with an empty union (IoU 0/0) are NaN and left out of the
mean.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Intersection over union per class (|pred ∩ ref| / |pred ∪ ref|, areas summed over all maps) and its mean over
the classes that occur in the references or the predictions. Also reports per-class accuracy (recall), its
mean, and the overall pixel accuracy.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[ndarray]`): predicted label maps, each of shape (height, width); sizes may differ
        between maps but each must match its reference.
    references (`list[ndarray]`): reference label maps, same shapes as `predictions`.
    num_labels (`int`): number of classes.
    ignore_index (`int`): reference value whose pixels are not evaluated (e.g. 255).
    nan_to_num (`float`, *optional*): replace NaN results (classes absent from refs and preds) by this value.
    reduce_labels (`bool`, *optional*, defaults to `False`): shift reference labels down by one and map the
        former 0 (background) to 255, for datasets whose 0 is an unlabelled background.

Returns:
    mean_iou (`float`): NaN-mean of `per_category_iou`.
    mean_accuracy (`float`): NaN-mean of `per_category_accuracy`.
    overall_accuracy (`float`): correct pixels / evaluated pixels.
    per_category_iou (`ndarray` of shape (num_labels,)): NaN where a class is in neither refs nor preds.
    per_category_accuracy (`ndarray` of shape (num_labels,)): NaN where a class is absent from the refs.

Examples:
    >>> mean_iou = evaluate.load("ace_hf/metrics/mean_iou.py")
    >>> result = mean_iou.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 255]]],
    ...                           num_labels=2, ignore_index=255)
    >>> round(result["mean_iou"], 4)
    0.5
"""

_CITATION = """\
@software{MMSegmentation_Contributors_OpenMMLab_Semantic_Segmentation_2020,
  author = {{MMSegmentation Contributors}},
  license = {Apache-2.0},
  title = {{OpenMMLab Semantic Segmentation Toolbox and Benchmark}},
  url = {https://github.com/open-mmlab/mmsegmentation},
  year = {2020}
}
"""


def _class_areas(
    prediction: Any, reference: Any, num_labels: int, ignore_index: int, reduce_labels: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class pixel counts of one map pair: intersection, prediction, reference."""
    prediction = np.asarray(prediction, dtype=np.int64)
    reference = np.asarray(reference, dtype=np.int64)
    if prediction.shape != reference.shape:
        raise ValueError(
            f"prediction and reference maps differ in shape: {prediction.shape} vs {reference.shape}"
        )
    if reduce_labels:
        reference = np.where(reference == 0, 255, reference - 1)
        reference[reference == 254] = 255
    keep = reference != ignore_index
    prediction, reference = prediction[keep], reference[keep]

    def counts(labels: np.ndarray) -> np.ndarray:
        # Labels outside [0, num_labels) belong to no class, as with np.histogram in the Hub metric.
        labels = labels[(labels >= 0) & (labels < num_labels)]
        return np.bincount(labels, minlength=num_labels).astype(np.float64)

    return counts(prediction[prediction == reference]), counts(prediction), counts(reference)


def _nanmean(values: np.ndarray) -> float:
    """Mean over the defined (non-NaN) entries; NaN, without numpy's empty-slice warning, if there are none."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    """Semantic-segmentation mean IoU without network access."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
            reference_urls=["https://github.com/open-mmlab/mmsegmentation"],
        )

    def _compute(
        self,
        predictions: Any,
        references: Any,
        num_labels: int,
        ignore_index: int,
        nan_to_num: float | None = None,
        reduce_labels: bool = False,
    ) -> dict[str, Any]:
        intersect = np.zeros(num_labels)
        pred_area = np.zeros(num_labels)
        ref_area = np.zeros(num_labels)
        for prediction, reference in zip(predictions, references, strict=True):
            i, p, r = _class_areas(prediction, reference, num_labels, ignore_index, reduce_labels)
            intersect += i
            pred_area += p
            ref_area += r
        union = pred_area + ref_area - intersect
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = intersect / union
            accuracy = intersect / ref_area
            overall = intersect.sum() / ref_area.sum()
        metrics: dict[str, Any] = {
            "mean_iou": _nanmean(iou),
            "mean_accuracy": _nanmean(accuracy),
            "overall_accuracy": float(overall),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
        if nan_to_num is not None:
            metrics = {
                key: float(np.nan_to_num(value, nan=nan_to_num))
                if np.ndim(value) == 0
                else np.nan_to_num(value, nan=nan_to_num)
                for key, value in metrics.items()
            }
        return metrics
