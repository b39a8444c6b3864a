"""paper_grid measurements: shard scaling, images/s per process here, and a projection for the full study.

    python experiments/paper_grid/bench.py scaling [--n 1000] [--shards 1 2 4] [--backbone efficientnet_lite0]
    python experiments/paper_grid/bench.py rates   [--n 128] [--backbones ...]
    python experiments/paper_grid/bench.py project [--pins 500000] [--gpus 1 2 4 8 16] [--decode-ms 2.14]
                                                   [--resize-ms 1.54] [--cpus-per-gpu 8]

scaling: `extract -m ... extract.shard.count=K 'extract.shard.index=range(K)' hydra/launcher=local
hydra.launcher.n_jobs=K` on N generated 736x1100 JPEGs for each K, timed end to end (process start-up
included) and per shard (from the store's progress records); prints images/s and the ratio to K=1.
rates: images/s of one extract process per backbone on this machine (random weights where the real ones
cannot be downloaded here: speed does not depend on the values).
project: hours for PINS pins x the 13 study backbones on N GPUs, from published per-GPU inference rates
(published_rates.csv: timm's benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv, model alone, AMP) and the
CPU cost of decoding and resizing a pin (measured here: `decode` prints it), for one run per backbone vs one
decode for all.
decode: ms of one CPU core to decode a generated 736x1100 JPEG (draft mode, as extract) and to resize it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from pinterest_cls.embed.registry import STUDY_BACKBONES

HERE = Path(__file__).resolve().parent
SIZE = (736, 1100)
STUDY = list(STUDY_BACKBONES)


def header(n: int) -> None:
    import torch

    print(f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, torch {torch.__version__}, "
          f"{n} JPEGs {SIZE[0]}x{SIZE[1]}", flush=True)


def scaling(args) -> None:
    from pinterest_cls.data.demo import synthetic_export

    base = Path(args.dir)
    export = synthetic_export(base / f"export{args.n}", args.n, SIZE)
    work = base / "work"
    header(args.n)
    data = [f"paths.work={work}", f"data.root={export}"]
    common = [*data, f"backbone={args.backbone}", "mlflow.enabled=false", f"extract.batch_size={args.batch_size}"]
    subprocess.run([sys.executable, "-m", "pinterest_cls.scan", *data], check=True, capture_output=True)
    store = work / export.name / "embeddings" / args.backbone
    rows = []
    for rep in range(args.reps):
        for k in args.shards:
            shutil.rmtree(store, ignore_errors=True)
            cmd = [sys.executable, "-m", "pinterest_cls.extract", "-m", *common, f"extract.shard.count={k}",
                   f"extract.shard.index=range({k})", "hydra/launcher=local", f"hydra.launcher.n_jobs={k}"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                sys.exit(proc.stderr[-3000:])
            meta = json.loads((store / "meta.json").read_text())
            shards = meta["shards"]
            assert meta["complete"], meta
            slowest = max(s["elapsed_s"] for s in shards)
            per_process = [(s["hi"] - s["lo"]) / s["elapsed_s"] for s in shards]
            rows.append(dict(rep=rep, shards=k, wall_s=wall, end_to_end=args.n / wall, extraction=args.n / slowest,
                             per_process=sum(per_process) / len(per_process),
                             threads=meta["last_run"]["threads"], workers=meta["last_run"]["workers"]))
            print(json.dumps({k2: round(v, 2) if isinstance(v, float) else v for k2, v in rows[-1].items()}),
                  flush=True)
    table = pd.DataFrame(rows).groupby("shards").median(numeric_only=True).drop(columns="rep")
    table["extraction_vs_1"] = table["extraction"] / table.loc[args.shards[0], "extraction"]
    table["end_to_end_vs_1"] = table["end_to_end"] / table.loc[args.shards[0], "end_to_end"]
    print(f"\n{args.backbone}, median of {args.reps}; images/s (extraction: N / slowest shard's extraction time; "
          "end_to_end: N / wall time of the whole multirun, process start-up included)")
    print(table.round(3).to_string())


def rates(args) -> None:
    from hydra import compose, initialize_config_dir

    from pinterest_cls.core.config import CONF_DIR
    from pinterest_cls.data.demo import synthetic_export
    from pinterest_cls.extract import extract

    base = Path(args.dir)
    export = synthetic_export(base / f"export{args.n}", args.n, SIZE)
    work = base / "work_rates"
    header(args.n)
    rows = []
    for name in args.backbones:
        over = [f"paths.work={work}", f"data.root={export}", "mlflow.enabled=false", "extract.overwrite=true",
                f"extract.batch_size={args.batch_size}"]
        if name.startswith("pixels"):  # pixels224: decode + resize to 224 + flatten, a model that costs nothing
            size = int(name[6:] or 32)
            over += ["backbone=pixels", f"backbone.image_size={size}", "backbone.grayscale=true",
                     f"backbone.name={name}"]
        else:
            over += [f"backbone={name}"] + ([] if name == "efficientnet_lite0" else ["backbone.pretrained=false"])
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("extract", overrides=over)
        meta = extract(cfg, progress=False)
        run = meta["last_run"]
        rows.append(dict(backbone=name, input=meta["preprocessing"].get("input_size"),
                         images_per_s=run["images_per_s"], wait_s=run["wait_s"], compute_s=run["compute_s"],
                         amp=run["amp"], workers=run["workers"]))
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(pd.DataFrame(rows).set_index("backbone").round(2).to_string())


def project(args) -> None:
    rates = pd.read_csv(HERE / "published_rates.csv").set_index("backbone")
    study = rates.loc[STUDY]
    cpu = args.cpus_per_gpu
    # distinct preprocessings: the five ConvNeXts share one (224 px, crop 0.875, bicubic), the others differ
    distinct = 1 + (len(STUDY) - 5)
    gpu_s = (1.0 / study["images_per_s"]).sum()  # seconds of GPU per pin for all 13 backbones
    one_run_cpu_s = (args.decode_ms + args.resize_ms) / 1e3 / cpu  # per pin, per backbone run
    separate_s = sum(max(1.0 / r, one_run_cpu_s) for r in study["images_per_s"])
    together_cpu_s = (args.decode_ms + distinct * args.resize_ms) / 1e3 / cpu
    together_s = max(gpu_s, together_cpu_s)
    print(f"published per-GPU rates (RTX 4090, AMP, model alone): {gpu_s * 1e3:.2f} ms of GPU per pin for the 13 "
          f"backbones; CPU per pin: decode {args.decode_ms} ms + resize {args.resize_ms} ms per preprocessing, "
          f"{cpu} CPUs per GPU")
    print(f"one run per backbone: the data loader delivers {1 / one_run_cpu_s:.0f} pins/s per run; "
          f"one decode for all ({distinct} distinct preprocessings): {1 / together_cpu_s:.0f} pins/s")
    print(f"{'backbone':<20}{'size':>5}{'GPU img/s':>11}{'bound by':>10}")
    for name, r in study.iterrows():
        print(f"{name:<20}{int(r.image_size):>5}{r.images_per_s:>11.0f}"
              f"{'decode' if r.images_per_s * one_run_cpu_s > 1 else 'GPU':>10}")
    print(f"\n{args.pins} pins x 13 backbones, hours of wall time on N GPUs (each with {cpu} CPUs):")
    print(f"{'GPUs':>5}{'one run per backbone':>22}{'one decode for all':>20}")
    for n in args.gpus:
        print(f"{n:>5}{args.pins * separate_s / n / 3600:>22.2f}{args.pins * together_s / n / 3600:>20.2f}")
    print(f"one decode for all / one run per backbone: {separate_s / together_s:.2f}x faster")


def grid(args) -> None:
    """The 13 study backbones in one `extract backbones=[...]` run on one GPU (one decode for all), random
    weights; prints the wall time, each backbone's GPU rate (rows / its compute time in the run) and the
    projection for --pins pins, and writes them to --csv."""
    import torch
    from hydra import compose, initialize_config_dir

    from pinterest_cls.core.config import CONF_DIR
    from pinterest_cls.data.demo import synthetic_export
    from pinterest_cls.extract import extract
    from pinterest_cls.scan import scan

    base = Path(args.dir)
    t0 = time.perf_counter()
    export = synthetic_export(base / f"export{args.n}", args.n, SIZE)
    print(f"generated {args.n} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
    header(args.n)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    work = base / "work_grid"
    names = ",".join(STUDY)
    over = [f"paths.work={work}", f"data.root={export}", "mlflow.enabled=false", "extract.overwrite=true",
            "backbones=[" + ",".join("{kind:" + b + ",pretrained:false}" for b in STUDY) + "]",
            f"extract.batch_size={args.batch_size}", f"extract.decode={args.decode}", f"extract.amp={args.amp}"]
    if args.workers:
        over.append(f"extract.workers={args.workers}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("extract", overrides=over)
    scan(cfg, progress=False)
    shutil.rmtree(work / export.name / "embeddings", ignore_errors=True)
    t0 = time.perf_counter()
    metas = extract(cfg, progress=True)
    wall = time.perf_counter() - t0
    first = next(iter(metas.values()))["last_run"]
    rows = []
    for name, meta in metas.items():
        run = meta["last_run"]
        rows.append(dict(backbone=name, image_size=meta["preprocessing"]["input_size"],
                         gpu_img_s=round(run["rows"] / run["compute_s"], 1), compute_s=round(run["compute_s"], 2)))
    table = pd.DataFrame(rows).set_index("backbone")
    gpu_s = sum(r["compute_s"] for r in rows)
    print(f"\n{gpu}: {args.n} pins x {len(STUDY)} backbones ({names}), batch {args.batch_size}, "
          f"decode={args.decode}, workers {first['workers']}, amp {first['amp']}")
    print(table.to_string())
    print(f"wall time {wall:.1f} s (models built and loaded: {wall - first['elapsed_s']:.1f} s; extraction "
          f"{first['elapsed_s']:.1f} s = {args.n / first['elapsed_s']:.0f} pins/s for all 13; steady "
          f"{first['images_per_s_after_first_batch']:.0f} pins/s); GPU compute {gpu_s:.1f} s; waiting for data "
          f"{first['wait_s']:.1f} s")
    hours = args.pins / first["images_per_s_after_first_batch"] / 3600
    print(f"projection: {args.pins} pins x 13 backbones at the steady rate: {hours:.2f} h on one such GPU, "
          f"{hours / 8:.2f} h on 8")
    table.assign(gpu=gpu, pins=args.n, batch=args.batch_size, decode=args.decode, workers=first["workers"],
                 wall_s=round(wall, 1), extraction_s=round(first["elapsed_s"], 1),
                 steady_pins_s=round(first["images_per_s_after_first_batch"], 1)).to_csv(args.csv)


def decode(args) -> None:
    from omegaconf import OmegaConf

    from pinterest_cls.data.demo import synthetic_export
    from pinterest_cls.data.images import load_rgb
    from pinterest_cls.embed.backbones import build_backbone

    export = synthetic_export(Path(args.dir) / f"export{args.n}", args.n, SIZE)
    paths = sorted(str(p) for p in export.rglob("*.jpg"))
    b = build_backbone(OmegaConf.create({"name": "p", "kind": "pixels", "image_size": 224, "grayscale": False}))
    for p in paths[:20]:
        load_rgb(p, min_size=b.resize_size)
    t0 = time.perf_counter()
    images = [load_rgb(p, min_size=b.resize_size) for p in paths]
    t1 = time.perf_counter()
    for im in images:
        b.transform(im)
    t2 = time.perf_counter()
    print(f"{len(paths)} JPEGs {SIZE[0]}x{SIZE[1]}, one core: decode {1e3 * (t1 - t0) / len(paths):.2f} ms "
          f"(draft to {images[0].size[0]}x{images[0].size[1]}), resize to 224 + tensor "
          f"{1e3 * (t2 - t1) / len(paths):.2f} ms per pin")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("scaling")
    s.add_argument("--n", type=int, default=1000)
    s.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    s.add_argument("--reps", type=int, default=1)
    s.add_argument("--backbone", default="efficientnet_lite0")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--dir", default="/tmp/paper_grid_bench")
    r = sub.add_parser("rates")
    r.add_argument("--n", type=int, default=128)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--backbones", nargs="+", default=["pixels224", "efficientnet_lite0", *STUDY])
    r.add_argument("--dir", default="/tmp/paper_grid_bench")
    p = sub.add_parser("project")
    p.add_argument("--pins", type=int, default=500_000)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--decode-ms", type=float, default=2.14,
                   help="CPU ms to decode one 736x1100 JPEG with draft 1/2 (measured here)")
    p.add_argument("--resize-ms", type=float, default=1.54, help="CPU ms to resize it to 224 px + tensor (here)")
    p.add_argument("--cpus-per-gpu", type=int, default=8)
    d = sub.add_parser("decode")
    d.add_argument("--n", type=int, default=400)
    d.add_argument("--dir", default="/tmp/paper_grid_bench")
    g = sub.add_parser("grid")
    g.add_argument("--n", type=int, default=10_000)
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--workers", type=int, default=None)
    g.add_argument("--decode", default="gpu")
    g.add_argument("--amp", default="bf16", help="random weights overflow fp16 in the deepest models")
    g.add_argument("--pins", type=int, default=500_000)
    g.add_argument("--csv", default=str(HERE / "gpu_grid.csv"))
    g.add_argument("--dir", default="/tmp/paper_grid_bench")
    args = ap.parse_args()
    {"scaling": scaling, "rates": rates, "project": project, "decode": decode, "grid": grid}[args.what](args)


if __name__ == "__main__":
    main()
