import numpy as np
import pandas as pd
import pytest

from pinterest_cls.evaluation import board_accuracy, classification_metrics


def test_metrics_with_classes_in_any_order():
    classes = np.array(["T-shirt", "Trouser", "Bag", "Ankle boot", "Coat", "Sandal"])  # not sorted
    rng = np.random.default_rng(0)
    y = classes[rng.integers(0, 6, 300)]
    scores = rng.random((300, 6))
    scores[np.arange(300), [list(classes).index(c) for c in y]] += 0.8  # right class usually on top
    pred = classes[scores.argmax(1)]
    m = classification_metrics(y, pred, scores, classes)
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    shuffled = np.array([3, 1, 5, 0, 2, 4])
    m2 = classification_metrics(y, pred, scores[:, shuffled], classes[shuffled])
    assert m2 == m  # the same metrics whatever the column order
    assert m["top5_accuracy"] >= m["accuracy"] and 0.5 < m["roc_auc"] <= 1 and 0 < m["pr_auc"] <= 1
    assert m["recall_T-shirt"] == pytest.approx(np.mean(pred[y == "T-shirt"] == "T-shirt"))


def test_board_accuracy_is_majority_per_board():
    frame = pd.DataFrame({"user": ["u"] * 5, "board": ["a", "a", "a", "b", "b"],
                          "truth": ["x", "x", "x", "y", "y"], "prediction": ["x", "x", "y", "x", "x"]})
    assert board_accuracy(frame) == 0.5
