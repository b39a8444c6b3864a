"""What CPU bf16 autocast changes against fp32, on real pins: features, classifiers, speed, side by side.

    python experiments/throughput/bf16_effect.py [--idx /usr/share/datasets/fashion-mnist] [--n-train 3000]
        [--n-test 1000] [--image-size 112] [--dir /tmp/bf16_effect]

Fashion-MNIST product photos (Debian's dataset-fashion-mnist: apt-get install dataset-fashion-mnist), the first
N_TRAIN of its training set and the first N_TEST of its test set, written as PNG pins, are embedded by `extract`
with efficientnet_lite0's real weights twice: extract.amp=off (fp32) and extract.amp=bf16, both with
store.dtype=float32. Printed: images/s of each, the row cosine between the two stores, and the test accuracy of
the same classifiers (logistic regression C=1 and 10-NN on L2-normalised features, fixed settings: nothing is
tuned, on the test set or elsewhere) trained on each, with how many test predictions differ.
"""

from __future__ import annotations

import argparse
import platform
import shutil
from pathlib import Path

import numpy as np

from pinterest_cls.core.config import compose, embeddings_dir
from pinterest_cls.data.store import open_store
from pinterest_cls.extract import extract
from pinterest_cls.finetuning.sources import write_idx_export
from pinterest_cls.scan import scan


def accuracies(X: np.ndarray, y: np.ndarray, train: np.ndarray) -> dict[str, tuple[float, np.ndarray]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import normalize

    X = normalize(X)
    out = {}
    for name, model in (("logreg C=1", LogisticRegression(C=1.0, max_iter=3000)),
                        ("10-NN", KNeighborsClassifier(10))):
        pred = model.fit(X[train], y[train]).predict(X[~train])
        out[name] = (float(np.mean(pred == y[~train])), pred)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idx", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--dir", default="/tmp/bf16_effect")
    args = ap.parse_args()
    base = Path(args.dir)
    dcfg = compose("finetune", ["data=fashion_mnist", f"data.root={args.idx}"]).data
    table = write_idx_export(dcfg, base / "pins", {"train": args.n_train, "test": args.n_test})
    stores = {}
    for amp in ("off", "bf16"):
        work = base / f"work_{amp}"
        shutil.rmtree(work, ignore_errors=True)
        cfg = compose("extract", [f"paths.work={work}", f"data.root={table}", "data.layout=csv",
                                  "data.user_column=split", "backbone=efficientnet_lite0",
                                  f"backbone.image_size={args.image_size}", f"extract.amp={amp}",
                                  "store.dtype=float32", "mlflow.enabled=false"])
        scan(cfg, progress=False)
        extract(cfg, progress=False)
        store = open_store(embeddings_dir(cfg))
        stores[amp] = (np.asarray(store.vectors, dtype=np.float64), store.pins, store.meta.to_dict())
    (a, index, ma), (b, _, mb) = stores["off"], stores["bf16"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    y = index["category"].to_numpy()
    train = index["user"].to_numpy() == "train"
    fp32, bf16 = accuracies(a, y, train), accuracies(b, y, train)
    print(f"{platform.machine()}, efficientnet_lite0 at {args.image_size} px, {len(a)} Fashion-MNIST pins "
          f"({train.sum()} train, {(~train).sum()} test)")
    print(f"images/s: fp32 {ma['last_run']['images_per_s']:.1f}, bf16 {mb['last_run']['images_per_s']:.1f} "
          f"({mb['last_run']['images_per_s'] / ma['last_run']['images_per_s']:.2f}x)")
    print(f"row cosine bf16 vs fp32: min {cos.min():.5f}, 1st percentile {np.percentile(cos, 1):.5f}, "
          f"median {np.median(cos):.5f}, mean {cos.mean():.5f}")
    print("| classifier | fp32 accuracy | bf16 accuracy | test predictions that differ |")
    print("|---|---|---|---|")
    for name in fp32:
        (acc32, p32), (acc16, p16) = fp32[name], bf16[name]
        print(f"| {name} | {acc32:.4f} | {acc16:.4f} | {int(np.sum(p32 != p16))} of {len(p32)} |")


if __name__ == "__main__":
    main()
