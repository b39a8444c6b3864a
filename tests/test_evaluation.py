import numpy as np
import pandas as pd
import pytest

from pinterest_cls.learn.metrics import board_accuracy, classification_metrics


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


def boards_frame(boards_per_category: dict[str, int], pins: int = 6) -> tuple[pd.DataFrame, np.ndarray]:
    rows = [(f"u{c}", f"{c}{b}", f"p{i}", c) for c, n in boards_per_category.items() for b in range(n)
            for i in range(pins)]
    frame = pd.DataFrame(rows, columns=["user", "board", "pin", "category"])
    return frame, frame["category"].to_numpy()


def inner(frame, y, *overrides, grouped=True, layout="pinterest"):
    from pinterest_cls.learn.splits import inner_cv

    from .helpers import make_cfg

    cfg = make_cfg("train", ["train.cv_folds=5", f"data.layout={layout}", *overrides])
    return inner_cv(cfg, frame, y, grouped, seed=0)


def assert_folds_keep_boards_apart(cv, frame, y, groups):
    from pinterest_cls.learn.splits import board_keys

    boards = board_keys(frame)
    folds = list(cv.split(np.zeros(len(y)), y, groups=groups))
    assert len(folds) == cv.get_n_splits() >= 2
    for tr, va in folds:
        assert not set(boards[tr]) & set(boards[va])
    return folds


def test_inner_cv_folds_by_board_with_two_boards_per_category():
    frame, y = boards_frame({"a": 2, "b": 3, "c": 4})
    cv, groups, desc, leaky = inner(frame, y)
    assert (desc, leaky, type(cv).__name__) == ("2-fold by board", False, "StratifiedGroupKFold")
    for _, va in assert_folds_keep_boards_apart(cv, frame, y, groups):
        assert set(y[va]) == {"a", "b", "c"}  # stratified: every category validated in every fold


def test_inner_cv_with_a_one_board_category_still_keeps_boards_apart():
    """The pin-level fallback that was taken here before would put board-mates on both sides of a fold."""
    frame, y = boards_frame({"a": 1, "b": 2, "c": 4})
    cv, groups, desc, leaky = inner(frame, y)
    assert desc == "5-fold by board, unstratified (one training board: a)" and not leaky
    assert type(cv).__name__ == "GroupKFold"
    assert_folds_keep_boards_apart(cv, frame, y, groups)


def test_inner_cv_by_pin_only_where_asked_or_where_there_are_no_boards():
    from pinterest_cls.core.errors import UserError

    frame, y = boards_frame({"a": 1, "b": 2})
    cv, groups, desc, leaky = inner(frame, y, "split.inner=stratified")
    assert groups is None and leaky
    assert desc == "5-fold by pin (split.inner=stratified: board-mates on both sides, leaky)"
    cv, groups, desc, leaky = inner(frame, y, grouped=False, layout="imagefolder")
    assert groups is None and not leaky and desc == "5-fold by pin"
    one_board, y1 = boards_frame({"a": 1})
    with pytest.raises(UserError, match=r"single board, so no cross-validation can keep boards apart.*"
                                        r"split.inner=stratified"):
        inner(one_board, y1)
    with pytest.raises(UserError, match=r"split.inner='pins' must be auto"):
        inner(frame, y, "split.inner=pins")


def test_bootstrap_interval_resamples_whole_boards():
    """Boards that are right or wrong as a whole: resampling their pins one by one would pretend 400
    independent observations and give a far narrower interval than the 20 boards support."""
    from pinterest_cls.learn.metrics import _accuracy_f1, bootstrap_ci

    rng = np.random.default_rng(0)
    boards = np.repeat(np.arange(20), 20)
    truth = np.where(boards % 2 == 0, "a", "b")
    right = np.repeat(rng.random(20) < 0.7, 20)
    pred = np.where(right, truth, np.where(truth == "a", "b", "a"))
    by_board, by_pin = bootstrap_ci(truth, pred, groups=boards), bootstrap_ci(truth, pred)
    acc = float(np.mean(pred == truth))
    for ci in (by_board, by_pin):
        assert ci["accuracy"][0] <= acc <= ci["accuracy"][1]
    width = {name: ci["accuracy"][1] - ci["accuracy"][0] for name, ci in (("board", by_board), ("pin", by_pin))}
    assert width["board"] > 3 * width["pin"], width
    # the fast confusion-matrix metrics equal scikit-learn's
    t, p = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    a, f = _accuracy_f1(t, p, 4)
    m = classification_metrics(t.astype(str), p.astype(str), None, np.unique(t.astype(str)))
    assert a == pytest.approx(m["accuracy"]) and f == pytest.approx(m["f1_macro"])
