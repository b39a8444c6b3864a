"""The audit on real pins with planted problems, and what leaving the flagged pins out of training does.

    python experiments/audit/planted_noise.py [--idx /usr/share/datasets/fashion-mnist] [--folder /tmp/audit_fmnist]
        [--boards 8] [--pins 60] [--classifiers logreg knn] [--image-size 112]

Fashion-MNIST product photos (Debian's dataset-fashion-mnist, training images) are laid out as a Pinterest
export: each class is a category with --boards boards of --pins pins, on users u0..u11, plus two clean test boards
per category on the user ``clean`` (50 pins each). Planted in the training boards:

- flipped labels: 2 % of the pins moved onto a board of a clearly different category (t-shirt <-> trouser,
  pullover <-> sandal, dress <-> bag, coat <-> sneaker, shirt <-> ankle boot);
- one off-topic board: ``u99/sneaker_drift``, labelled sneaker, holding --pins trouser photos;
- repins: 1 % of the pins copied byte for byte onto another board of their category (another user), 1 %
  resized (112 -> 100 px) and re-encoded (JPEG quality 75) onto another board.

Every pin is the 28 px photo upscaled to 112 px (JPEG quality 95), as in experiments/repins.

Everything runs through the verbs: scan, extract (efficientnet_lite0, its real ImageNet weights, fp32; which
calibrates the store's near-copy threshold), audit with its defaults, then train on the planted boards and test on
the clean boards (``split=predefined split.column=user split.test_value=clean``; near copies at 0.95, verified)
without and with ``audit.exclude``. Printed and written to ``results/planted_noise.json``: precision and recall of
each finding against what was planted, and the clean test
accuracy (95 % bootstrap interval over test boards) of each condition.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pinterest_cls.audit import audit
from pinterest_cls.core.config import compose
from pinterest_cls.extract import extract
from pinterest_cls.finetuning.sources import read_idx
from pinterest_cls.scan import scan

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
PAIRS = {0: 1, 1: 0, 2: 5, 5: 2, 3: 8, 8: 3, 4: 7, 7: 4, 6: 9, 9: 6}
IMAGE = "pin_closeup_image.jpg"


def jpeg(arr: np.ndarray, quality: int = 95, size: int = 112) -> bytes:
    """A photo as a pin: upscaled to ``size`` px (as experiments/repins), JPEG at ``quality``."""
    im = Image.fromarray(arr, "L").resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def put(root: Path, user: str, board: str, pin: str, data: bytes, category: str) -> None:
    bdir = root / user / "per_board" / board
    (bdir / pin).mkdir(parents=True, exist_ok=True)
    (bdir / "board_category.txt").write_text(category)
    (bdir / pin / IMAGE).write_bytes(data)


def build_export(root: Path, images: np.ndarray, labels: np.ndarray, boards: int, pins: int, seed: int = 0) -> dict:
    """Write the export; returns what was planted (keys user/board/pin)."""
    rng = np.random.default_rng(seed)
    if root.exists():
        shutil.rmtree(root)
    pool = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in range(10)}
    layout = []  # (user, board, pin, true class, image index)
    for c, name in enumerate(CLASSES):
        for b in range(boards):
            layout += [(f"u{(c + b) % 12}", f"{name}_{b}", f"p{p:03d}", c, pool[c].pop()) for p in range(pins)]
        for t in range(2):
            layout += [("clean", f"{name}_t{t}", f"p{p:03d}", c, pool[c].pop()) for p in range(50)]
    pins_df = pd.DataFrame(layout, columns=["user", "board", "pin", "true", "image"])
    pins_df["label"] = pins_df["true"]
    train_side = np.flatnonzero(pins_df["user"] != "clean")
    flipped = rng.choice(train_side, int(0.02 * len(train_side)), replace=False)
    for i in flipped:  # onto a board of the paired category (the pin keeps its photo, takes the board's label)
        target = PAIRS[int(pins_df.at[i, "true"])]
        pins_df.at[i, "board"] = f"{CLASSES[target]}_{rng.integers(boards)}"
        pins_df.at[i, "user"] = f"u{(target + int(pins_df.at[i, 'board'].rsplit('_', 1)[1])) % 12}"
        pins_df.at[i, "pin"] = f"flip{i}"
        pins_df.at[i, "label"] = target
    drift = [("u99", "sneaker_drift", f"p{p:03d}", 1, pool[1].pop()) for p in range(pins)]
    drift_df = pd.DataFrame(drift, columns=["user", "board", "pin", "true", "image"]).assign(label=7)
    pins_df = pd.concat([pins_df, drift_df], ignore_index=True)
    for r in pins_df.itertuples():
        put(root, r.user, r.board, r.pin, jpeg(images[r.image]), CLASSES[r.label])
    copies = []
    candidates = rng.permutation(np.setdiff1d(train_side, flipped))[: int(0.02 * len(train_side))]
    for j, i in enumerate(candidates):
        r = pins_df.loc[i]
        other = (int(r.board.rsplit("_", 1)[1]) + 1 + rng.integers(boards - 1)) % boards
        kind = "exact" if j % 2 == 0 else "near"
        data = jpeg(images[r.image]) if kind == "exact" else jpeg(images[r.image], 75, 100)
        user = f"u{(int(r.true) + other) % 12}"
        put(root, user, f"{CLASSES[int(r.true)]}_{other}", f"repin{i}", data, CLASSES[int(r.true)])
        copies.append({"kind": kind, "original": f"{r.user}/{r.board}/{r.pin}",
                       "copy": f"{user}/{CLASSES[int(r.true)]}_{other}/repin{i}"})
    key = pins_df["user"] + "/" + pins_df["board"] + "/" + pins_df["pin"]
    return {"flipped": set(key[pins_df["pin"].str.startswith("flip")]), "drift_board": "u99/sneaker_drift",
            "drift_pins": set(key[pins_df["board"] == "sneaker_drift"]), "copies": copies, "pins": len(pins_df)}


def score_audit(folder: Path, planted: dict) -> dict:
    def read(name):
        return pd.read_csv(folder / name, dtype={"user": str, "board": str, "pin": str}, keep_default_na=False)

    labels = read("label_issues.csv")
    labels["key"] = labels["user"] + "/" + labels["board"] + "/" + labels["pin"]
    flagged = set(labels.loc[labels["is_issue"], "key"])
    wrong = planted["flipped"] | planted["drift_pins"]
    top = set(labels["key"].head(len(wrong)))
    boards = read("boards.csv")
    off = set(boards.loc[boards["is_off_topic"], "user"] + "/" + boards.loc[boards["is_off_topic"], "board"])
    dups = read("duplicates.csv")
    dups["key"] = dups["user"] + "/" + dups["board"] + "/" + dups["pin"]
    group = dict(zip(dups["key"], dups["group"]))
    found = {k: [c["copy"] in group and group.get(c["original"]) == group[c["copy"]]
                 for c in planted["copies"] if c["kind"] == k] for k in ("exact", "near")}
    planted_keys = {c["copy"] for c in planted["copies"]} | {c["original"] for c in planted["copies"]}
    rest = labels[labels["is_issue"] & ~labels["key"].isin(wrong)]
    upper = {"tshirt", "pullover", "coat", "shirt", "dress"}  # Fashion-MNIST's look-alike garments
    return {
        "pins": planted["pins"], "flipped_planted": len(planted["flipped"]), "drift_pins": len(planted["drift_pins"]),
        "label_issues_flagged": len(flagged),
        "flip_recall": len(flagged & planted["flipped"]) / len(planted["flipped"]),
        "drift_pins_flagged": len(flagged & planted["drift_pins"]) / len(planted["drift_pins"]),
        "label_issue_precision_vs_planted": len(flagged & wrong) / max(1, len(flagged)),
        "flagged_not_planted": len(rest),
        "of_which_between_lookalike_garments": int((rest["given"].isin(upper) & rest["suggested"].isin(upper)).sum()),
        "of_which_on_clean_test_boards": int((rest["user"] == "clean").sum()),
        "planted_in_top_k": len(top & wrong) / len(wrong),
        "drift_board_flagged": planted["drift_board"] in off,
        "other_boards_flagged": len(off - {planted["drift_board"]}),
        "boards": len(boards),
        "exact_copies_found": float(np.mean(found["exact"])), "near_copies_found": float(np.mean(found["near"])),
        "pins_in_groups_not_planted": int((~dups["key"].isin(planted_keys)).sum()),
    }


def train_conditions(common: list[str], classifiers: list[str]) -> list[dict]:
    from pinterest_cls.train import train

    rows = []
    for clf in classifiers:
        for exclude in ([], ["off_topic"], ["label_issues"], ["label_issues", "off_topic"],
                        ["label_issues", "off_topic", "duplicates"]):
            over = [*common, f"classifier={clf}", "split=predefined", "split.column=user", "split.test_value=clean",
                    "mlflow.enabled=false", "repins.threshold=0.95"]
            if exclude:
                over.append(f"audit.exclude=[{','.join(exclude)}]")
            m = train(compose("train", over), progress=False)
            rows.append({"classifier": clf, "exclude": ",".join(exclude) or "(none)",
                         "left_out": m["params"].get("audit_excluded_pins", 0),
                         "test_pins": m["params"]["n_test"], "best": {k: m["params"][k] for k in m["params"]
                                                                      if k in ("C", "k", "weights")},
                         **{k: round(m["metrics"][k], 4) for k in ("test_accuracy", "test_accuracy_ci_low",
                                                                   "test_accuracy_ci_high", "test_f1_macro")}})
            print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idx", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--folder", type=Path, default=Path("/tmp/audit_fmnist"))
    ap.add_argument("--boards", type=int, default=8)
    ap.add_argument("--pins", type=int, default=60)
    ap.add_argument("--classifiers", nargs="+", default=["logreg", "knn"])
    ap.add_argument("--image-size", type=int, default=112)  # as experiments/repins
    args = ap.parse_args()
    images = read_idx(args.idx / "train-images-idx3-ubyte.gz")
    labels = read_idx(args.idx / "train-labels-idx1-ubyte.gz")
    root, work = args.folder / "fmnist_planted", args.folder / "work"
    planted = build_export(root, images, labels, args.boards, args.pins)
    common = [f"data.root={root}", f"paths.work={work}", "backbone=efficientnet_lite0",
              f"backbone.image_size={args.image_size}"]
    scan(compose("scan", common[:2]))
    extract(compose("extract", [*common, "mlflow.enabled=false", "extract.overwrite=true"]))  # a new export each run
    result = audit(compose("audit", [*common, "mlflow.enabled=false"]))
    found = score_audit(result["folder"], planted)
    print(json.dumps(found, indent=1))
    trained = train_conditions(common, args.classifiers)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "planted_noise.json").write_text(json.dumps({"audit": found, "audit_info": {
        k: result["info"][k] for k in ("folds", "folds_by", "oof_accuracy", "neighbour_index")},
        "train": trained}, indent=2))
    print(pd.DataFrame(trained).drop(columns=["best"]).to_string(index=False))


if __name__ == "__main__":
    main()
