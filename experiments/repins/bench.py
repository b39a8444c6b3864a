"""Repins measured on real pins: the near-copy threshold, and linking boards vs dropping copies.

    python experiments/repins/bench.py [--idx /usr/share/datasets/fashion-mnist] [--n 3000] [--repin 0.3]
        [--backbone efficientnet_lite0] [--image-size 112]

Fashion-MNIST product photos (Debian's dataset-fashion-mnist) are laid out as a Pinterest export: each class is
a category with boards of 30 pins. Then pins are repinned: a share --repin of them is copied onto 1 to 3 other
boards of the same category, each copy either byte-identical, re-encoded as JPEG (quality 60-90), resized by
0.8-1.25, or cropped by up to 10 % per side (a quarter each). Everything is embedded with efficientnet_lite0's
real weights at 112 px (`extract`, fp32), then:

1. Threshold: the cosine of each planted copy to its original, against the cosine of each original to its
   nearest other original (distinct photos): recall of copies and share of distinct pins flagged per threshold.
2. Split: `split=group` (20 % of each category's boards to test) with repins.mode=link and repins.mode=drop at
   the chosen threshold: boards linked, categories left with a test side, pins dropped, test pins that had a
   copy in training before the fix and after.
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pinterest_cls.core.config import compose
from pinterest_cls.core.errors import UserError
from pinterest_cls.data.store import open_store
from pinterest_cls.extract import extract
from pinterest_cls.finetuning.sources import read_idx
from pinterest_cls.learn.splits import apply_repins, make_splits
from pinterest_cls.neighbors.duplicates import duplicate_groups, leaked, link_boards
from pinterest_cls.scan import scan

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def variant(im: Image.Image, kind: str, rng) -> bytes:
    if kind == "resized":
        f = rng.uniform(0.8, 1.25)
        im = im.resize((max(8, round(im.width * f)), max(8, round(im.height * f))), Image.BICUBIC)
    elif kind == "cropped":
        w, h = im.size
        dx, dy = [int(rng.uniform(0, 0.1) * s) for s in (w, h)]
        im = im.crop((dx, dy, w - int(rng.uniform(0, 0.1) * w), h - int(rng.uniform(0, 0.1) * h)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(60, 91)) if kind == "reencoded" else 90)
    return buf.getvalue()


def build(idx: Path, root: Path, n: int, repin: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    images = read_idx(idx / "train-images-idx3-ubyte.gz")[:n]
    labels = read_idx(idx / "train-labels-idx1-ubyte.gz")[:n]
    shutil.rmtree(root, ignore_errors=True)
    pins, counter = [], {}
    for i, (im, y) in enumerate(zip(images, labels)):
        cat = CLASSES[int(y)]
        k = counter.get(cat, 0)
        counter[cat] = k + 1
        board = f"{cat}{k // 30:02d}"
        folder = root / f"u_{cat}" / "per_board" / board / f"p{i:05d}"
        folder.mkdir(parents=True)
        data = variant(Image.fromarray(im, "L").resize((112, 112), Image.BICUBIC), "exact", rng)
        (folder / "pin_closeup_image.jpg").write_bytes(data)
        (folder.parent / "board_category.txt").write_text(cat)
        pins.append((i, cat, board, data))
    boards = pd.DataFrame(pins, columns=["i", "cat", "board", "data"])
    planted = []
    for i, cat, board, data in pins:
        if rng.random() >= repin:
            continue
        others = [b for b in boards.loc[boards["cat"] == cat, "board"].unique() if b != board]
        for target in rng.choice(others, size=min(len(others), int(rng.integers(1, 4))), replace=False):
            kind = ["exact", "reencoded", "resized", "cropped"][int(rng.integers(0, 4))]
            copy = data if kind == "exact" else variant(Image.open(io.BytesIO(data)), kind, rng)
            folder = root / f"u_{cat}" / "per_board" / target / f"c{i:05d}_{len(planted)}"
            folder.mkdir()
            (folder / "pin_closeup_image.jpg").write_bytes(copy)
            planted.append((f"p{i:05d}", folder.name, kind))
    return pd.DataFrame(planted, columns=["original", "copy", "kind"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idx", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--repin", type=float, default=0.3)
    ap.add_argument("--backbone", default="efficientnet_lite0", help="a conf/backbone name with real weights")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--dir", default="/tmp/repins_bench")
    args = ap.parse_args()
    base = Path(args.dir)
    root = base / "export"
    planted = build(Path(args.idx), root, args.n, args.repin)
    work = base / "work"
    shutil.rmtree(work, ignore_errors=True)
    over = [f"paths.work={work}", f"data.root={root}", f"backbone={args.backbone}",
            f"backbone.image_size={args.image_size}",
            "extract.amp=off", "store.dtype=float32", "mlflow.enabled=false"]
    cfg = compose("extract", over)
    scan(cfg, progress=False)
    extract(cfg, progress=False)
    store = open_store(work / "export" / "embeddings" / args.backbone)
    index = store.pins
    X = np.asarray(store.vectors, dtype=np.float32)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    row = {pin: r for r, pin in enumerate(index["pin"])}
    print(f"{len(index)} pins: {args.n} Fashion-MNIST photos as {index['board'].nunique()} boards of 10 categories, "
          f"{len(planted)} planted copies ({planted['kind'].value_counts().to_dict()})")
    copy_sim = np.array([Xn[row[o]] @ Xn[row[c]] for o, c in zip(planted["original"], planted["copy"])])
    originals = np.array([r for r, pin in enumerate(index["pin"]) if pin.startswith("p")])
    sims = Xn[originals] @ Xn[originals].T
    np.fill_diagonal(sims, -1)
    nearest = sims.max(1)
    print("\nthreshold | copies found (all / re-encoded / resized / cropped) | distinct photos flagged")
    print("|---|---|---|")
    for t in (0.90, 0.93, 0.95, 0.97, 0.98, 0.99):
        found = copy_sim >= t
        parts = " / ".join(f"{found[planted['kind'] == k].mean():.3f}" for k in ("reencoded", "resized", "cropped"))
        print(f"| {t:.2f} | {found.mean():.3f} / {parts} | {(nearest >= t).mean():.4f} |")
    manifest = pd.read_parquet(work / "export" / "manifest.parquet").set_index("path")
    digests = index["path"].map(manifest["digest"]).to_numpy(dtype=object)
    for threshold in (None, 0.95, 0.97):
        groups = duplicate_groups(digests, X if threshold else None, threshold)["group"].to_numpy()
        frame = index.copy()
        y = frame["category"].to_numpy()
        tcfg = compose("train", [*over[:2], "split=group", f"repins.threshold={threshold or 'null'}"])
        plain = make_splits(tcfg, frame, y)
        (tr, te), = plain.folds
        print(f"\nnear threshold {threshold}: {int((groups >= 0).sum())} pins in {len(np.unique(groups[groups >= 0]))} "
              f"groups; board split: {leaked(tr, te, groups)} test pins have a copy in training")
        for mode in ("drop", "link"):
            mcfg = compose("train", [*over[:2], "split=group", f"repins.mode={mode}",
                                     f"repins.threshold={threshold or 'null'}"])
            try:
                splits, info = apply_repins(mcfg, frame.copy(), y, groups)
            except UserError as exc:
                print(f"  {mode}: {exc}")
                continue
            (tr, te), = splits.folds
            tested = frame["category"].to_numpy()[te]
            print(f"  {mode}: test pins {len(te)}, training pins {len(tr)}, dropped {info['pins_dropped']}, "
                  f"boards linked {info.get('boards_linked', 0)}, categories with a test side "
                  f"{len(np.unique(tested))}/10, test pins with a copy in training after: {leaked(tr, te, groups)}")
        if threshold is None:
            linked = link_boards(frame["board"].to_numpy(), groups)
            print(f"  linked groups of boards: {len(np.unique(linked))} from {frame['board'].nunique()} boards")


if __name__ == "__main__":
    main()
