"""Classifier benchmark: the kNN grid with faiss vs scikit-learn's kd_tree, and CSV vs memory-mapped loading.

    python experiments/classifiers/bench.py [--n 20000] [--dim 1280] [--queries-per-fold 400] [--dir /tmp/clf_bench]

Vectors: N generated clustered vectors (10 classes), L2-normalised (the default preprocessing), stored as the
library stores embeddings (float16 .npy beside an index) and as the study stored them (one CSV text line per
vector). One run:
  - loading every vector as float32: the study's CSV read line by line (one text line per vector, parsed
    in Python), the same CSV through pandas' C parser (the fastest way to read that file), and
    np.load(mmap_mode="r") with every row materialised; each timed as the best of --repeats runs;
  - the kNN grid as the study ran it: k in {1, 5, 10, 20, 50}, 5-fold (same StratifiedKFold folds for both),
    a fit per (k, fold): FaissKNN (exact inner product) vs KNeighborsClassifier(algorithm="kd_tree").
    Every fit uses the whole training fold; predictions are made for the same fixed subset of each test fold
    (--queries-per-fold; 0 = all). Predictions must agree; the number of disagreements is printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

from pinterest_cls.learn.estimators import FaissKNN

K_GRID = (1, 5, 10, 20, 50)


def make_vectors(n: int, dim: int, classes: int = 10, seed: int = 0):
    """Overlapping Gaussian classes (kNN accuracy well below 1, so that agreement is a real check)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=0.12, size=(classes, dim))
    y = rng.integers(0, classes, n)
    X = centers[y] + rng.normal(size=(n, dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float16).astype(np.float32), y  # the values a float16 store holds


def boundary_tie(X_train, q, k: int, tol: float = 1e-5) -> bool:
    """Whether a disagreement on query q comes from a floating-point tie: the k-th and (k+1)-th nearest
    training vectors are within ``tol`` in (float64) distance, closer than float32 arithmetic over these
    dimensions can tell apart, so faiss (float32) and scikit-learn (float64) may keep different ones."""
    d = np.sort(np.linalg.norm(X_train.astype(np.float64) - q.astype(np.float64), axis=1))
    return k < len(d) and d[k] - d[k - 1] <= tol


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--queries-per-fold", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-knn", action="store_true")
    ap.add_argument("--dir", default="/tmp/clf_bench")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    X, y = make_vectors(args.n, args.dim)
    print(f"{platform.machine()}, {os.cpu_count()} cores; {args.n} vectors x {args.dim}, {len(set(y))} classes")

    # --- loading --------------------------------------------------------------------------------------
    npy, csv = d / "embeddings.npy", d / "vectors.csv"
    arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=X.shape)
    arr[:] = X
    arr.flush()
    del arr
    with open(csv, "w") as f:
        for vec in X:
            f.write(",".join(f"{v:.8f}" for v in vec) + "\n")
    def study_csv():
        with open(csv) as f:
            return np.array([[float(v) for v in line.rstrip("\n").split(",")] for line in f], dtype=np.float32)

    def pandas_csv():
        return pd.read_csv(csv, header=None, dtype=np.float32).to_numpy()

    def memmap():
        emb = np.load(npy, mmap_mode="r")
        return np.asarray(emb[np.arange(len(emb))], dtype=np.float32)

    loads = {}
    for name, fn, repeats in [("study CSV, line by line", study_csv, 1), ("CSV, pandas", pandas_csv, args.repeats),
                              ("memory-mapped .npy", memmap, args.repeats)]:
        best = np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        assert np.allclose(out, X, atol=1e-6), name
        loads[name] = best
        print(f"load {name:24s}: {best:8.3f} s", flush=True)
    t_npy = loads["memory-mapped .npy"]
    print(f"load ratios: study CSV / memmap {loads['study CSV, line by line'] / t_npy:.0f}x, "
          f"pandas CSV / memmap {loads['CSV, pandas'] / t_npy:.0f}x "
          f"(files: CSV {csv.stat().st_size / 1e6:.0f} MB, .npy {npy.stat().st_size / 1e6:.0f} MB)")
    if args.skip_knn:
        return

    # --- kNN grid -------------------------------------------------------------------------------------
    folds = list(StratifiedKFold(n_splits=5, shuffle=True, random_state=1).split(X, y))
    rng = np.random.default_rng(2)
    q = args.queries_per_fold
    queries = [te if q <= 0 or q >= len(te) else np.sort(rng.choice(te, q, replace=False)) for _, te in folds]
    times = {"faiss": 0.0, "kd_tree": 0.0}
    disagree, explained, total, acc = 0, 0, 0, {}
    for k in K_GRID:
        for (tr, _), te in zip(folds, queries):
            t0 = time.perf_counter()
            ours = FaissKNN(k=k, weights="uniform").fit(X[tr], y[tr]).predict(X[te])
            times["faiss"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = KNeighborsClassifier(n_neighbors=k, algorithm="kd_tree").fit(X[tr], y[tr]).predict(X[te])
            times["kd_tree"] += time.perf_counter() - t0
            diff = np.flatnonzero(ours != ref)
            disagree += len(diff)
            explained += sum(boundary_tie(X[tr], X[te[i]], k) for i in diff)
            total += len(te)
            acc.setdefault(k, []).append(float((ours == y[te]).mean()))
        print(f"  k={k:2d}: accuracy {np.mean(acc[k]):.4f}; elapsed faiss {times['faiss']:.1f} s, "
              f"kd_tree {times['kd_tree']:.1f} s", flush=True)
    print(f"kNN grid ({len(K_GRID)} k x 5 folds, {total} predictions): faiss {times['faiss']:.2f} s, "
          f"kd_tree {times['kd_tree']:.1f} s; ratio {times['kd_tree'] / times['faiss']:.0f}x; "
          f"disagreements {disagree}/{total}, of which {explained} at a floating-point tie (k-th and (k+1)-th "
          f"neighbours within 1e-5 in distance, which float32 faiss and float64 scikit-learn may order differently)")


if __name__ == "__main__":
    main()
