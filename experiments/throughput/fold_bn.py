"""Batch norm folded into the convolutions (``extract.fold_bn``, the default) against unfolded, on the eager PyTorch
runtime of a CPU, side by side in one run: the model alone per backbone, ``extract`` from files, and what folding
does to the features.

    python experiments/throughput/fold_bn.py [--n 500] [--reps 3] [--dir /tmp/fold_bn_bench]
        [--backbones efficientnet_lite0 efficientnet_v2_b0 xception convnext_tiny]

(1) The model alone: each backbone (efficientnet_lite0 with its real weights, the others with random weights,
which does not change their speed) on one preloaded batch of 32 crops of generated 736 x 1100 JPEGs, at
``extract.amp=auto`` (bf16 where the CPU has it natively, else fp32), channels-last, every core; the folded and the
unfolded model timed in turn, ``--reps`` times each, the median. The batch norms folded, of those the model has.
The features of the two on the batch: row cosine and max absolute difference. (2) ``extract`` of efficientnet_lite0
on --n such JPEGs (the default workers, batch 64), ``extract.fold_bn=true`` and ``false`` in turn, twice each:
pins/s after the first batch, the median. (3) The features of efficientnet_lite0's two stores: row cosine. Prints
the tables of ``experiments/throughput/README.md`` and writes ``results/fold_bn.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir

from pinterest_cls.core.config import CONF_DIR
from pinterest_cls.data.demo import synthetic_export
from pinterest_cls.data.images import load_rgb
from pinterest_cls.data.store import open_store
from pinterest_cls.embed.backbones import build_backbone
from pinterest_cls.embed.device import amp_name, cpu_has_native_bf16, resolve_amp
from pinterest_cls.embed.runner import TorchOptions, make_runner
from pinterest_cls.extract import extract
from pinterest_cls.scan import scan

SIZE = (736, 1100)
HERE = Path(__file__).resolve().parent


def make_cfg(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("extract", overrides=overrides)


def batch_norms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def model_alone(name: str, paths: list[str], reps: int) -> dict:
    overrides = [f"backbone={name}"] + ([] if name == "efficientnet_lite0" else ["backbone.pretrained=false"])
    torch.manual_seed(0)
    backbone = build_backbone(make_cfg(overrides).backbone)
    device = torch.device("cpu")
    amp = resolve_amp("auto", device)
    pool = torch.stack([backbone.transform(load_rgb(p, min_size=backbone.resize_size)) for p in paths])
    run = {fold: make_runner(backbone, device, amp, "torch", TorchOptions(fold_bn=fold))
           for fold in (False, True)}
    times: dict = {False: [], True: []}
    out = {fold: run[fold](pool) for fold in (False, True)}  # warm-up, and the features
    for _ in range(reps):
        for fold in (False, True):
            t0 = time.perf_counter()
            run[fold](pool)
            times[fold].append(time.perf_counter() - t0)
    a, b = out[False], out[True]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    rate = {fold: len(pool) / statistics.median(t) for fold, t in times.items()}
    return {"backbone": name, "amp": amp_name(amp), "input": int(backbone.info["input_size"]),
            "batch_norms": batch_norms(run[False].model),
            "folded": batch_norms(run[False].model) - batch_norms(run[True].model),
            "unfolded_images_per_s": rate[False], "folded_images_per_s": rate[True],
            "ratio": rate[True] / rate[False], "cos_min": float(cos.min()),
            "max_abs_diff": float(np.abs(a - b).max()), "max_abs": float(np.abs(a).max())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500, help="generated 736 x 1100 pins for extract")
    ap.add_argument("--reps", type=int, default=3, help="timed passes of each model alone")
    ap.add_argument("--dir", default="/tmp/fold_bn_bench")
    ap.add_argument("--backbones", nargs="+",
                    default=["efficientnet_lite0", "efficientnet_v2_b0", "xception", "convnext_tiny"])
    args = ap.parse_args()
    base = Path(args.dir)
    os.environ.setdefault("PINTEREST_CLS_CACHE", str(base / "cache"))
    cores = len(os.sched_getaffinity(0))
    export = synthetic_export(base / f"export{args.n}", args.n, SIZE)
    work = base / "work"
    common = [f"paths.work={work}", f"data.root={export}", "mlflow.enabled=false", "extract.overwrite=true",
              "extract.batch_size=64", "extract.calibrate.pins=0"]
    scan(make_cfg(common), progress=False)
    paths = pd.read_parquet(work / export.name / "manifest.parquet")["path"].tolist()
    print(f"{platform.processor() or platform.machine()}, {cores} cores, native bf16: {cpu_has_native_bf16()}, "
          f"torch {torch.__version__}", flush=True)
    result: dict = {"cores": cores, "native_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
                    "models": [], "extract": {}}

    for name in args.backbones:
        row = model_alone(name, paths[:32], args.reps)
        result["models"].append(row)
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    rates: dict = {True: [], False: []}
    rows = {}
    for _ in range(2):
        for fold in (False, True):
            meta = extract(make_cfg([*common, f"extract.fold_bn={str(fold).lower()}"]), progress=False)
            rates[fold].append(meta["last_run"]["images_per_s"])
            rows[fold] = np.asarray(open_store(work / export.name / "embeddings" / "efficientnet_lite0").vectors,
                                    np.float32).copy()
            shutil.rmtree(work / export.name / "embeddings", ignore_errors=True)
    a, b = rows[False], rows[True]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    result["extract"] = {"pins": args.n, "unfolded_pins_per_s": rates[False], "folded_pins_per_s": rates[True],
                         "ratio": statistics.median(rates[True]) / statistics.median(rates[False]),
                         "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}
    print(json.dumps(result["extract"]), flush=True)

    print("\n| backbone | precision | batch norms folded | unfolded, images/s | folded, images/s | **folded / "
          "unfolded** | row cosine (min) | max abs diff (of max abs) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["models"]:
        print(f"| {r['backbone']} | {r['amp']} | {r['folded']} of {r['batch_norms']} | "
              f"{r['unfolded_images_per_s']:.1f} | {r['folded_images_per_s']:.1f} | **{r['ratio']:.2f}x** | "
              f"{r['cos_min']:.6f} | {r['max_abs_diff']:.2e} ({r['max_abs']:.2f}) |")
    e = result["extract"]
    print(f"\nextract efficientnet_lite0, {args.n} pins: unfolded {statistics.median(e['unfolded_pins_per_s']):.1f}, "
          f"folded {statistics.median(e['folded_pins_per_s']):.1f} pins/s: {e['ratio']:.2f}x; stores' row cosine "
          f"{e['cos_mean']:.7f} (min {e['cos_min']:.7f})")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "fold_bn.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
