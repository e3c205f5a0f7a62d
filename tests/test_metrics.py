"""The shipped `evaluate` metrics: hand-computed values, brute-force cross-checks, and loading with no network."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import evaluate
import numpy as np
import pytest

from ace_hf.metrics import METRIC_NAMES, METRICS_DIR, load_metric


@pytest.fixture(scope="module")
def roc_auc() -> evaluate.EvaluationModule:
    return load_metric("roc_auc", keep_in_memory=True)


@pytest.fixture(scope="module")
def roc_auc_multilabel() -> evaluate.EvaluationModule:
    return load_metric("roc_auc", config_name="multilabel", keep_in_memory=True)


@pytest.fixture(scope="module")
def mean_iou() -> evaluate.EvaluationModule:
    return load_metric("mean_iou", keep_in_memory=True)


@pytest.fixture(scope="module")
def balanced_accuracy() -> evaluate.EvaluationModule:
    return load_metric("balanced_accuracy", keep_in_memory=True)


@pytest.fixture(scope="module")
def accuracy() -> evaluate.EvaluationModule:
    return load_metric("accuracy", keep_in_memory=True)


def pairwise_auc(references: np.ndarray, scores: np.ndarray) -> float:
    """Definition of ROC-AUC: P(positive scores above negative), ties counting one half."""
    pos, neg = scores[references == 1], scores[references == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


# --- roc_auc ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([0.1, 0.2, 0.3, 0.8, 0.9, 0.95], 1.0),  # perfectly separated
        ([0.95, 0.9, 0.8, 0.3, 0.2, 0.1], 0.0),  # perfectly reversed
        ([0.5] * 6, 0.5),  # all tied
    ],
)
def test_roc_auc_extremes(roc_auc: evaluate.EvaluationModule, scores: list[float], expected: float) -> None:
    result = roc_auc.compute(references=[0, 0, 0, 1, 1, 1], prediction_scores=scores)
    assert result == {"roc_auc": pytest.approx(expected)}


def test_roc_auc_hand_worked_with_tie(roc_auc: evaluate.EvaluationModule) -> None:
    # Positives 0.9 and 0.4 against negatives 0.8, 0.4, 0.1: 0.9 wins 3 pairs, 0.4 wins 1 and ties 1 -> 4.5 / 6.
    result = roc_auc.compute(references=[1, 0, 1, 0, 0], prediction_scores=[0.9, 0.8, 0.4, 0.4, 0.1])
    assert result["roc_auc"] == pytest.approx(0.75)


def test_roc_auc_matches_scikit_learn_doc_example(roc_auc: evaluate.EvaluationModule) -> None:
    result = roc_auc.compute(references=[1, 0, 1, 1, 0, 0], prediction_scores=[0.5, 0.2, 0.99, 0.3, 0.1, 0.7])
    assert result["roc_auc"] == pytest.approx(7 / 9)


@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal forces many ties
def test_roc_auc_matches_pairwise_count(roc_auc: evaluate.EvaluationModule, decimals: int | None) -> None:
    rng = np.random.default_rng(0)
    references = rng.integers(0, 2, size=200)
    scores = rng.normal(size=200) + 0.7 * references
    if decimals is not None:
        scores = np.round(scores, decimals)
    result = roc_auc.compute(references=references, prediction_scores=scores)
    assert result["roc_auc"] == pytest.approx(pairwise_auc(references, scores), abs=1e-12)


def test_roc_auc_single_class_raises(roc_auc: evaluate.EvaluationModule) -> None:
    with pytest.raises(ValueError, match="only one class"):
        roc_auc.compute(references=[1, 1, 1], prediction_scores=[0.1, 0.5, 0.9])


def test_roc_auc_rejects_non_binary_references(roc_auc: evaluate.EvaluationModule) -> None:
    with pytest.raises(ValueError, match="0/1"):
        roc_auc.compute(references=[0, 1, 2], prediction_scores=[0.1, 0.5, 0.9])


def test_roc_auc_multilabel_is_macro_mean(roc_auc_multilabel: evaluate.EvaluationModule) -> None:
    rng = np.random.default_rng(1)
    references = rng.integers(0, 2, size=(50, 3))
    scores = np.round(rng.random((50, 3)) + 0.5 * references, 1)
    result = roc_auc_multilabel.compute(references=references, prediction_scores=scores)
    expected = [pairwise_auc(references[:, j], scores[:, j]) for j in range(3)]
    assert result["per_label_roc_auc"] == pytest.approx(expected, abs=1e-12)
    assert result["roc_auc"] == pytest.approx(np.mean(expected), abs=1e-12)


def test_roc_auc_multilabel_single_class_label_raises(roc_auc_multilabel: evaluate.EvaluationModule) -> None:
    references = [[1, 0], [0, 0], [1, 0]]  # label 1 has no positive
    with pytest.raises(ValueError, match="label 1.*only one class"):
        roc_auc_multilabel.compute(
            references=references, prediction_scores=[[0.9, 0.1], [0.2, 0.3], [0.7, 0.5]]
        )


def test_roc_auc_unknown_config_raises() -> None:
    with pytest.raises(ValueError, match="multiclass"):
        load_metric("roc_auc", config_name="multiclass")


# --- mean_iou --------------------------------------------------------------------------------------------

# Reference and prediction over 3 classes; the bottom-right pixel is ignored (and predicted as class 2, which
# would halve class 2's IoU if it were counted). Remaining pixels, ref -> pred: 0->0, 0->1, 1->1, 1->1, 2->2.
SEG_REF = np.array([[0, 0, 1], [1, 2, 255]])
SEG_PRED = np.array([[0, 1, 1], [1, 2, 2]])


def test_mean_iou_hand_computed(mean_iou: evaluate.EvaluationModule) -> None:
    result = mean_iou.compute(predictions=[SEG_PRED], references=[SEG_REF], num_labels=3, ignore_index=255)
    # class 0: |∩|=1, |∪|=2; class 1: |∩|=2, |∪|=3; class 2: |∩|=1, |∪|=1.
    np.testing.assert_allclose(result["per_category_iou"], [1 / 2, 2 / 3, 1.0])
    np.testing.assert_allclose(result["per_category_accuracy"], [1 / 2, 1.0, 1.0])
    assert result["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert result["mean_accuracy"] == pytest.approx(2.5 / 3)
    assert result["overall_accuracy"] == pytest.approx(4 / 5)


def test_mean_iou_absent_class_is_nan_and_left_out(mean_iou: evaluate.EvaluationModule) -> None:
    result = mean_iou.compute(predictions=[SEG_PRED], references=[SEG_REF], num_labels=4, ignore_index=255)
    assert np.isnan(result["per_category_iou"][3]) and np.isnan(result["per_category_accuracy"][3])
    assert result["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    filled = mean_iou.compute(
        predictions=[SEG_PRED], references=[SEG_REF], num_labels=4, ignore_index=255, nan_to_num=0
    )
    assert filled["per_category_iou"][3] == 0


def test_mean_iou_sums_areas_over_maps_of_different_sizes(mean_iou: evaluate.EvaluationModule) -> None:
    # Second map (1x2): class 0 predicted where the reference is 1, so both classes' unions grow.
    predictions = [SEG_PRED, np.array([[0, 0]])]
    references = [SEG_REF, np.array([[1, 1]])]
    result = mean_iou.compute(predictions=predictions, references=references, num_labels=3, ignore_index=255)
    # class 0: |∩|=1, pred 3, ref 2 -> |∪|=4; class 1: |∩|=2, pred 3, ref 4 -> |∪|=5; class 2 unchanged.
    np.testing.assert_allclose(result["per_category_iou"], [1 / 4, 2 / 5, 1.0])
    assert result["overall_accuracy"] == pytest.approx(4 / 7)


def test_mean_iou_reduce_labels(mean_iou: evaluate.EvaluationModule) -> None:
    # reduce_labels: reference 0 becomes ignored (255) and 1, 2 become 0, 1.
    result = mean_iou.compute(
        predictions=[np.array([[0, 1, 1]])],
        references=[np.array([[1, 2, 0]])],
        num_labels=2,
        ignore_index=255,
        reduce_labels=True,
    )
    np.testing.assert_allclose(result["per_category_iou"], [1.0, 1.0])


# --- balanced_accuracy and accuracy ----------------------------------------------------------------------


def test_balanced_accuracy_differs_from_accuracy_on_imbalance(
    balanced_accuracy: evaluate.EvaluationModule, accuracy: evaluate.EvaluationModule
) -> None:
    references = [0] * 8 + [1] * 2
    predictions = [0] * 10  # majority-class predictor
    assert accuracy.compute(predictions=predictions, references=references) == {
        "accuracy": pytest.approx(0.8)
    }
    result = balanced_accuracy.compute(predictions=predictions, references=references)
    assert result == {"balanced_accuracy": pytest.approx(0.5), "num_classes": 2}


def test_balanced_accuracy_three_classes(balanced_accuracy: evaluate.EvaluationModule) -> None:
    # Recalls: class 0 2/3, class 1 1/2, class 2 1/1. The predicted-only class 5 adds no term.
    result = balanced_accuracy.compute(predictions=[0, 0, 5, 1, 0, 2], references=[0, 0, 0, 1, 1, 2])
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert result["num_classes"] == 3


def test_accuracy_hand_computed(accuracy: evaluate.EvaluationModule) -> None:
    assert accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 0])["accuracy"] == pytest.approx(
        0.5
    )


# --- loading ---------------------------------------------------------------------------------------------


def test_unknown_metric_name_lists_available() -> None:
    with pytest.raises(ValueError, match="available metrics: accuracy, balanced_accuracy, mean_iou, roc_auc"):
        load_metric("f1")


def test_metric_names_match_shipped_scripts() -> None:
    shipped = sorted(p.stem for p in METRICS_DIR.glob("*.py") if p.name != "__init__.py")
    assert shipped == sorted(METRIC_NAMES)


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_scripts_import_only_standalone_dependencies(name: str) -> None:
    """evaluate copies each script alone into its modules cache: no relative or project imports."""
    tree = ast.parse((METRICS_DIR / f"{name}.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}.py has a relative import"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "typing", "numpy", "datasets", "evaluate"}


def test_metrics_are_packaged() -> None:
    """pyproject's `include = ["ace_hf*"]` must pick up the metrics package, so wheels ship the scripts."""
    setuptools = pytest.importorskip("setuptools")
    packages = setuptools.find_packages(
        where=str(Path(__file__).resolve().parent.parent), include=["ace_hf*"]
    )
    assert "ace_hf.metrics" in packages


def test_load_metrics_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """With offline flags set and every socket connection refused, all metrics still load and compute."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)  # read at import time

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted during an offline metric load")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in METRIC_NAMES:
        assert isinstance(load_metric(name, keep_in_memory=True), evaluate.Metric)
    result = load_metric("roc_auc", keep_in_memory=True).compute(
        references=[0, 1], prediction_scores=[0.2, 0.8]
    )
    assert result == {"roc_auc": 1.0}
