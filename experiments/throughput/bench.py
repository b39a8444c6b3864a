"""Extraction throughput: the pipeline from files vs the model alone vs a study-style loop.

    python experiments/throughput/bench.py [--n 2000] [--study-n 200] [--rss] [--dir /tmp/throughput_bench]

For each backbone (efficientnet_lite0 with its real weights; convnext_tiny with random weights, since its
pretrained weights cannot be downloaded here, which does not change its speed), on N generated 736x1100 JPEGs:
  (a) the model alone on preloaded uint8 tensors (same batch size, AMP and channels_last as extract),
  (b) the whole pipeline from files: `extract` (DataLoader workers decode with JPEG draft + resize),
  (c) the study's loop: one image at a time: full decode, preprocess, forward with batch size 1 in fp32,
      each vector appended to a CSV file as a text line; also the same loop with extract's AMP, to show how
      much of b/c comes from precision and how much from batching and the pipeline.
Prints images/s and the ratios b/a and b/c, and (a) in fp32 vs bf16 autocast (what extract.amp=auto picks on
this CPU). With --rss, the peak RSS of extract over 1,000 vs 10,000 images (efficientnet_lite0).

With --openvino (``extract.runtime=openvino``, same precision): (a) and (b) again with the model compiled by
OpenVINO, (b) with 1 and with the default number of DataLoader workers, and the ratios (b, OpenVINO) / (b, torch)
and (b, OpenVINO) / (a, OpenVINO); (a) and (b) with the model on 1 thread and 1 worker; where a pin's time goes
on the data path (one core: read, JPEG draft decode, resize + crop, collation), and the most a pipeline can reach
when the model and the workers share the cores.
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
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from pinterest_cls.core.config import CONF_DIR
from pinterest_cls.data.demo import synthetic_export
from pinterest_cls.data.images import load_rgb
from pinterest_cls.data.loader import collate_pins
from pinterest_cls.embed.backbones import build_backbone
from pinterest_cls.embed.device import amp_name, resolve_amp, resolve_device
from pinterest_cls.embed.runner import TorchOptions, make_runner
from pinterest_cls.extract import extract
from pinterest_cls.scan import scan

SIZE = (736, 1100)


def make_cfg(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("extract", overrides=overrides)


def model_alone(backbone, paths, batch_size, amp, n_images, device, channels_last=True, runtime="torch",
                threads=None):
    """(a): images/s of the model on preloaded uint8 tensors (copied to the device per batch, as extract does)."""
    if runtime == "openvino":
        from pinterest_cls.embed.openvino_runtime import OpenVINORunner

        size = backbone.info["input_size"]
        runner = OpenVINORunner(backbone.model, (size, size), amp_name(amp), backbone.name, request_rows=16,
                                threads=threads)
    else:
        # batch norms folded, as extract does
        runner = make_runner(backbone, device, amp, "torch", TorchOptions(channels_last, fold_bn=True))
    pool = torch.stack([backbone.transform(Image.open(p).convert("RGB")) for p in paths[:batch_size]])
    runner(pool[:2])  # warm-up
    done, t0 = 0, time.perf_counter()
    while done < n_images:
        runner(pool)
        done += len(pool)
    return done / (time.perf_counter() - t0)


def study_loop(backbone, paths, amp, out_csv: Path, device):
    """(c): one image at a time, as the study did: full decode, preprocess, forward with a batch of 1 in the
    model's default precision (amp=None) and memory format, and the vector appended to a CSV as a text line."""
    model = backbone.model.eval().to(device, memory_format=torch.contiguous_format)
    t0 = time.perf_counter()
    with open(out_csv, "w") as f, torch.inference_mode(), \
            torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        for p in paths:
            x = backbone.transform(Image.open(p).convert("RGB")).unsqueeze(0).to(device)
            vec = model(x).float().cpu().numpy()[0]
            f.write(",".join(f"{v:.6f}" for v in vec) + "\n")
    return len(paths) / (time.perf_counter() - t0)


