"""Boards as the unit: board-level results of train, the export's uncategorised boards embedded into a store of
their own and labelled by predict, abstention on a board of an unseen category, and a folder taken as one
board. Real generated photos of three colour themes, through real scan, extract, train and predict (the pixels
backbone: real features without a model download)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pinterest_cls.core.errors import UserError
from pinterest_cls.core.fileio import file_sha256
from pinterest_cls.extract import extract
from pinterest_cls.learn.board_rules import (
    abstention_threshold,
    board_metrics,
    fit_temperature,
    label_boards,
    pin_distribution,
    pins_curve,
)
from pinterest_cls.predict import predict
from pinterest_cls.train import train

from .helpers import make_cfg

THEMES = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
UNSEEN = (128, 128, 128)  # a grey theme no board of the training side has
PINS = 6


def photo(colour, seed: int) -> bytes:
    """A 48 x 64 JPEG: the theme's colour under smooth random texture."""
    rng = np.random.default_rng(seed)
    texture = rng.normal(0, 35, size=(8, 6, 3)).repeat(8, 0).repeat(8, 1)
    arr = np.clip(np.asarray(colour, dtype=float) + texture, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_board(root, user: str, board: str, category: str | None, colour, seed: int) -> None:
    folder = root / user / "per_board" / board
    folder.mkdir(parents=True)
    if category is not None:
        (folder / "board_category.txt").write_text(category)
    for p in range(PINS):
        (folder / f"p{p}").mkdir()
        (folder / f"p{p}" / "pin_closeup_image.jpg").write_bytes(photo(colour, seed * 100 + p))


@pytest.fixture(scope="module")
def themed(tmp_path_factory):
    """An export of 5 labelled boards per theme, one board per theme without board_category.txt, and one grey
    board whose category is "Other"; scanned, extracted with the uncategorised boards' store, and trained."""
    base = tmp_path_factory.mktemp("boards")
    root, work = base / "export", base / "work"
    seed = 0
    for theme, colour in THEMES.items():
        for b in range(5):
            write_board(root, f"u{b % 3}", f"{theme}_{b}", theme, colour, seed := seed + 1)
        write_board(root, "u9", f"unsorted_{theme}", None, colour, seed := seed + 1)
    write_board(root, "u9", "misc", "Other", UNSEEN, seed + 1)
    args = [f"paths.work={work}", f"data.root={root}", "backbone=pixels", "extract.calibrate.pins=0",
            "extract.workers=0"]
    extract(make_cfg("extract", [*args, "extract.uncategorised=true"]), progress=False)
    run = train(make_cfg("train", [*args[:3], "classifier=logreg", "train.log_pipeline=false", "train.n_jobs=1"]),
                progress=False)
    return {"base": base, "root": root, "work": work, "args": args, "run_id": run["run_id"],
            "out": run["output_dir"]}


def test_train_logs_board_metrics_by_each_rule_and_the_pins_per_board_curve(themed):
    out = themed["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    boards = pd.read_csv(out / "test_boards.csv")
    assert len(boards) == 3 and set(boards["truth"]) == set(THEMES)  # one test board per theme (20 % of 5)
    for rule in ("vote", "mean_prob"):
        right = float((boards[rule] == boards["truth"]).mean())
        assert metrics[f"test_board_{rule}_accuracy"] == pytest.approx(right)
    curve = pd.read_csv(out / "board_curve.csv")
    assert sorted(curve["pins"].unique()) == [1, 2, 4, PINS]
    full = curve[(curve["pins"] == PINS) & (curve["rule"] == "vote")]["accuracy"].iloc[0]
    assert full == pytest.approx(metrics["test_board_vote_accuracy"])  # every pin seen: the vote itself
    assert (out / "board_curve.png").stat().st_size > 5000
    record = json.loads((out / "boards.json").read_text())["abstention"]
    assert record["calibration_boards"] == 12 and 0 < record["abstain_below"] < 1  # the 12 training boards


def test_board_intervals_resample_boards_not_pins(themed):
    n = 7
    truth = ["a", "b", "a", "b", "a", "b", "a"]
    table = pd.DataFrame({"truth": truth, "vote": ["b", *truth[1:]]})  # one board of seven wrong
    m = board_metrics(table, n_boot=500, seed=3)
    low, high = m["test_board_vote_accuracy_ci_low"], m["test_board_vote_accuracy_ci_high"]
    assert low < 6 / 7 <= high and (low * n) == pytest.approx(round(low * n))  # a resample is of whole boards
    # through train: each bound is a share of the test boards
    metrics = json.loads((themed["out"] / "metrics.json").read_text())
    k = len(pd.read_csv(themed["out"] / "test_boards.csv"))
    for side in ("low", "high"):
        value = metrics[f"test_board_mean_prob_accuracy_ci_{side}"] * k
        assert value == pytest.approx(round(value))


def test_uncategorised_boards_are_labelled_and_the_unseen_theme_abstains(themed):
    out = themed["base"] / "labelled"
    predict(make_cfg("predict", [*themed["args"][:2], f"run_id={themed['run_id']}", "predict.boards=uncategorised",
                                 f"predict.out={out / 'predictions.csv'}"]))
    table = pd.read_csv(out / "board_predictions.csv").set_index("board")
    assert {"user", "pins", "failed", "top1_category", "top1_score", "top2_category", "top3_score", "top_pins",
            "abstain"} <= set(table.columns)
    for theme in THEMES:
        row = table.loc[f"unsorted_{theme}"]
        assert row["top1_category"] == theme and not row["abstain"] and row["pins"] == PINS
        assert len(row["top_pins"].split(";")) == 3
    assert bool(table.loc["misc", "abstain"])  # grey: no theme the classifier knows
    page = (out / "board_predictions.html").read_text()
    assert "abstains" in page and page.count("<img") == 4 * PINS


def test_a_folder_of_images_is_one_board(themed, tmp_path):
    folder = tmp_path / "my board"
    folder.mkdir()
    for p in range(4):
        (folder / f"{p}.jpg").write_bytes(photo(THEMES["green"], 900 + p))
    (folder / "broken.jpg").write_bytes(b"not an image")
    predict(make_cfg("predict", [*themed["args"][:1], f"run_id={themed['run_id']}", "predict.boards=folder",
                                 f"inputs={folder}", f"predict.out={tmp_path / 'out' / 'p.csv'}"]))
    (row,) = pd.read_csv(tmp_path / "out" / "board_predictions.csv").itertuples()
    assert row.board == "my board" and row.top1_category == "green" and row.pins == 4 and row.failed == 1


def test_a_damaged_board_record_is_a_one_line_error_not_taken_for_a_missing_one(themed, tmp_path):
    from urllib.parse import urlparse

    from pinterest_cls.learn.board_rules import BOARDS_FILE
    from pinterest_cls.track.tracking import use_store

    folder = tmp_path / "board"
    folder.mkdir()
    for p in range(2):
        (folder / f"{p}.jpg").write_bytes(photo(THEMES["red"], 950 + p))
    cfg = make_cfg("predict", [*themed["args"][:1], f"run_id={themed['run_id']}", "predict.boards=folder",
                               f"inputs={folder}", f"predict.out={tmp_path / 'out' / 'p.csv'}"])
    run = use_store(str(cfg.mlflow.tracking_uri)).MlflowClient().get_run(themed["run_id"])
    record = Path(urlparse(run.info.artifact_uri).path) / BOARDS_FILE
    original = record.read_bytes()
    try:
        for damage in (b'{"abstention": {"abstain_b', b'{"abstention": {"abstain_below": "low"}}', b"[1, 2]"):
            record.write_bytes(damage)
            with pytest.raises(UserError) as err:
                predict(cfg)
            line = str(err.value)
            assert "\n" not in line and f"{BOARDS_FILE} of run {themed['run_id']}" in line and "re-run" in line
            assert not (tmp_path / "out" / "board_predictions.csv").exists()
    finally:
        record.write_bytes(original)
    predict(cfg)  # the record restored: the board is labelled with its abstention threshold
    (row,) = pd.read_csv(tmp_path / "out" / "board_predictions.csv").itertuples()
    assert row.top1_category == "red" and row.abstain in (True, False)


def test_predict_boards_without_their_store_names_the_extract_command(themed, tmp_path):
    cfg = make_cfg("predict", [f"paths.work={tmp_path / 'elsewhere'}", f"data.root={themed['root']}",
                               f"mlflow.tracking_uri=sqlite:///{themed['work']}/mlflow.db",
                               f"run_id={themed['run_id']}", "predict.boards=uncategorised"])
    with pytest.raises(UserError) as err:
        predict(cfg)
    line = str(err.value)
    assert "\n" not in line and "no store of the uncategorised boards" in line and "extract.uncategorised=true" in line


def test_the_default_store_and_protocol_do_not_change_with_uncategorised_boards(themed, tmp_path):
    plain = tmp_path / "work"
    args = [f"paths.work={plain}", *themed["args"][1:]]
    extract(make_cfg("extract", args), progress=False)
    assert not (plain / "export" / "uncategorised").exists()
    a, b = plain / "export" / "embeddings" / "pixels", themed["work"] / "export" / "embeddings" / "pixels"
    for name in ("embeddings.npy", "index.parquet"):
        assert file_sha256(a / name) == file_sha256(b / name)
    fa, fb = (json.loads((f / "meta.json").read_text())["fingerprint"] for f in (a, b))
    assert fa == fb
    assert file_sha256(plain / "export" / "manifest.parquet") == file_sha256(themed["work"] / "export" /
                                                                              "manifest.parquet")
    train(make_cfg("train", [*args[:3], "classifier=logreg", "train.log_pipeline=false", "train.n_jobs=1"]),
          progress=False)
    import mlflow

    protocols = []
    for w in (plain, themed["work"]):
        mlflow.set_tracking_uri(f"sqlite:///{w}/mlflow.db")
        (run,) = mlflow.search_runs(experiment_names=["export"], filter_string="tags.verb = 'train'",
                                    output_format="list")
        protocols.append(run.data.params["protocol"])
    assert protocols[0] == protocols[1] and "board" in protocols[0]


def test_abstention_threshold_keeps_the_target_share():
    scores = np.linspace(0.3, 0.99, 40)
    a = abstention_threshold(scores, 0.05)
    assert a.abstained <= 0.05 and np.mean(scores < a.below) == a.abstained and a.boards == 40
    assert np.mean(scores <= a.below) > 0.05 - 1 / 40  # the highest such threshold, not a lower one


def test_label_boards_weighs_pins_and_fails_rows_not_boards():
    pins = pd.DataFrame({"user": "u", "board": ["b"] * 4 + ["c"], "pin": ["p0", "p1", "p2", "bad", "q0"]})
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [np.nan, np.nan], [0.2, 0.8]])
    t = label_boards(pins, probs, np.array(["x", "y"]), abstain_below=0.7, top=2, weigh=2).set_index("board")
    assert t.loc["b", "top1_category"] == "x" and t.loc["b", "top1_score"] == pytest.approx(2.2 / 3)
    assert t.loc["b", "top_pins"] == "p0;p2" and t.loc["b", "failed"] == 1 and t.loc["b", "pins"] == 3
    assert not t.loc["b", "abstain"] and t.loc["c", "top1_category"] == "y" and not t.loc["c", "abstain"]


