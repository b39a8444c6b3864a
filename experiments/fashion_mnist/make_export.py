"""Write Fashion-MNIST (the IDX files) as an export of PNG files with a CSV table, so that scan/extract/train
can run on it: columns path, label (class name), split (train | test; the data's own 60k/10k split).

    python experiments/fashion_mnist/make_export.py [--idx /usr/share/datasets/fashion-mnist] [--out /tmp/fmnist]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from PIL import Image

from pinterest_cls.finetuning.data import read_idx

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idx", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default="/tmp/fmnist")
    args = ap.parse_args()
    idx, out = Path(args.idx), Path(args.out)
    rows = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(idx / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(idx / f"{prefix}-labels-idx1-ubyte.gz")
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, (im, y) in enumerate(zip(images, labels)):
            name = f"images/{split}/{i:05d}.png"
            if not (out / name).exists():
                Image.fromarray(im, "L").save(out / name)
            rows.append((name, CLASSES[int(y)], split))
    table = out / "fashion_mnist.csv"
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(table, index=False)
    print(f"wrote {len(rows)} PNGs and {table}")


if __name__ == "__main__":
    main()
