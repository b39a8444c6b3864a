"""Audit at scale: time and peak memory of ``python -m pinterest_cls.audit`` on generated stores of N x 1280 pins.

    python experiments/audit/scale.py [--sizes 100000 1000000] [--dim 1280] [--categories 20]
        [--folder /tmp/audit_scale]

For each size, a store is written as ``extract`` writes one (``embeddings.npy`` memory-mapped float32,
``index.parquet``, ``meta.json``): 250-pin boards of 20 categories, each pin a category centre plus a board style
plus noise (unit-length), with 2 % of the pins moved onto a board of another category (flipped labels) and 0.5 %
repinned as near copies onto another board. Then the audit verb runs in a child process, as a user runs it
(``mlflow.enabled=false``; the page's thumbnails point at no image files, so they say so). Measured: wall time,
the child's peak RSS (``ru_maxrss``, which counts the memory-mapped pages it holds), the share of the store's
size that is, and the planted flips and copies found. Ratios between sizes are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pinterest_cls.data.integrity import EMBEDDINGS, INDEX
from pinterest_cls.data.metadata import META
from pinterest_cls.data.store import INDEX_COLUMNS

BOARD = 250


def write_store(folder: Path, n: int, dim: int, categories: int, seed: int = 0) -> dict:
    """A complete store of ``n`` generated pins; returns the planted flips and copies (store rows)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_boards = n // BOARD
    board_cat = np.arange(n_boards) % categories
    centres = rng.standard_normal((categories, dim)).astype(np.float32)
    styles = rng.standard_normal((n_boards, dim)).astype(np.float32) * 0.6
    board = np.repeat(np.arange(n_boards), BOARD)[:n]
    true_cat = board_cat[board]
    flipped = rng.choice(n, int(0.02 * n), replace=False)
    copies = rng.choice(np.setdiff1d(np.arange(n), flipped), int(0.005 * n), replace=False)
    originals = rng.choice(np.setdiff1d(np.arange(n), np.concatenate([flipped, copies])), len(copies), replace=False)
    emb = np.lib.format.open_memmap(folder / EMBEDDINGS, mode="w+", dtype=np.float32, shape=(n, dim))
    for lo in range(0, n, 65536):
        hi = min(n, lo + 65536)
        x = centres[true_cat[lo:hi]] + styles[board[lo:hi]] + rng.standard_normal((hi - lo, dim), np.float32) * 1.2
        emb[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    for c, o in zip(copies, originals):  # a near copy: the original, slightly changed
        x = emb[o] + rng.standard_normal(dim).astype(np.float32) * 0.002  # cosine ~0.997 to it
        emb[c] = x / np.linalg.norm(x)
    emb.flush()
    del emb
    # the flipped pins sit on a board of another category: their board (and so their label) changes
    shift = rng.integers(1, categories, len(flipped))
    board = board.copy()
    for i, s in zip(flipped, shift):
        target = (true_cat[i] + s) % categories
        board[i] = rng.choice(np.flatnonzero(board_cat == target))
    label = board_cat[board]
    names = np.array([f"cat{c:02d}" for c in range(categories)])
    index = pd.DataFrame({"row": np.arange(n), "user": [f"u{b % 997}" for b in board],
                          "board": [f"b{b}" for b in board],
                          "pin": [f"p{i}" for i in range(n)], "category": names[label],
                          "path": [f"/nonexistent/p{i}.jpg" for i in range(n)], "embedded": True, "reason": ""})
    index[INDEX_COLUMNS].to_parquet(folder / INDEX, index=False)
    meta = {"backbone": "generated", "rows": n, "dim": dim, "dtype": "float32", "rows_done": n, "rows_failed": 0,
            "complete": True, "fingerprint": {"rows_sha256": f"generated-{n}-{dim}-{seed}"}}
    (folder / META).write_text(json.dumps(meta))
    return {"flipped": flipped, "copies": copies, "originals": originals}


def run_audit(work: Path, data_root: Path) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of the audit verb in a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pinterest_cls.audit", "backbone.name=generated", f"paths.work={work}",
                    f"data.root={data_root}", "mlflow.enabled=false"], check=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("note: this child's peak RSS did not exceed an earlier child's; the figure is an upper bound")
    return seconds, peak / 1e6


def found(audit_dir: Path, planted: dict, store: Path) -> dict:
    index = pd.read_parquet(store / INDEX)
    labels = pd.read_csv(audit_dir / "label_issues.csv", usecols=["pin", "is_issue"])
    flagged = set(labels.loc[labels["is_issue"], "pin"])
    flips = {f"p{i}" for i in planted["flipped"]}
    dups = pd.read_csv(audit_dir / "duplicates.csv", usecols=["group", "pin"])
    group = dict(zip(dups["pin"], dups["group"]))
    pairs = [(f"p{c}", f"p{o}") for c, o in zip(planted["copies"], planted["originals"])]
    return {"pins": len(index), "flips_planted": len(flips),
            "flip_recall": len(flips & flagged) / len(flips),
            "flip_precision": len(flips & flagged) / max(1, len(flagged)),
            "copies_planted": len(pairs),
            "copy_recall": float(np.mean([c in group and group.get(o) == group[c] for c, o in pairs]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--categories", type=int, default=20)
    ap.add_argument("--folder", type=Path, default=Path("/tmp/audit_scale"))
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        data_root = args.folder / f"gen{n}"
        work = args.folder / "work"
        store = work / data_root.name / "embeddings" / "generated"
        t0 = time.perf_counter()
        planted = write_store(store, n, args.dim, args.categories)
        print(f"{n} pins: store written in {time.perf_counter() - t0:.0f} s ({n * args.dim * 4 / 1e9:.2f} GB)")
        seconds, rss = run_audit(work, data_root)
        result = {"pins": n, "dim": args.dim, "audit_s": round(seconds, 1), "peak_rss_gb": round(rss, 2),
                  "store_gb": round(n * args.dim * 4 / 1e9, 2),
                  **found(work / data_root.name / "audit" / "generated", planted, store)}
        info = json.loads((work / data_root.name / "audit" / "generated" / "audit.json").read_text())
        result["neighbour_index"] = info["neighbour_index"]
        rows.append(result)
        print(json.dumps(result))
    table = pd.DataFrame(rows)
    if len(table) > 1:
        base = table.iloc[0]
        table["time_ratio"] = (table["audit_s"] / base["audit_s"]).round(2)
        table["rss_ratio"] = (table["peak_rss_gb"] / base["peak_rss_gb"]).round(2)
        table["pins_ratio"] = (table["pins"] / base["pins"]).round(1)
    print(table.to_string(index=False))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    table.to_csv(out / "scale.csv", index=False)


if __name__ == "__main__":
    main()
