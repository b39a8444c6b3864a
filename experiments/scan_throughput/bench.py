"""Scan throughput: files/s of full-decode verification vs header-only, with 1 worker and all cores.

    python experiments/scan_throughput/bench.py [--n 5000] [--dir /tmp/scan_bench]

Generates N 736x1100 JPEGs (a typical Pinterest close-up) as a pinterest-layout export once (reused on later
runs), then scans it four times, non-incrementally, and prints files/s and the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pinterest_cls.catalog import ScanSettings, run_scan

W, H = 736, 1100
PINS_PER_BOARD = 250


def _make(args):
    i, path = args
    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, size=(H // 16 + 1, W // 16 + 1, 3), dtype=np.uint8)
    arr = np.repeat(np.repeat(base, 16, axis=0), 16, axis=1)[:H, :W]
    im = Image.fromarray(arr)
    d = ImageDraw.Draw(im)
    for _ in range(20):
        x, y = rng.integers(0, W), rng.integers(0, H)
        d.ellipse([x, y, x + rng.integers(20, 200), y + rng.integers(20, 200)], fill=tuple(rng.integers(0, 256, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=90)


def make_export(root: Path, n: int) -> Path:
    marker = root / f".complete_{n}"
    if marker.exists():
        return root
    jobs = []
    for i in range(n):
        board = root / f"user{i // (PINS_PER_BOARD * 4)}" / "per_board" / f"board{i // PINS_PER_BOARD}"
        if i % PINS_PER_BOARD == 0:
            board.mkdir(parents=True, exist_ok=True)
            (board / "board_category.txt").write_text(f"cat{(i // PINS_PER_BOARD) % 5}\n")
        jobs.append((i, board / f"pin{i:06d}" / "pin_closeup_image.jpg"))
    with ProcessPoolExecutor() as pool:
        list(pool.map(_make, jobs, chunksize=64))
    marker.touch()
    return root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--dir", default="/tmp/scan_bench")
    args = ap.parse_args()
    root = make_export(Path(args.dir) / "export", args.n)
    out = Path(args.dir) / "work"
    cores = os.cpu_count()
    print(f"{args.n} JPEGs {W}x{H}, {sum(p.stat().st_size for p in root.rglob('*.jpg')) / args.n / 1e3:.0f} kB "
          f"each; {platform.processor() or platform.machine()}, {cores} cores")
    rates = {}
    for mode in ("header", "full"):
        for workers in (1, cores):
            settings = ScanSettings(full=mode == "full", workers=workers)
            t0 = time.perf_counter()
            report = run_scan(root, out, "pinterest", ["", "other", "none"], {}, settings,
                              incremental=False, progress=False)
            dt = time.perf_counter() - t0
            assert report["status"]["ok"] == args.n, report["status"]
            rates[(mode, workers)] = args.n / dt
            print(f"  verify={mode:6s} workers={workers}: {args.n / dt:8.0f} files/s  ({dt:.1f} s)")
    print(f"full decode / header-only (1 worker): {rates[('full', 1)] / rates[('header', 1)]:.3f}")
    print(f"full decode / header-only ({cores} workers): {rates[('full', cores)] / rates[('header', cores)]:.3f}")
    print(f"full decode, {cores} workers / 1 worker: {rates[('full', cores)] / rates[('full', 1)]:.2f}x")


if __name__ == "__main__":
    main()
