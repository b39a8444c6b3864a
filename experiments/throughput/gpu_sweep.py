"""GPU throughput: the model alone vs the extract pipeline, CPU decode vs GPU decode, workers x batch.

    python experiments/throughput/gpu_sweep.py [--n 4096] [--backbones efficientnet_lite0 convnext_base
        efficientnet_v2_s xception] [--batches 128 256] [--workers 4 8 16] [--decodes cpu gpu]
        [--out experiments/throughput/gpu_results.csv]

On N generated 736x1100 JPEGs (a typical Pinterest close-up), for each backbone (random weights,
backbone.pretrained=false: the values do not change the speed) at its registered input size, with bf16 AMP
and channels_last:
  model_only_img_s: the model alone on a pinned uint8 batch already resized, copied to the GPU per batch and
      the features copied back, as extraction's Runner (pinterest_cls.embedding) does (after 3 warm-up batches);
  pipeline_img_s: `extract` from the files (DataLoader workers decode, or read the bytes for nvJPEG with
      extract.decode=gpu; rows to the memory-mapped store with commits): N over its whole extraction time,
      worker start-up and the first batch's latency included;
  ratio: pipeline_img_s / model_only_img_s;
  pipeline_img_s_after_first_batch: the rate after the first batch arrived. An upper bound only: while the
      first batch is decoded the other workers decode theirs, so with few batches per worker (N <
      several x workers x batch) it overstates the steady rate;
`cos_vs_cpu_decode`: the smallest row cosine between the GPU-decode and the CPU-decode store (same batch).
Every row goes to --out (CSV), one line per (backbone, batch, workers, decode).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from pinterest_cls.core.config import CONF_DIR
from pinterest_cls.data.demo import synthetic_export
from pinterest_cls.data.store import open_store
from pinterest_cls.embed.backbones import build_backbone
from pinterest_cls.embed.runner import TorchOptions, make_runner
from pinterest_cls.extract import extract
from pinterest_cls.scan import scan

SIZE = (736, 1100)
COLUMNS = ["device", "torch", "backbone", "image_size", "batch", "workers", "decode", "model_only_img_s",
           "pipeline_img_s", "ratio", "pipeline_img_s_after_first_batch", "wait_s", "compute_s", "cos_vs_cpu_decode",
           "jpeg_decoder", "cpus", "pins"]


def make_cfg(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("extract", overrides=overrides)


def model_only(backbone, batch: int, n: int, device) -> float:
    """images/s of the model on a pinned uint8 batch, copied in and features copied out per batch."""
    size = int(backbone.info["input_size"])
    runner = make_runner(backbone, device, torch.bfloat16, "torch", TorchOptions(fold_bn=True))  # as extract does
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    x = x.pin_memory() if device.type == "cuda" else x
    for _ in range(3):
        runner(x)
    done, t0 = 0, time.perf_counter()
    while done < n:
        runner(x)  # returns numpy features: synchronised
        done += batch
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--backbones", nargs="+",
                    default=["efficientnet_lite0", "convnext_base", "efficientnet_v2_s", "xception"])
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--decodes", nargs="+", default=["cpu", "gpu"])
    ap.add_argument("--model-n", type=int, default=4096, help="images timed for the model alone")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "gpu_results.csv"))
    ap.add_argument("--dir", default="/tmp/gpu_sweep")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script (with --decodes cpu)")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    cpus = len(os.sched_getaffinity(0))
    print(f"{name}, {platform.machine()}, {cpus} CPUs, torch {torch.__version__}; {args.n} JPEGs "
          f"{SIZE[0]}x{SIZE[1]}", flush=True)
    base = Path(args.dir)
    t0 = time.perf_counter()
    export = synthetic_export(base / f"export{args.n}", args.n, SIZE)
    print(f"generated {args.n} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
    work = base / "work"
    common = [f"paths.work={work}", f"data.root={export}", "mlflow.enabled=false", "extract.overwrite=true",
              "extract.amp=bf16", "extract.channels_last=true", f"extract.device={device}", "store.dtype=float16"]
    scan(make_cfg(common), progress=False)
    out = Path(args.out)
    new = not out.exists()
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for bname in args.backbones:
            over = [*common, f"backbone={bname}", "backbone.pretrained=false"]
            torch.manual_seed(0)
            backbone = build_backbone(make_cfg(over).backbone)
            model_rate = {b: model_only(backbone, b, args.model_n, device) for b in args.batches}
            del backbone
            torch.cuda.empty_cache()
            print(f"{bname}: model alone " + ", ".join(f"batch {b}: {r:.0f}/s" for b, r in model_rate.items()),
                  flush=True)
            for batch in args.batches:
                kept = {}
                for workers in args.workers:
                    for decode in args.decodes:
                        cfg = make_cfg([*over, f"extract.batch_size={batch}", f"extract.workers={workers}",
                                        f"extract.decode={decode}"])
                        folder = work / export.name / "embeddings" / bname
                        shutil.rmtree(folder, ignore_errors=True)  # workers are not in the fingerprint
                        run = extract(cfg, progress=False)["last_run"]
                        if workers == max(args.workers):
                            kept[decode] = np.asarray(open_store(folder).vectors, dtype=np.float32).copy()
                        cos = ""
                        if decode == "gpu" and "cpu" in kept and "gpu" in kept:
                            a, b = kept["cpu"], kept["gpu"]
                            cos = float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())
                        meta = open_store(folder).meta.to_dict()
                        row = dict(device=name, torch=torch.__version__, backbone=bname,
                                   image_size=meta["preprocessing"]["input_size"], batch=batch, workers=workers,
                                   decode=decode,
                                   model_only_img_s=round(model_rate[batch], 1),
                                   pipeline_img_s=round(run["images_per_s"], 1),
                                   ratio=round(run["images_per_s"] / model_rate[batch], 3),
                                   pipeline_img_s_after_first_batch=round(run["images_per_s_after_first_batch"], 1),
                                   wait_s=run["wait_s"], pins=args.n,
                                   compute_s=run["compute_s"], cos_vs_cpu_decode=cos if cos == "" else round(cos, 5),
                                   jpeg_decoder=run.get("jpeg_decoder", ""), cpus=cpus)
                        writer.writerow(row)
                        f.flush()
                        print(" ".join(f"{k}={row[k]}" for k in COLUMNS[2:15]), flush=True)


if __name__ == "__main__":
    main()
