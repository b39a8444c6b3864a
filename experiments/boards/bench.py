"""Boards as the unit on real photos: a board's category from its pins by each rule, the pins it takes to know a
board, and the uncategorised boards of an export labelled, with abstention on a category left out of training.

    python experiments/boards/bench.py [--idx /usr/share/datasets/fashion-mnist] [--boards 24] [--pins 20]
        [--mixed 5] [--held-out bag] [--backbone efficientnet_lite0] [--classifiers logreg svm]
        [--dir /tmp/boards_bench] [--name bench] [--reuse]

Fashion-MNIST training photos (Debian's dataset-fashion-mnist; from photo 20,000 on, apart from those the repins
experiments use), upscaled to 112 px JPEGs at quality 90, laid out as a Pinterest export. Every class but
--held-out is a category with --boards labelled boards and 2 boards without ``board_category.txt``; a board has
--pins pins, of which --mixed are photos of other known categories at random (boards mix themes). The held-out
class gets 8 boards of its own photos only, whose ``board_category.txt`` says "Other" (rejected by the default
``data.reject_categories``): boards of a theme the classifier never saw. Then, as a user runs them:

1. ``scan``; ``extract extract.uncategorised=true`` (the uncategorised boards' store beside the export's).
2. ``train`` with default settings (board split, board-wise inner CV, ``train.boards.abstain_target=0.05``) for
   each classifier, ``repins.threshold=off``: the photos hold no copies, and the near-copy search would only add
   its minutes. Board accuracy by rule, with intervals over the test boards; the pins-per-board curve.
3. ``predict predict.boards=uncategorised``: the known-category boards without a category labelled (accuracy,
   abstained), the held-out category's boards (abstained).

Prints the tables of ``experiments/boards/README.md`` and writes ``results/<--name>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pinterest_cls.core.config import compose
from pinterest_cls.extract import extract
from pinterest_cls.finetuning.sources import read_idx
from pinterest_cls.predict import predict
from pinterest_cls.scan import scan
from pinterest_cls.train import train

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
OFFSET = 20000
UNLABELLED_PER_CATEGORY, HELD_OUT_BOARDS = 2, 8


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "L").resize((112, 112), Image.BICUBIC).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build(idx: Path, root: Path, boards: int, pins: int, mixed: int, held_out: str, seed: int = 0) -> pd.DataFrame:
    """The export; returns its boards: user, board, truth (the category its main pins are of), kind (labelled |
    unlabelled | held_out)."""
    rng = np.random.default_rng(seed)
    images = read_idx(idx / "train-images-idx3-ubyte.gz")[OFFSET:]
    labels = read_idx(idx / "train-labels-idx1-ubyte.gz")[OFFSET:]
    pool = {c: list(rng.permutation(np.flatnonzero(labels == i))) for i, c in enumerate(CLASSES)}
    known = [c for c in CLASSES if c != held_out]
    shutil.rmtree(root, ignore_errors=True)
    rows = []

    def board(cat: str, name: str, kind: str, text: str | None, n_mixed: int) -> None:
        folder = root / f"u_{cat}" / "per_board" / name
        folder.mkdir(parents=True)
        if text is not None:
            (folder / "board_category.txt").write_text(text)
        others = [c for c in known if c != cat]
        picks = [pool[cat].pop() for _ in range(pins - n_mixed)]
        picks += [pool[others[rng.integers(len(others))]].pop() for _ in range(n_mixed)]
        for j, i in enumerate(picks):
            (folder / f"p{j:02d}").mkdir()
            (folder / f"p{j:02d}" / "pin_closeup_image.jpg").write_bytes(jpeg(images[i]))
        rows.append((f"u_{cat}", name, cat, kind))

    for cat in known:
        for b in range(boards):
            board(cat, f"{cat}{b:02d}", "labelled", cat, mixed)
        for b in range(UNLABELLED_PER_CATEGORY):
            board(cat, f"{cat}_unsorted{b}", "unlabelled", None, mixed)
    for b in range(HELD_OUT_BOARDS):
        board(held_out, f"{held_out}_misc{b}", "held_out", "Other", 0)
    return pd.DataFrame(rows, columns=["user", "board", "truth", "kind"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idx", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--boards", type=int, default=24, help="labelled boards per known category")
    ap.add_argument("--pins", type=int, default=20, help="pins per board")
    ap.add_argument("--mixed", type=int, default=5, help="pins of other categories per board")
    ap.add_argument("--held-out", default="bag", choices=CLASSES)
    ap.add_argument("--backbone", default="efficientnet_lite0", help="a conf/backbone name with real weights")
    ap.add_argument("--classifiers", nargs="+", default=["logreg", "svm"])
    ap.add_argument("--dir", default="/tmp/boards_bench")
    ap.add_argument("--name", default="bench", help="results/<name>.json")
    ap.add_argument("--reuse", action="store_true", help="keep the export and stores of an earlier run with the "
                    "same --dir (train and predict again)")
    args = ap.parse_args()
    base = Path(args.dir)
    root, work = base / "export", base / "work"
    common = [f"paths.work={work}", f"data.root={root}", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db"]
    over = [*common, f"backbone={args.backbone}"]
    if args.reuse and (base / "boards.csv").is_file():
        boards = pd.read_csv(base / "boards.csv")
        shutil.rmtree(work / "hydra", ignore_errors=True)
        (work / "mlflow.db").unlink(missing_ok=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        boards = build(Path(args.idx), root, args.boards, args.pins, args.mixed, args.held_out)
        boards.to_csv(base / "boards.csv", index=False)
        scan(compose("scan", common[:2]), progress=False)
    t0 = time.perf_counter()
    extract(compose("extract", [*over, "extract.uncategorised=true", "extract.calibrate.pins=0"]), progress=False)
    out = {"setup": vars(args) | {"offset": OFFSET}, "extract_s": time.perf_counter() - t0, "runs": {}}
    print(f"{len(boards)} boards of {args.pins} pins ({args.mixed} of other categories in each known-category "
          f"board); extract {out['extract_s']:.0f} s")
    for clf in args.classifiers:
        run = train(compose("train", [*over, f"classifier={clf}", "repins.threshold=off",
                                      "train.log_pipeline=false"]), progress=False)
        m = run["metrics"]
        folder = run["output_dir"]
        curve = pd.read_csv(folder / "board_curve.csv")
        record = json.loads((folder / "boards.json").read_text())
        labelled = predict(compose("predict", [*common, f"run_id={run['run_id']}", "predict.boards=uncategorised",
                                               f"predict.out={folder / 'predict' / 'predictions.csv'}"]))
        labelled = labelled.merge(boards, on=["user", "board"])
        unl, held = labelled[labelled["kind"] == "unlabelled"], labelled[labelled["kind"] == "held_out"]
        kept = unl[~unl["abstain"].astype(bool)]
        out["runs"][clf] = {
            "pin_accuracy": m["test_accuracy"], "pin_f1_macro": m["test_f1_macro"],
            "test_boards": int(pd.read_csv(folder / "test_boards.csv").shape[0]),
            "rules": {k: v for k, v in m.items() if k.startswith("test_board_")},
            "curve": curve.to_dict(orient="records"), "abstention": record["abstention"],
            "temperature": record["temperature"],
            "unlabelled_boards": len(unl), "unlabelled_abstained": float(unl["abstain"].astype(bool).mean()),
            "unlabelled_accuracy_all": float((unl["top1_category"] == unl["truth"]).mean()),
            "unlabelled_accuracy_kept": float((kept["top1_category"] == kept["truth"]).mean()) if len(kept) else None,
            "held_out_boards": len(held), "held_out_abstained": float(held["abstain"].astype(bool).mean()),
            "held_out_top_scores": held["top1_score"].round(4).tolist(),
            "held_out_labelled_as": held["top1_category"].value_counts().to_dict(),
        }
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(out, indent=2, default=float))
    report(out)


def cell(rules: dict, rule: str, key: str) -> str:
    name = f"test_board_{rule}_{key}"
    if name not in rules:
        return "-"
    low, high = rules.get(name + "_ci_low"), rules.get(name + "_ci_high")
    return f"{rules[name]:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")


def report(out: dict) -> None:
    print("\n| classifier | test pins: accuracy | test boards | vote | mean_prob | mean_embedding |")
    print("|---|---|---|---|---|---|")
    for clf, r in out["runs"].items():
        print(f"| {clf} | {r['pin_accuracy']:.3f} | {r['test_boards']} | "
              + " | ".join(cell(r["rules"], rule, "accuracy") for rule in ("vote", "mean_prob", "mean_embedding"))
              + " |")
    print("\nboard accuracy against pins seen per board (mean of 20 seeded draws)\n")
    first = next(iter(out["runs"].values()))
    ks = sorted({c["pins"] for c in first["curve"]})
    print("| classifier, rule | " + " | ".join(str(k) for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for clf, r in out["runs"].items():
        for rule in ("vote", "mean_prob"):
            values = {c["pins"]: c["accuracy"] for c in r["curve"] if c["rule"] == rule}
            print(f"| {clf}, {rule} | " + " | ".join(f"{values[k]:.3f}" for k in ks) + " |")
    print("\n| classifier | temperature | abstain below (calibrated on) | unlabelled known boards: abstained | "
          "labelled right (all / not abstained) | held-out category's boards abstained | held-out labelled as |")
    print("|---|---|---|---|---|---|---|")
    for clf, r in out["runs"].items():
        a = r["abstention"]
        kept = "-" if r["unlabelled_accuracy_kept"] is None else f"{r['unlabelled_accuracy_kept']:.3f}"
        print(f"| {clf} | {r['temperature']:.3f} | {a['abstain_below']:.4f} ({a['calibration_boards']} boards) | "
              f"{r['unlabelled_abstained']:.3f} of {r['unlabelled_boards']} | {r['unlabelled_accuracy_all']:.3f} / "
              f"{kept} | {r['held_out_abstained']:.3f} of {r['held_out_boards']} | {r['held_out_labelled_as']} |")


if __name__ == "__main__":
    main()
