"""Splits on the demo's real (tiny-model) store: which pins train and which test, by board where the data has
boards."""

import numpy as np
import pytest

from pinterest_cls.core.errors import UserError
from pinterest_cls.data.store import open_store
from pinterest_cls.learn.splits import board_keys, make_splits, sample_rows

from .helpers import TINY, make_cfg


@pytest.fixture(scope="module")
def frame(tiny_demo):
    return sample_rows(open_store(tiny_demo / "demo" / "embeddings" / "test_efficientnet").pins, None, 1)


def splits(work, frame, *extra):
    cfg = make_cfg("train", [f"paths.work={work}", *TINY, *extra])
    return make_splits(cfg, frame, frame["category"].to_numpy())


def test_the_default_split_keeps_each_board_on_one_side(tiny_demo, frame):
    s = splits(tiny_demo, frame)  # split=auto is group for the pinterest layout
    assert s.name == "group" and s.grouped
    (tr, te), = s.folds
    boards, y = board_keys(frame), frame["category"].to_numpy()
    assert not set(boards[tr]) & set(boards[te])
    assert set(y[te]) == set(y) and 0.15 < len(te) / len(y) < 0.5


def test_a_random_split_tests_a_fifth_of_the_pins(tiny_demo, frame):
    (tr, te), = splits(tiny_demo, frame, "split=random").folds
    assert abs(len(te) - 0.2 * len(frame)) <= 1 and len(tr) + len(te) == len(frame)


def test_kfold_tests_every_pin_once_with_boards_apart(tiny_demo, frame):
    s = splits(tiny_demo, frame, "split=kfold", "split.folds=3")
    assert len(s.folds) == 3 and sorted(np.concatenate([te for _, te in s.folds])) == list(range(len(frame)))
    boards = board_keys(frame)
    for tr, te in s.folds:  # by board for the pinterest layout
        assert not set(boards[tr]) & set(boards[te])


def test_a_predefined_split_tests_the_named_user(tiny_demo, frame):
    (tr, te), = splits(tiny_demo, frame, "split=predefined", "split.test_value=chen").folds
    users = frame["user"].to_numpy()
    assert set(users[te]) == {"chen"} and "chen" not in set(users[tr])


def test_a_predefined_split_that_matches_nothing_is_an_error(tiny_demo, frame):
    with pytest.raises(UserError, match="split=predefined: 0 of 147 rows have user == 'nobody'"):
        splits(tiny_demo, frame, "split=predefined", "split.test_value=nobody")


def test_a_category_with_a_single_board_only_trains(tiny_demo, frame):
    one = frame[~((frame.category == "ocean") & (frame.board != "ocean_waves"))].reset_index(drop=True)
    s = splits(tiny_demo, one)
    assert s.info["single_board_categories"] == ["ocean"]
    assert "ocean" not in set(one["category"].to_numpy()[s.folds[0][1]])


def test_an_inner_cv_that_would_train_a_fold_on_one_category_is_a_one_line_error(tiny_demo, frame):
    """Two categories of one training board each: two folds by board, each training on one category alone."""
    from pinterest_cls.learn.splits import inner_cv

    train_side = frame[(frame["user"] == "alice") & frame["category"].isin(["ocean", "forest"])].reset_index(drop=True)
    cfg = make_cfg("train", [f"paths.work={tiny_demo}", *TINY])
    with pytest.raises(UserError, match="the inner CV by board leaves a fold that trains on a single category"):
        inner_cv(cfg, train_side, train_side["category"].to_numpy(), True, 0)
