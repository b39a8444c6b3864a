"""Repins: exact copies by digest, near copies by embedding similarity verified on the pixels, and splits that
keep every copy of a test pin off the training side (drop or link), on real files and real scans."""

import io
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pinterest_cls.extract import extract
from pinterest_cls.neighbors.duplicates import (
    CopyPolicy,
    components,
    drop_train_copies,
    duplicate_groups,
    exact_pairs,
    find_copies,
    keep_one,
    link_boards,
)
from pinterest_cls.train import train

from .helpers import make_cfg, make_pinterest_export


def test_near_candidates_come_from_the_neighbour_graph():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(500, 32)).astype(np.float32)
    emb[10] = emb[3] * 2.0 + rng.normal(scale=0.01, size=32)  # a scaled, slightly changed copy
    emb[400] = emb[250]
    given = CopyPolicy(0.99, "given", verify=False, min_score=0.97, k=5)
    found = find_copies([None] * 500, [""] * 500, given, vectors=emb)
    pairs = found.attrs["pairs"]
    assert set(zip(pairs["a"], pairs["b"])) == {(3, 10), (250, 400)} and (pairs["kind"] == "near").all()
    assert (pairs["similarity"] >= 0.99).all() and found.attrs["candidates"] == 2
    g = found["group"].to_numpy()
    assert g[3] == g[10] != g[250] == g[400] and (np.delete(g, [3, 10, 250, 400]) == -1).all()
    off = find_copies([None] * 500, [""] * 500, CopyPolicy(None, "off", verify=True, min_score=0.97, k=5), vectors=emb)
    assert (off["group"] == -1).all() and off.attrs["candidates"] == 0


def test_groups_links_and_drops():
    digests = ["x", "y", "x", None, "z", "y", None]
    assert set(zip(exact_pairs(digests)["a"], exact_pairs(digests)["b"])) == {(0, 2), (1, 5)}
    found = duplicate_groups(digests)
    g = found["group"].to_numpy()
    assert g[0] == g[2] != g[1] == g[5] and (g[[3, 4, 6]] == -1).all()
    assert list(found["kind"]) == ["exact", "exact", "exact", "", "", "exact", ""]
    assert list(components(4, pd.DataFrame({"a": [0], "b": [3]}))) == [0, 1, 2, 0]
    # boards A and C share a copy, B stands alone: A and C are one linked group
    boards = np.array(["A", "A", "B", "B", "C", "C"])
    groups = np.array([7, -1, -1, -1, 7, -1])
    linked = link_boards(boards, groups)
    assert linked[0] == linked[1] == linked[4] == linked[5] != linked[2] == linked[3]
    kept, dropped = drop_train_copies(np.array([0, 1, 2, 3]), np.array([4, 5]), groups)
    assert list(kept) == [1, 2, 3] and list(dropped) == [0]
    kept, dropped = keep_one(np.array([5, 4, 0, 1, 3, 2]), np.array([7, 9, -1, 9, 7, -1]))
    assert list(kept) == [5, 4, 1, 2] and list(dropped) == [0, 3]  # first of each group in the given order


@pytest.fixture(scope="module")
def repinned(tmp_path_factory):
    """4 categories x 3 boards x 6 pins; a cats pin and a dogs pin repinned as exact copies onto the two other
    boards of their category, a fish pin as re-encoded, resized copies: whichever board a split tests, a copy
    sits on the other side."""
    root = tmp_path_factory.mktemp("repins") / "exp"
    boards = {(f"u{c}", f"{name}{b}"): name for c, name in enumerate(["cats", "dogs", "fish", "birds"])
              for b in range(3)}
    make_pinterest_export(root, boards, pins_per_board=6, size=(96, 72))
    for user, name, pin in [("u0", "cats", "p0"), ("u1", "dogs", "p1")]:
        for b in (1, 2):
            board = root / user / "per_board"
            shutil.copytree(board / f"{name}0" / pin, board / f"{name}{b}" / "copy")
    original = root / "u2/per_board/fish0/p2/pin_closeup_image.jpg"
    for b, size in ((1, (90, 68)), (2, (100, 75))):
        buf = io.BytesIO()
        Image.open(original).convert("RGB").resize(size).save(buf, "JPEG", quality=70)
        assert buf.getvalue() != original.read_bytes()
        (root / f"u2/per_board/fish{b}/near").mkdir()
        (root / f"u2/per_board/fish{b}/near/pin_closeup_image.jpg").write_bytes(buf.getvalue())
    return root


PIX = ["backbone=pixels", "backbone.image_size=24", "backbone.grayscale=true"]


def run(root, *extra):
    """train on the export at ``root``, embedded once per module (beside it) by the pixel baseline."""
    work = root.parent / "work"
    common = [f"paths.work={work}", f"data.root={root}", *PIX]
    if not (work / "exp" / "embeddings" / "pixels").exists():
        extract(make_cfg("extract", [*common, "extract.workers=0", "mlflow.enabled=false"]), progress=False)
    return train(make_cfg("train", [*common, "classifier=logreg", "classifier.grid.C=[1]", "train.n_jobs=1",
                                    "mlflow.enabled=false", "train.bootstrap=0", *extra]))


