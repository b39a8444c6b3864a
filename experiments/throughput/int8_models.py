"""int8 against bf16 and fp32 for the model alone, per backbone: does NNCF's int8 pay on this CPU, and for which
models?

    python experiments/throughput/int8_models.py [--backbones efficientnet_lite0 convnext_tiny] [--pins 300]

For each backbone (efficientnet_lite0 with its real weights; any other with random weights,
``backbone.pretrained=false``, which does not change its speed), OpenVINO's model is quantized by NNCF on --pins
generated 736 x 1100 pins (``data.demo.synthetic_export``, decoded and resized by the backbone's own transform):
every operation NNCF can quantize (``extract.int8.max_cosine_drop=null``), and, with --accuracy-control, also the
default accuracy control (0.005). Then the model alone, on one preloaded batch of 64 run repeatedly, both cores, in
fp32, bf16 (where the CPU has it natively) and int8: images/s and the ratios int8 / bf16 and int8 / fp32, with
the mean row cosine of int8's features to fp32's on that batch (meaningful with real weights only). Writes
``results/int8_models.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pinterest_cls.data.demo import synthetic_export
from pinterest_cls.data.images import load_rgb
from pinterest_cls.embed.backbones import build_backbone
from pinterest_cls.embed.device import cpu_has_native_bf16
from pinterest_cls.embed.openvino_runtime import OpenVINORunner
from pinterest_cls.embed.quantization import settings, store_int8_model

ROWS, BATCH = 16, 64
HERE = Path(__file__).resolve().parent


def rate(runner, pool: torch.Tensor, seconds: float = 8.0) -> float:
    runner(pool)  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        runner(pool)
        done += len(pool)
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "convnext_tiny"])
    ap.add_argument("--pins", type=int, default=300)
    ap.add_argument("--accuracy-control", action="store_true")
    ap.add_argument("--dir", default="/tmp/int8_models_bench")
    args = ap.parse_args()
    base = Path(args.dir)
    os.environ.setdefault("PINTEREST_CLS_CACHE", str(base / "cache"))
    export = synthetic_export(base / f"export{args.pins}", args.pins, (736, 1100))
    files = sorted(str(p) for p in export.rglob("pin_closeup_image.jpg"))
    native = cpu_has_native_bf16()
    print(f"{os.cpu_count()} cores, native bf16: {native}, {args.pins} calibration pins", flush=True)
    rows = []
    for name in args.backbones:
        torch.manual_seed(0)
        bcfg = {"name": name} if name == "efficientnet_lite0" else {"name": name, "pretrained": False}
        backbone = build_backbone(bcfg)
        size = (int(backbone.info["input_size"]),) * 2
        pool = torch.stack([backbone.transform(load_rgb(p, min_size=backbone.resize_size)) for p in files[:BATCH]])
        runners = {"fp32": OpenVINORunner(backbone.model, size, "fp32", name, ROWS)}
        if native:
            runners["bf16"] = OpenVINORunner(backbone.model, size, "bf16", name, ROWS)
        for drop in ([None, 0.005] if args.accuracy_control else [None]):
            store = base / f"{name}_{drop}"
            shutil.rmtree(store, ignore_errors=True)
            store.mkdir(parents=True)
            t0 = time.perf_counter()
            xml = store_int8_model(store, "bench", backbone, files, settings(args.pins, 0, drop), ROWS, True, 10**9)
            key = "int8" if drop is None else f"int8, accuracy control {drop}"
            print(f"{name}: {key} quantized in {time.perf_counter() - t0:.0f} s", flush=True)
            runners[key] = OpenVINORunner(backbone.model, size, "int8", name, ROWS, ir=xml)
        ref = np.asarray(runners["fp32"](pool), np.float64)
        row = {"backbone": name, "weights": backbone.info.get("weights")}
        for key, runner in runners.items():
            row[key] = rate(runner, pool)
            if key.startswith("int8"):
                f = np.asarray(runner(pool), np.float64)
                row[f"{key} cosine to fp32"] = float(((f * ref).sum(1) / np.linalg.norm(f, axis=1)
                                                      / np.linalg.norm(ref, axis=1)).mean())
        best = "bf16" if native else "fp32"
        for key in [k for k in runners if k.startswith("int8")]:
            row[f"{key} / {best}"] = row[key] / row[best]
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "int8_models.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