def test_pins_curve_at_one_pin_is_the_pin_accuracy_in_expectation():
    rng = np.random.default_rng(1)
    truth = np.repeat(["a", "b"], 50)
    pred = np.where(rng.random(100) < 0.7, truth, np.where(truth == "a", "b", "a"))
    pins = pd.DataFrame({"user": "u", "board": np.repeat([f"b{i}" for i in range(10)], 10), "truth": truth,
                         "prediction": pred})
    curve = pins_curve(pins, None, np.array(["a", "b"]), seed=0, draws=400)
    one = curve[curve["pins"] == 1]["accuracy"].iloc[0]
    assert one == pytest.approx((pred == truth).mean(), abs=0.02)
    assert curve[curve["pins"] == 10]["accuracy"].iloc[0] >= one  # a majority of 10 beats one pin here


def test_temperature_scaling_recovers_the_scale_of_overconfident_scores():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 1.5, size=(4000, 5))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    truth = np.array([rng.choice(5, p=row) for row in p])  # labels drawn from the true probabilities
    assert fit_temperature(6.0 * logits, truth) == pytest.approx(6.0, rel=0.15)  # decision values 6x too sharp
    assert fit_temperature(p, truth) == pytest.approx(1.0, rel=0.15)  # calibrated probabilities stay as they are
    assert np.allclose(pin_distribution(p), p)