@pytest.mark.parametrize("split", ["split=group", "split=kfold"])
def test_no_test_pin_keeps_a_copy_on_the_training_side(repinned, split):
    folds = ["split.folds=3"] if split == "split=kfold" else []
    off = run(repinned, split, *folds, "repins.mode=off")
    drop = run(repinned, split, *folds, "repins.mode=drop", "repins.threshold=0.98")
    link = run(repinned, split, *folds, "repins.mode=link", "repins.threshold=0.98")
    pairs = [(f"{name}0", pin, f"{name}{b}", copy) for name, pin, copy in
             [("cats", "p0", "copy"), ("dogs", "p1", "copy"), ("fish", "p2", "near")] for b in (1, 2)]

    def straddling(result):
        table = pd.read_csv(result["output_dir"] / "split.csv")
        side = {(r.fold, r.board, r.pin): r.side for r in table.itertuples()}
        return [(f, p) for f in table["fold"].unique() for p in pairs
                if {side[(f, p[0], p[1])], side[(f, p[2], p[3])]} == {"train", "test"}]

    assert straddling(off), "the fixture must put a copy on both sides without the fix"
    assert off["params"]["repins_mode"] == "off"
    assert straddling(drop) == [] and straddling(link) == []
    p = drop["params"]
    assert p["duplicate_groups"] == 3 and p["pins_with_copies"] == 9 and p["exact_copies"] == 6
    # each category's test board holds one pin of the group, its 2 copies were on training boards
    assert p["test_pins_with_train_copy_before"] >= 1 and p["pins_dropped"] >= p["test_pins_with_train_copy_before"]
    if split == "split=group":
        assert (p["test_pins_with_train_copy_before"], p["pins_dropped"]) == (3, 6)
    table = pd.read_csv(drop["output_dir"] / "split.csv")
    dropped = table[table["side"] == "dropped"]
    assert len(dropped) == p["pins_dropped"] and (dropped["reason"] == "a copy is on the test side").all()
    assert link["params"]["boards_linked"] >= 1 and link["params"]["pins_dropped"] == 0
    assert "repins link, exact + near >= 0.98 given, verified" in link["params"]["protocol"]
    assert p["repins_threshold_source"] == "given" and p["near_candidates"] >= 2


def test_keep_one_leaves_one_pin_per_duplicate_group_and_side(repinned):
    """repins.keep_one: a pin-level split puts several copies on one side; with keep_one each side of the split
    holds at most one pin of each duplicate group, the others are listed as dropped, and the protocol says so."""
    from pinterest_cls.core.errors import UserError

    def per_side(result):
        table = pd.read_csv(result["output_dir"] / "split.csv")
        copies = {("cats0", "p0"), ("cats1", "copy"), ("cats2", "copy"), ("dogs0", "p1"), ("dogs1", "copy"),
                  ("dogs2", "copy"), ("fish0", "p2"), ("fish1", "near"), ("fish2", "near")}
        table = table[[(b, p) in copies for b, p in zip(table["board"], table["pin"])]]
        table = table.assign(group=table["board"].str.rstrip("012"))
        return table[table["side"] != "dropped"].groupby(["group", "side"]).size(), table

    plain = run(repinned, "split=stratified", "repins.mode=drop", "split.seed=3")
    counts, _ = per_side(plain)
    assert counts.max() >= 2, "the fixture must put two copies on one side without keep_one"
    one = run(repinned, "split=stratified", "repins.mode=drop", "split.seed=3", "repins.keep_one=true")
    counts, table = per_side(one)
    assert counts.max() == 1
    dedup = table[table["reason"] == "another copy is kept on this side (repins.keep_one)"]
    assert len(dedup) == one["params"]["pins_deduplicated"] >= 1
    assert one["params"]["n_samples"] == plain["params"]["n_samples"]
    assert "one per group" in one["params"]["protocol"] and "one per group" not in plain["params"]["protocol"]
    with pytest.raises(UserError, match="repins.keep_one=true needs the duplicate groups"):
        run(repinned, "repins.mode=off", "repins.keep_one=true")


def test_link_needs_a_board_split(repinned):
    from pinterest_cls.core.errors import UserError

    with pytest.raises(UserError, match="repins.mode=link keeps linked boards on one side.*use repins.mode=drop"):
        run(repinned, "split=stratified", "repins.mode=link")


def test_repins_settings_are_checked_and_the_old_audit_key_is_refused(tmp_path):
    from omegaconf import OmegaConf

    from pinterest_cls.audit import audit
    from pinterest_cls.core.errors import UserError
    from pinterest_cls.neighbors.duplicates import copy_policy

    def policy(threshold, verify=True, folder=None):
        repins = OmegaConf.merge(make_cfg("train", []).repins, {"threshold": threshold, "verify": verify})
        return copy_policy(repins, folder, None)

    for bad, message in (("abc", "must be auto .* off, or a cosine"), (2, "between -1 and 1")):
        with pytest.raises(UserError, match=message):
            policy(bad)
    assert policy("off").describe() == "exact"
    given = policy(0.9, verify=False)
    assert given.describe() == "exact + near >= 0.9 given, unverified" and given.params()["repins_verify"] is False
    assert policy("auto", folder=tmp_path).describe() == "exact (store not calibrated)"
    with pytest.raises(UserError, match="audit.near_threshold is now repins.threshold"):
        audit(make_cfg("audit", [f"paths.work={tmp_path}", "audit.near_threshold=0.95"]), progress=False)
