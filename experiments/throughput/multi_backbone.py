"""One decode for many backbones vs a separate extract run per backbone.

    python experiments/throughput/multi_backbone.py [--n 1000] [--reps 2] [--device auto]
        [--backbones pixels timm:mobilenetv3_small_050 timm:lcnet_050]

On N generated 736x1100 JPEGs, extracts the listed backbones (a) in one run, `extract backbones=[...]`, every
pin decoded once and resized per backbone, and (b) in one `extract backbone=...` run per backbone, one after
another, as the study did. Repeats both --reps times, alternating, and prints the wall times, images/s and the
ratio (b)/(a). Also checks that both ways wrote bitwise-identical stores.

A name `timm:MODEL` is any timm model with random weights (pretrained weights cannot be downloaded here;
speed does not depend on the values); `pixels:SIZE` is the pixel baseline at SIZE, grayscale: decode and resize
with a model that costs nothing, standing in for a backbone on a GPU much faster than the decoding (e.g.
`pixels:224 pixels:240 pixels:260`: the input sizes of efficientnet_v2_b0/b1/b2). Other names are from
conf/backbone/ (efficientnet_lite0 has real weights).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from pinterest_cls.core.config import CONF_DIR
from pinterest_cls.data.demo import synthetic_export
from pinterest_cls.embed.device import resolve_device
from pinterest_cls.embed.registry import backbone_configs
from pinterest_cls.embed.streaming import extract_many
from pinterest_cls.extract import extract
from pinterest_cls.scan import scan

SIZE = (736, 1100)


def make_cfg(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("extract", overrides=overrides)


def entry(name: str) -> str:
    """Command-line form of a backbones entry."""
    if name.startswith("timm:"):
        return f"{{kind:timm,model:{name[5:]},pretrained:false}}"
    if name.startswith("pixels:"):  # decode + resize to SIZE, grayscale: a "model" that costs nothing
        size = int(name[7:])
        return f"{{kind:pixels,name:pixels{size},image_size:{size},grayscale:true}}"
    return name


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backbones", nargs="+", default=["pixels", "timm:mobilenetv3_small_050", "timm:lcnet_050"])
    ap.add_argument("--dir", default="/tmp/multi_backbone_bench")
    args = ap.parse_args()
    base = Path(args.dir)
    export = synthetic_export(base / f"export{args.n}", args.n, SIZE)
    work = base / "work"
    device = resolve_device(args.device)
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {device}, "
          f"{args.n} JPEGs {SIZE[0]}x{SIZE[1]}, batch {args.batch_size}", flush=True)
    common = [f"paths.work={work}", f"data.root={export}", "mlflow.enabled=false", "extract.overwrite=true",
              f"extract.batch_size={args.batch_size}", f"extract.device={device}"]
    scan(make_cfg(common), progress=False)
    listed = "backbones=[" + ",".join(entry(b) for b in args.backbones) + "]"
    bcfgs = backbone_configs(make_cfg(common + [listed]))
    names = [str(b.name) for b in bcfgs]
    emb = work / export.name / "embeddings"

    def one_decode() -> float:
        shutil.rmtree(emb, ignore_errors=True)
        t0 = time.perf_counter()
        extract(make_cfg(common + [listed]), progress=False)
        return time.perf_counter() - t0

    def separate() -> tuple[float, dict]:
        shutil.rmtree(emb, ignore_errors=True)
        times = {}
        for b in bcfgs:  # exactly `extract backbone=<b>`, one run after another
            t0 = time.perf_counter()
            extract_many(make_cfg(common), [b], progress=False)
            times[str(b.name)] = time.perf_counter() - t0
        return sum(times.values()), times

    one_decode()  # warm-up: page cache, first model builds
    combined, apart, per = [], [], []
    for rep in range(args.reps):
        combined.append(one_decode())
        reference = {n: np.load(emb / n / "embeddings.npy").tobytes() for n in names}
        total, times = separate()
        apart.append(total)
        per.append(times)
        same = all(np.load(emb / n / "embeddings.npy").tobytes() == reference[n] for n in names)
        print(f"rep {rep}: one decode {combined[-1]:.1f} s; separate runs {total:.1f} s "
              f"({', '.join(f'{k} {v:.1f} s' for k, v in times.items())}); stores bitwise equal: {same}",
              flush=True)
    a, b = statistics.median(combined), statistics.median(apart)
    print()
    print(f"backbones: {', '.join(names)}")
    print(f"(a) one decode, all backbones: {a:7.1f} s  {args.n / a:7.1f} pins/s  "
          f"({len(names) * args.n / a:.1f} embeddings/s)")
    print(f"(b) one run per backbone:      {b:7.1f} s  {args.n / b:7.1f} pins/s  "
          f"({len(names) * args.n / b:.1f} embeddings/s)")
    for n in names:
        t = statistics.median(p[n] for p in per)
        print(f"      {n:<28} {t:6.1f} s  {args.n / t:7.1f} images/s alone")
    print(f"(b)/(a) = {b / a:.2f}x  (median of {args.reps} alternating repetitions)")


if __name__ == "__main__":
    main()