def data_path(backbone, paths, batch_size) -> dict:
    """Milliseconds per pin on one core for each step of a worker's work, and the collation of a batch."""
    torch.set_num_threads(1)
    out, images, tensors = {}, [], []
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            f.read()
    out["read_ms"] = (time.perf_counter() - t0) / len(paths) * 1e3
    t0 = time.perf_counter()
    for p in paths:
        images.append(load_rgb(p, min_size=backbone.resize_size))
    out["draft_decode_ms"] = (time.perf_counter() - t0) / len(paths) * 1e3
    t0 = time.perf_counter()
    for im in images:
        tensors.append(backbone.transform(im))
    out["resize_crop_ms"] = (time.perf_counter() - t0) / len(paths) * 1e3
    t0 = time.perf_counter()
    for lo in range(0, len(tensors) - batch_size + 1, batch_size):
        collate_pins([(i, x, "") for i, x in enumerate(tensors[lo:lo + batch_size])])
    out["collate_ms"] = (time.perf_counter() - t0) / max(1, len(tensors) // batch_size * batch_size) * 1e3
    out["worker_ms"] = out["read_ms"] + out["draft_decode_ms"] + out["resize_crop_ms"]
    out.update(cheaper_steps(backbone, paths, images, tensors))
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def cheaper_steps(backbone, paths, images, tensors) -> dict:
    """Candidates for a cheaper data path, each timed and checked for the same pixels: simplejpeg (libjpeg-turbo
    without Pillow, at the draft's DCT scale; when installed) and Pillow resizing only the centre crop's box."""
    import numpy as np
    from PIL import Image as PILImage

    out = {}
    try:
        import simplejpeg
    except ImportError:
        simplejpeg = None
    if simplejpeg is not None:
        datas = [Path(p).read_bytes() for p in paths]
        t0 = time.perf_counter()
        decoded = [simplejpeg.decode_jpeg(d, min_width=im.width - 1, min_height=im.height - 1)
                   for d, im in zip(datas, images)]
        out["simplejpeg_decode_ms"] = (time.perf_counter() - t0) / len(paths) * 1e3
        out["simplejpeg_same_pixels"] = all(np.array_equal(a, np.asarray(im)) for a, im in zip(decoded, images))
    size, resize = backbone.info["input_size"], backbone.resize_size
    interp = {"bicubic": PILImage.BICUBIC, "bilinear": PILImage.BILINEAR}.get(backbone.info.get("interpolation"))
    if interp is None:
        return out
    boxed = []
    t0 = time.perf_counter()
    for im in images:
        w, h = im.size
        ow, oh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
        top, left = int(round((oh - size) / 2.0)), int(round((ow - size) / 2.0))
        sx, sy = w / ow, h / oh
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        boxed.append(torch.from_numpy(np.array(im.resize((size, size), interp, box=box))).permute(2, 0, 1))
    out["resize_crop_box_ms"] = (time.perf_counter() - t0) / len(images) * 1e3
    out["box_same_pixels_share"] = float(np.mean([torch.equal(a, b) for a, b in zip(boxed, tensors)]))
    out["box_max_pixel_diff"] = max(int((a.int() - b.int()).abs().max()) for a, b in zip(boxed, tensors))
    return out


def alternate(store: Path, torch_cfg, ov_cfg, reps: int, b: float, b_ov: float) -> dict:
    """(b) with torch and with OpenVINO, alternately, ``reps`` times in all (the first pair given): the medians
    and each pair's ratio."""
    import statistics

    pairs = [(b, b_ov)]
    for _ in range(reps - 1):
        rates = []
        for cfg in (torch_cfg, ov_cfg):
            shutil.rmtree(store, ignore_errors=True)
            rates.append(extract(cfg, progress=False)["last_run"]["images_per_s"])
        pairs.append(tuple(rates))
    ratios = [o / t for t, o in pairs]
    return {"b_pipeline_runs": [round(t, 1) for t, _ in pairs], "b_openvino_runs": [round(o, 1) for _, o in pairs],
            "b_openvino_over_b_runs": [round(r, 2) for r in ratios],
            "b_openvino_over_b_median": statistics.median(ratios)}


RSS_WRAPPER = """
import resource, subprocess, sys
subprocess.run([sys.executable, "-m", "pinterest_cls.extract", *sys.argv[1:]], check=True,
               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def rss_run(work: Path, table: Path, n: int) -> float:
    """Peak RSS (MB) of one `extract` process or any of its DataLoader workers, over the first n pins. A
    wrapper process runs it, so that the peak covers this extraction alone."""
    args = [sys.executable, "-c", RSS_WRAPPER, f"paths.work={work}", f"data.root={table}", "data.layout=csv",
            f"data.name=rss{n}", "mlflow.enabled=false", "extract.overwrite=true"]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--study-n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "convnext_tiny"])
    ap.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda")
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS over 1k vs 10k images")
    ap.add_argument("--rss-only", action="store_true", help="only the peak RSS measurement")
    ap.add_argument("--dir", default="/tmp/throughput_bench")
    ap.add_argument("--openvino", action="store_true", help="also the OpenVINO runtime's rows")
    ap.add_argument("--no-study", action="store_true", help="leave out (c), the study's one-at-a-time loop")
    ap.add_argument("--reps", type=int, default=1,
                    help="with --openvino: run (b) torch and (b) OpenVINO this many more times, alternately, and "
                         "report the median of each ratio (the runs of this 2-core machine vary by 10-20%%)")
    args = ap.parse_args()
    base = Path(args.dir)
    export = synthetic_export(base / f"export{args.n}", args.n, SIZE)
    work = base / "work"
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.n} JPEGs {SIZE[0]}x{SIZE[1]}")
    device = resolve_device(args.device)
    common = [f"paths.work={work}", f"data.root={export}", "mlflow.enabled=false", "extract.overwrite=true",
              f"extract.batch_size={args.batch_size}", f"extract.device={device}"]
    scan(make_cfg(common), progress=False)
    rows = []
    for name in [] if args.rss_only else args.backbones:
        overrides = common + [f"backbone={name}"] + (["backbone.pretrained=false"] if name != "efficientnet_lite0"
                                                     else [])
        cfg = make_cfg(overrides)
        shutil.rmtree(work / export.name / "embeddings" / name, ignore_errors=True)
        torch.manual_seed(0)
        backbone = build_backbone(cfg.backbone)
        amp = resolve_amp("auto", device)
        paths = pd.read_parquet(work / export.name / "manifest.parquet")["path"].tolist()
        a = model_alone(backbone, paths, args.batch_size, amp, min(args.n, 1024), device)
        a_fp32 = model_alone(backbone, paths, args.batch_size, None, min(args.n, 512), device)
        meta = extract(cfg, progress=False)
        b = meta["last_run"]["images_per_s"]
        row = dict(backbone=name, amp=str(amp).replace("torch.", "") if amp else "off",
                   workers=meta["last_run"]["workers"], a_model=a, b_pipeline=b)
        if not args.no_study:
            c = study_loop(backbone, paths[: args.study_n], None, base / "study_vectors.csv", device)
            c_amp = study_loop(backbone, paths[: args.study_n], amp, base / "study_vectors.csv", device)
            row.update(c_study=c, c_one_at_a_time_amp=c_amp, b_over_c=b / c, b_over_c_amp=b / c_amp)
        row.update(b_over_a=b / a, a_fp32=a_fp32, bf16_over_fp32=a / a_fp32,
                   wait_s=meta["last_run"]["wait_s"], compute_s=meta["last_run"]["compute_s"])
        if args.openvino:
            a_ov = model_alone(backbone, paths, args.batch_size, amp, min(args.n, 1024), device, runtime="openvino")
            ov = [f"{o}" for o in overrides] + ["extract.runtime=openvino", "extract.device=cpu"]
            ov_metas = {}
            for workers in sorted({1, meta["last_run"]["workers"]}):
                shutil.rmtree(work / export.name / "embeddings" / name, ignore_errors=True)
                ov_metas[workers] = extract(make_cfg(ov + [f"extract.workers={workers}"]), progress=False)["last_run"]
            best = max(ov_metas, key=lambda w: ov_metas[w]["images_per_s"])
            # one core for the model, the other(s) for the workers: the pipeline then keeps up with its model,
            # which is slower than with every core
            a_ov1 = model_alone(backbone, paths, args.batch_size, amp, min(args.n, 256), device, runtime="openvino",
                                threads=1)
            shutil.rmtree(work / export.name / "embeddings" / name, ignore_errors=True)
            b_ov1 = extract(make_cfg(ov + ["extract.workers=1", "extract.threads=1"]), progress=False)["last_run"]
            row.update(a_openvino_1_thread=a_ov1, b_openvino_1_thread_1_worker=b_ov1["images_per_s"],
                       b_over_a_openvino_1_thread=b_ov1["images_per_s"] / a_ov1)
            b_ov = ov_metas[best]["images_per_s"]
            row.update(a_openvino=a_ov, a_openvino_over_a=a_ov / a,
                       **{f"b_openvino_{w}_workers": m["images_per_s"] for w, m in ov_metas.items()},
                       b_openvino_over_b=b_ov / b, b_openvino_over_a_openvino=b_ov / a_ov,
                       openvino_wait_s=ov_metas[best]["wait_s"], openvino_compute_s=ov_metas[best]["compute_s"],
                       **data_path(backbone, paths[:256], args.batch_size))
            # the most a pipeline can reach when the model and the workers share the same cores: each pin costs
            # the model's core-time plus the workers' (read, decode, resize)
            cores = len(os.sched_getaffinity(0))
            row["b_openvino_bound"] = cores * 1e3 / (cores * 1e3 / a_ov + row["worker_ms"])
            row["bound_over_a_openvino"] = row["b_openvino_bound"] / a_ov
            if args.reps > 1:
                row.update(alternate(work / export.name / "embeddings" / name, make_cfg(overrides),
                                     make_cfg(ov + [f"extract.workers={best}"]), args.reps, b, b_ov))
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    if rows:
        print()
        print(pd.DataFrame(rows).set_index("backbone").round(3).T.to_string())
    if args.rss or args.rss_only:
        big = synthetic_export(base / "export10000", 10000, SIZE)
        scan(make_cfg([f"paths.work={work}", f"data.root={big}", "mlflow.enabled=false"]), progress=False)
        ok = pd.read_parquet(work / big.name / "manifest.parquet").query("status == 'ok'")
        for n in (1000, 10000):
            t = base / f"first{n}.csv"
            pd.DataFrame({"path": ok["path"][:n], "label": ok["category"][:n]}).to_csv(t, index=False)
            print(f"peak RSS, extract over {n:>5} images: {rss_run(work, t, n):7.0f} MB", flush=True)


if __name__ == "__main__":
    main()
