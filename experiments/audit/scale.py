"""Audit at scale: time and peak memory of ``python -m pinterest_cls.audit`` on generated stores of N x 1280 pins,
and what near copies (calibration, search and the pixel check) add to it.

    python experiments/audit/scale.py [--sizes 100000 1000000] [--dim 1280] [--categories 20]
        [--folder /tmp/audit_scale] [--threshold 0.9] [--repeats 3]

For each size, a store is written as ``extract`` writes one (``embeddings.npy`` memory-mapped float32,
``index.parquet``, ``meta.json``): 250-pin boards of 20 categories, each pin a category centre plus a board style
plus noise (unit-length), with 2 % of the pins moved onto a board of another category (flipped labels) and 0.5 %
repinned as near copies onto another board. Each pin has an image file (48 x 48 px, random smooth blocks; a
planted copy's file is its original's, resized to 40 px and re-encoded), so the pixel check reads real files.
Then the audit verb runs in a child process, as a user runs it (``mlflow.enabled=false``), twice: with exact
copies only (``repins.threshold=off``) and with near copies (``repins.threshold=--threshold``, verified on the
pixels). The calibration ``extract`` would make is timed on the same store with efficientnet_lite0, once as a
store extracted with the torch runtime calibrates and once as one extracted with OpenVINO (calibration embeds its
copies with the store's runtime and precision; its threshold means nothing on generated vectors; its cost is that
of a real store: 200 pins' four copies embedded, and an exact search of the 200 against every row), --repeats
times each, the median used. Measured:
wall times, each audit child's peak RSS (its own ``ru_maxrss``, which counts the memory-mapped pages it holds), the
planted flips and copies found, and the share near copies add. Ratios between sizes are printed side by side and
written to ``results/near_copies.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pinterest_cls.data.integrity import EMBEDDINGS, INDEX
from pinterest_cls.data.metadata import CALIBRATION, META
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
    paths = write_images(folder.parent.parent / "images", n, copies, originals)
    index = pd.DataFrame({"row": np.arange(n), "user": [f"u{b % 997}" for b in board],
                          "board": [f"b{b}" for b in board],
                          "pin": [f"p{i}" for i in range(n)], "category": names[label],
                          "path": paths, "embedded": True, "reason": ""})
    index[INDEX_COLUMNS].to_parquet(folder / INDEX, index=False)
    meta = {"backbone": "generated", "rows": n, "dim": dim, "dtype": "float32", "rows_done": n, "rows_failed": 0,
            "complete": True, "extract": {"resize": "tensor", "fold_bn": True},  # as extract makes a store today
            "fingerprint": {"rows_sha256": f"generated-{n}-{dim}-{seed}", "resize": "tensor", "fold_bn": True}}
    (folder / META).write_text(json.dumps(meta))
    return {"flipped": flipped, "copies": copies, "originals": originals}


def _image(args) -> None:
    i, path, copy_of = args
    rng = np.random.default_rng(i if copy_of is None else copy_of)
    blocks = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    im = Image.fromarray(np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1))
    if copy_of is None:
        im.save(path, "PNG")
    else:  # a near copy: resized and re-encoded
        im.resize((40, 40), Image.BICUBIC).save(path, "JPEG", quality=80)


def write_images(folder: Path, n: int, copies: np.ndarray, originals: np.ndarray) -> list[str]:
    """An image file per pin (made once per size); returns the paths."""
    source = dict(zip(copies.tolist(), originals.tolist()))
    paths = [str(folder / f"{i // 10000:03d}" / (f"p{i}.jpg" if i in source else f"p{i}.png")) for i in range(n)]
    marker = folder / f".done_{n}"
    if not marker.exists():
        for d in {Path(p).parent for p in paths}:
            d.mkdir(parents=True, exist_ok=True)
        with ProcessPoolExecutor() as pool:
            list(pool.map(_image, [(i, paths[i], source.get(i)) for i in range(n)], chunksize=2048))
        marker.touch()
    return paths


def time_calibration(store: Path, runtime: str) -> float:
    """Seconds of the calibration extract would make of this store, with efficientnet_lite0, had the store been
    extracted with ``runtime`` (torch or openvino: calibration embeds its copies with the store's runtime and
    precision, ``extract.amp=auto``); the record is removed: it means nothing on generated vectors. NaN where the
    runtime is not installed."""
    from pinterest_cls.core.config import compose
    from pinterest_cls.embed.backbones import build_backbone
    from pinterest_cls.embed.calibration import calibrate

    if runtime == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            print("note: calibration with the OpenVINO runtime not timed: pip install -e '.[openvino]'")
            return float("nan")
    backbone = build_backbone("efficientnet_lite0")
    meta_path = store / META
    meta = json.loads(meta_path.read_text())
    if meta["dim"] != backbone.dim:
        print(f"note: calibration not timed: the store's vectors are not efficientnet_lite0's "
              f"{backbone.dim} dimensions")
        return float("nan")
    cfg = compose("extract", [])
    written = dict(meta)
    written["extract"] = {**meta["extract"], "runtime": runtime, "amp": "auto",
                          "request_rows": int(cfg.extract.openvino.request_rows) if runtime == "openvino" else None}
    meta_path.write_text(json.dumps(written))
    try:
        t0 = time.perf_counter()
        calibrate(store, backbone, int(cfg.extract.calibrate.pins), 0, float(cfg.repins.min_pixel_score))
        seconds = time.perf_counter() - t0
    finally:
        meta_path.write_text(json.dumps(meta))
    (store / CALIBRATION).unlink()
    return seconds


def run_audit(work: Path, data_root: Path, threshold: str) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of the audit verb in a child process (that child's own ``ru_maxrss``)."""
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "pinterest_cls.audit", "backbone.name=generated",
                              f"paths.work={work}", f"data.root={data_root}", "mlflow.enabled=false",
                              f"repins.threshold={threshold}"])
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"audit failed with exit status {child.returncode}")
    return seconds, usage.ru_maxrss / 1e6


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
    ap.add_argument("--threshold", type=float, default=0.9, help="repins.threshold of the audit with near copies")
    ap.add_argument("--repeats", type=int, default=3, help="calibrations timed per runtime (their median is used)")
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        data_root = args.folder / f"gen{n}"
        data_root.mkdir(parents=True, exist_ok=True)  # the export's root: the store below stands for its pins
        work = args.folder / "work"
        store = work / data_root.name / "embeddings" / "generated"
        t0 = time.perf_counter()
        planted = write_store(store, n, args.dim, args.categories)
        print(f"{n} pins: store written in {time.perf_counter() - t0:.0f} s ({n * args.dim * 4 / 1e9:.2f} GB)")
        times = {runtime: [time_calibration(store, runtime) for _ in range(args.repeats)]
                 for runtime in ("torch", "openvino")}
        calibration = {runtime: float(np.median(t)) for runtime, t in times.items()}
        audit_dir = work / data_root.name / "audit" / "generated"
        exact_s, exact_rss = run_audit(work, data_root, "off")
        seconds, rss = run_audit(work, data_root, str(args.threshold))
        info = json.loads((audit_dir / "audit.json").read_text())
        added = {runtime: round((c + seconds - exact_s) / exact_s, 3) for runtime, c in calibration.items()}
        result = {"pins": n, "dim": args.dim, "audit_exact_only_s": round(exact_s, 1), "audit_s": round(seconds, 1),
                  "calibration_torch_s": round(calibration["torch"], 1),
                  "calibration_openvino_s": round(calibration["openvino"], 1),
                  "calibration_runs_s": {runtime: [round(x, 1) for x in t] for runtime, t in times.items()},
                  "near_copies_add_torch": added["torch"], "near_copies_add_openvino": added["openvino"],
                  "near_candidates": info["near_candidates"], "refused_by_pixels": info["near_candidates_rejected"],
                  "peak_rss_exact_only_gb": round(exact_rss, 2), "peak_rss_gb": round(rss, 2),
                  "store_gb": round(n * args.dim * 4 / 1e9, 2), **found(audit_dir, planted, store)}
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
    table.to_csv(out / "near_copies.csv", index=False)


if __name__ == "__main__":
    main()
