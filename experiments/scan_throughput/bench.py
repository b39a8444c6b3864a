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
from pathlib import Path

from pinterest_cls.core.config import compose
from pinterest_cls.data.demo import synthetic_export
from pinterest_cls.data.manifest import ScanSettings, run_scan

W, H = 736, 1100


def main() -> None:
    data_cfg = compose("scan", []).data  # the export layout's defaults (image_name)
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--dir", default="/tmp/scan_bench")
    args = ap.parse_args()
    root = synthetic_export(Path(args.dir) / "export", args.n, (W, H))
    out = Path(args.dir) / "work"
    cores = os.cpu_count()
    print(f"{args.n} JPEGs {W}x{H}, {sum(p.stat().st_size for p in root.rglob('*.jpg')) / args.n / 1e3:.0f} kB "
          f"each; {platform.processor() or platform.machine()}, {cores} cores")
    rates = {}
    for mode in ("header", "full"):
        for workers in (1, cores):
            settings = ScanSettings(full=mode == "full", workers=workers)
            t0 = time.perf_counter()
            report = run_scan(root, out, "pinterest", ["", "other", "none"], data_cfg, settings,
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
