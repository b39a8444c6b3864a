"""The audit on a real tiny export with planted problems (real JPEGs, a real scan, a real store): copies, flipped
labels, an off-topic board and an outlier are found; the page shows only files it wrote; train leaves the
flagged pins out; bad input gets one-line errors."""

import io
import re
import shutil
from html.parser import HTMLParser

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pinterest_cls.analysis.findings import board_folds
from pinterest_cls.audit import audit
from pinterest_cls.core.errors import UserError
from pinterest_cls.extract import extract
from pinterest_cls.train import train

from .helpers import make_cfg, make_pinterest_export, run_verb

COLOURS = {"red": (215, 45, 40), "green": (40, 190, 60), "blue": (45, 60, 215)}
PIX = ["backbone=pixels", "backbone.image_size=16"]


def pin_image(colour, seed: int, size=(64, 48)) -> bytes:
    """A colour with smooth random texture (8-pixel blocks), as a JPEG."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-60, 61, size=(size[1] // 8 + 1, size[0] // 8 + 1, 3))
    noise = np.repeat(np.repeat(noise, 8, axis=0), 8, axis=1)[: size[1], : size[0]]
    arr = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def put(root, user, board, pin, data: bytes, category: str | None = None):
    bdir = root / user / "per_board" / board
    (bdir / pin).mkdir(parents=True, exist_ok=True)
    if category:
        (bdir / "board_category.txt").write_text(category)
    (bdir / pin / "pin_closeup_image.jpg").write_bytes(data)


def planted_export(root):
    """3 categories x 4 boards x 8 pins (colours with texture), and planted: two flipped pins (a blue pin on a red
    board, a green pin on a blue board), an off-topic board (labelled blue, holding 6 red pins), an exact copy
    (red_0/p0 repinned onto red_1), a near copy (green_0/p1 resized and re-encoded onto green_2) and an outlier
    (a grey checkerboard on blue_2)."""
    seed = 0
    for cat, colour in COLOURS.items():
        for b in range(4):
            for p in range(8):
                seed += 1
                put(root, f"u{b}", f"{cat}_{b}", f"p{p}", pin_image(colour, seed), cat)
    put(root, "u0", "red_0", "flip_a", pin_image(COLOURS["blue"], 1001))
    put(root, "u1", "blue_1", "flip_b", pin_image(COLOURS["green"], 1002))
    for p in range(6):
        put(root, "u4", "blue_drift", f"p{p}", pin_image(COLOURS["red"], 2000 + p), "blue")
    original = root / "u0/per_board/red_0/p0/pin_closeup_image.jpg"
    put(root, "u1", "red_1", "repin_exact", original.read_bytes())
    buf = io.BytesIO()
    Image.open(root / "u0/per_board/green_0/p1/pin_closeup_image.jpg").resize((58, 44)).save(buf, "JPEG", quality=75)
    put(root, "u2", "green_2", "repin_near", buf.getvalue())
    board = np.kron((np.indices((6, 8)).sum(axis=0) % 2) * 255, np.ones((8, 8))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(board).convert("RGB").save(buf, "JPEG", quality=92)
    put(root, "u2", "blue_2", "odd", buf.getvalue())
    return root


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    base = tmp_path_factory.mktemp("audit")
    root, work = planted_export(base / "exp"), base / "work"
    common = [f"paths.work={work}", f"data.root={root}", *PIX]
    extract(make_cfg("extract", [*common, "extract.workers=0", "mlflow.enabled=false"]), progress=False)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    result = audit(make_cfg("audit", [*common, "repins.threshold=0.99", "audit.folds=3",
                                      f"mlflow.tracking_uri={uri}"]), progress=False)
    return {"root": root, "work": work, "common": common, "uri": uri, **result}


def csv(result, name):
    return pd.read_csv(result["folder"] / name, dtype={"user": str, "board": str, "pin": str}, keep_default_na=False)


def test_planted_exact_and_near_copies_are_found(audited):
    d = csv(audited, "duplicates.csv")
    groups = {g: set(zip(rows["board"], rows["pin"])) for g, rows in d.groupby("group")}
    exact = {("red_0", "p0"), ("red_1", "repin_exact")}
    near = {("green_0", "p1"), ("green_2", "repin_near")}
    assert sorted(groups.values(), key=sorted) == sorted([exact, near], key=sorted)  # and no other group
    kinds = d.set_index("pin")["kind"]
    assert kinds["repin_exact"] == "exact" and kinds["repin_near"] == "near"
    assert (d["group_boards"] == 2).all() and (d["group_users"] == 2).all() and (d["group_categories"] == 1).all()
    assert audited["counts"]["duplicate_groups_across_boards"] == 2


def test_planted_flipped_labels_rank_at_the_top(audited):
    labels = csv(audited, "label_issues.csv")
    assert len(labels) == audited["counts"]["pins"] == 96 + 2 + 6 + 3
    # the flipped pins and the off-topic board's pins (mislabeled too) are the first eight
    top = labels.head(8)
    assert set(top["pin"][top["board"] != "blue_drift"]) == {"flip_a", "flip_b"}
    assert top["is_issue"].all() and (np.diff(labels["score"]) >= 0).all()
    flips = top.set_index("pin")
    assert flips.loc["flip_a", "given"] == "red" and flips.loc["flip_a", "suggested"] == "blue"
    assert flips.loc["flip_b", "given"] == "blue" and flips.loc["flip_b", "suggested"] == "green"
    clean = labels[labels["board"].str.match(r"^(red|green|blue)_\d$") & labels["pin"].str.match(r"^p\d$")]
    assert not clean["is_issue"].any(), "an ordinary pin on a clean board must not be flagged"


def test_an_off_topic_board_is_flagged(audited):
    boards = csv(audited, "boards.csv").set_index("board")
    assert list(boards.index[boards["is_off_topic"]]) == ["blue_drift"]
    drift = boards.loc["blue_drift"]
    assert drift["category"] == "blue" and drift["belongs_to"] == "red" and drift["agreement"] < 0.5
    assert boards.loc[["red_0", "green_1", "blue_2"], "agreement"].min() >= 0.85


def test_the_outlier_is_scored_farthest(audited):
    out = csv(audited, "outliers.csv")
    assert out.iloc[0]["pin"] == "odd" and out.iloc[0]["is_outlier"]
    assert (np.diff(out["score"]) >= 0).all() and out["score"].between(0, 1).all()


class Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_the_page_references_only_files_that_exist(audited):
    page = audited["page"]
    parser = Refs()
    parser.feed(page.read_text())
    assert len(parser.refs) >= 2 + 2 + 6 + 1  # copies, flipped pins, the off-topic board's pins, the outlier
    for ref in parser.refs:
        assert not re.match(r"^(/|[a-z]+:)", ref), f"{ref} is not a path relative to the page"
        assert (page.parent / ref).is_file(), ref
    with Image.open(page.parent / parser.refs[0]) as im:
        assert max(im.size) <= 128
    text = page.read_text()
    assert "flip_a" in text and "blue_drift" in text and "given" in text


def test_the_audit_is_logged_to_mlflow_with_its_counts(audited):
    client = mlflow.tracking.MlflowClient(audited["uri"])
    run = client.get_run(audited["run_id"])
    assert run.data.tags["verb"] == "audit" and run.data.tags["backbone"] == "pixels"
    assert run.data.metrics["label_issues"] == audited["counts"]["label_issues"] >= 2
    assert run.data.metrics["off_topic_boards"] == 1
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"duplicates.csv", "label_issues.csv", "boards.csv", "outliers.csv", "audit.json", "page"} <= names


def test_exclusion_reaches_train(audited, tmp_path):
    common = [*audited["common"], "classifier=logreg", "classifier.grid.C=[1]", "train.n_jobs=1",
              "mlflow.enabled=false", "train.bootstrap=0", "split=kfold", "split.folds=3"]
    plain = train(make_cfg("train", common))
    cleaned = train(make_cfg("train", [*common, "audit.exclude=[label_issues,off_topic]"]))
    p = cleaned["params"]
    flagged = set(csv(audited, "label_issues.csv").query("is_issue")["pin"].map(str))
    assert {"flip_a", "flip_b"} <= flagged
    assert p["audit_exclude"] == "label_issues,off_topic" and p["audit_flagged_off_topic"] == 6
    assert p["audit_flagged_pins"] >= 8 and p["audit_excluded_pins"] == p["audit_flagged_pins"]
    assert p["protocol"] != plain["params"]["protocol"]
    assert "audit-excluded label_issues,off_topic from train" in p["protocol"]
    split = pd.read_csv(cleaned["output_dir"] / "split.csv", dtype=str)
    out = split[split["reason"] == "flagged by the audit (audit.exclude)"]
    assert set(out["board"][out["pin"].isin(["flip_a", "flip_b"])]) == {"red_0", "blue_1"}
    assert (out["side"] == "dropped").all()
    # exclude_from=train: every flagged pin still sits on the test side of the fold that tests it
    assert len(out) == p["audit_flagged_pins"] * 2  # 3 folds: trained on in two, tested in one
    assert (split[split["side"] == "test"].groupby("pin").size() >= 1).all()
    tested = split[split["side"] == "test"]
    assert {"flip_a", "flip_b"} <= set(tested["pin"])


def test_exclusion_refuses_an_audit_of_other_embeddings(audited, tmp_path):
    shutil.copytree(audited["work"], tmp_path / "work")
    info = tmp_path / "work" / "exp" / "audit" / "pixels" / "audit.json"
    info.write_text(info.read_text().replace('"rows_sha256": "', '"rows_sha256": "x'))
    cfg = make_cfg("train", [f"paths.work={tmp_path / 'work'}", f"data.root={audited['root']}", *PIX,
                             "mlflow.enabled=false", "audit.exclude=[outliers]"])
    with pytest.raises(UserError, match="made on other embeddings than this store's; re-run"):
        train(cfg)


def test_too_few_boards_for_the_out_of_fold_model_is_a_clear_error():
    cats = np.array(["a"] * 4 + ["b"] * 4 + ["c"] * 2)
    boards = np.array(["a1", "a1", "a2", "a2", "b1", "b1", "b1", "b1", "c1", "c1"])
    with pytest.raises(UserError, match="at least two boards per category .* one board only: b, c"):
        board_folds(cats, boards, 5, 0)
    cats = np.repeat(["a", "b", "c"], 6)
    boards = np.array([f"{c}{i // 2}" for c in "abc" for i in range(6)])  # 3 boards of 2 pins per category
    for n_folds in (2, 3, 5):
        folds = board_folds(cats, boards, n_folds, 0)
        for b in np.unique(boards):  # a board's pins share one fold
            assert len(set(folds[boards == b])) == 1
        for f in np.unique(folds):  # every fold's training side holds every category
            assert set(cats[folds != f]) == {"a", "b", "c"}


def test_audit_without_a_store_exits_2_with_one_line(tmp_path):
    proc = run_verb("audit", f"paths.work={tmp_path / 'work'}", "data.root=" + str(tmp_path), "mlflow.enabled=false",
                    cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "no embeddings for backbone efficientnet_lite0" in lines[0]
    assert "run first: python -m pinterest_cls.extract" in lines[0]


def test_exclude_from_all_also_leaves_flagged_pins_out_of_the_test_side(audited):
    common = [*audited["common"], "classifier=logreg", "classifier.grid.C=[1]", "train.n_jobs=1",
              "mlflow.enabled=false", "train.bootstrap=0", "split=kfold", "split.folds=3",
              "audit.exclude=[off_topic]", "audit.exclude_from=all"]
    result = train(make_cfg("train", common))
    split = pd.read_csv(result["output_dir"] / "split.csv", dtype=str)
    drift = split[split["board"] == "blue_drift"]
    assert len(drift) == 6 * 3 and (drift["side"] == "dropped").all()  # in every fold, on neither side
    assert (drift["reason"] == "flagged by the audit (audit.exclude)").all()
    assert result["params"]["n_test"] == audited["counts"]["pins"] - 6
    assert "audit-excluded off_topic from all" in result["params"]["protocol"]


def test_a_store_with_a_single_board_category_is_refused_by_name(tmp_path):
    root = make_pinterest_export(tmp_path / "few", {("u0", "a0"): "apples", ("u1", "a1"): "apples",
                                                    ("u0", "b0"): "bananas"}, pins_per_board=3)
    common = [f"paths.work={tmp_path / 'work'}", f"data.root={root}", *PIX, "mlflow.enabled=false"]
    extract(make_cfg("extract", [*common, "extract.workers=0"]), progress=False)
    with pytest.raises(UserError, match="at least two boards per category .* one board only: bananas. Add boards"):
        audit(make_cfg("audit", common), progress=False)
    assert not (tmp_path / "work" / "few" / "audit").exists()  # nothing half-written
