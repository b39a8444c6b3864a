"""CPU extraction against its core-time bound: the data path (``extract.decode``, ``extract.resize``), the model
alone per runtime and precision (torch; OpenVINO in fp32, bf16 where the CPU has it natively, and NNCF's int8),
each pipeline's ``extract`` rate and its share of the bound, and what int8 does to the features.

    python experiments/throughput/cpu_bound.py [--n 1000] [--fashion 2000] [--dir /tmp/cpu_bound_bench]
        [--out cpu_bound.json] [--pairs N]

(1) Data path, on one core, per generated 736 x 1100 JPEG pin (``data.demo.synthetic_export``): read and draft
decode (Pillow, or OpenCV for ``extract.decode=opencv``), the backbone's transform (``extract.resize=tensor`` and
``pil``) and the batch's collation; the median of 3 passes. (2) The model alone on preloaded uint8 batches of 64,
every core: images/s, and its core-ms per pin (cores x 1000 / rate). (3) The bound: the model and the DataLoader
workers share the cores, so a pipeline cannot exceed cores x 1000 / (model core-ms + data core-ms) pins/s. (4)
``extract`` on the same files (the default workers, batch 64, after the first batch), its rate over the model alone
and over the bound. (5) int8: OpenVINO's model quantized by NNCF on 300 seeded pins of the Fashion set below (as
``extract.amp=int8`` calibrates on a store's own pins), with ``extract.int8.max_cosine_drop=0.005`` (NNCF's accuracy
control) and without it; the row cosine of each precision's features to OpenVINO fp32 on --fashion Fashion-MNIST
photos made 736 x 1100 pins; the test accuracy of a logistic regression (C=10) and an RBF SVM (C=10), both on
L2-normalised features with fixed hyper-parameters (none chosen on the test set), on a board-wise split (boards of
20 photos of one class, 20 % of the boards tested, seed 0), with 95 % bootstrap intervals over the test boards
(1,000 resamples, seed 0). efficientnet_lite0 with its real weights throughout. Writes ``results/<--out>``.
``--pairs N``: only (1), (2) and (4) for OpenVINO at ``extract.amp=auto`` with the tensor resize (Pillow's and
OpenCV's decode), in N rounds, each share computed within its round: on a machine whose speed drifts the phases of
one pass do not compare.
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
from pinterest_cls.data.gpu_decode import decode_opencv, plain_jpeg
from pinterest_cls.data.images import draft_scale, load_rgb
from pinterest_cls.data.loader import collate_pins
from pinterest_cls.embed.backbones import build_backbone
from pinterest_cls.embed.device import cpu_has_native_bf16
from pinterest_cls.embed.openvino_runtime import OpenVINORunner
from pinterest_cls.embed.quantization import settings, store_int8_model
from pinterest_cls.embed.runner import TorchOptions, make_runner
from pinterest_cls.extract import extract
from pinterest_cls.scan import scan

SIZE = (736, 1100)
BATCH = 64
ROWS = 16  # extract.openvino.request_rows' default
HERE = Path(__file__).resolve().parent


def make_cfg(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("extract", overrides=overrides)


def data_ms(backbones: dict, paths: list[str], passes: int = 3) -> dict:
    """Core-ms per pin on one core for each data path, ``{extract.decode}/{extract.resize}``: read + decode (Pillow's
    draft decode, or OpenCV's at the same scale for plain JPEGs: ``extract.decode=opencv``), the backbone's
    transform (``backbones``: {extract.resize: backbone}), collation; each the median of ``passes``, the paths
    timed in turn on the same files."""
    torch.set_num_threads(1)
    size = next(iter(backbones.values())).resize_size
    decoders = {"cpu": lambda p: load_rgb(p, min_size=size),
                "opencv": lambda p: decode_opencv(*_plain(p, size))}
    combos = [("cpu", "pil"), ("cpu", "tensor"), ("opencv", "tensor")]
    times: dict = {c: {"decode_ms": [], "transform_ms": [], "collate_ms": []} for c in combos}
    for _ in range(passes):
        for decode, resize in combos:
            t0 = time.perf_counter()
            images = [decoders[decode](p) for p in paths]
            t1 = time.perf_counter()
            tensors = [backbones[resize].transform(im) for im in images]
            t2 = time.perf_counter()
            for lo in range(0, len(tensors) - BATCH + 1, BATCH):
                collate_pins([(i, x, "") for i, x in enumerate(tensors[lo:lo + BATCH])])
            t3 = time.perf_counter()
            times[decode, resize]["decode_ms"].append((t1 - t0) / len(paths) * 1e3)
            times[decode, resize]["transform_ms"].append((t2 - t1) / len(paths) * 1e3)
            times[decode, resize]["collate_ms"].append((t3 - t2) / (len(tensors) // BATCH * BATCH) * 1e3)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    out = {}
    for (decode, resize), steps in times.items():
        row = {k: statistics.median(v) for k, v in steps.items()}
        row["data_ms"] = sum(row.values())
        out[f"{decode}/{resize}"] = row
    return out


def _plain(path: str, size: int):
    """(bytes, DCT scale) of a plain JPEG, as ``extract.decode=opencv``'s workers see it."""
    data, dims = plain_jpeg(path, 89478485)
    return data, draft_scale(dims, size)


def runners(backbone, int8_xml: Path, int8_all_xml: Path) -> dict:
    """The model's runners: torch (bf16 autocast where native, else fp32; its batch norms folded, as ``extract``
    folds them) and OpenVINO per precision."""
    size = int(backbone.info["input_size"])
    native = cpu_has_native_bf16()
    out = {"torch " + ("bf16" if native else "fp32"):
           make_runner(backbone, torch.device("cpu"), torch.bfloat16 if native else None, "torch",
                       TorchOptions(fold_bn=True)),  # as extract runs it (extract.fold_bn)
           "openvino fp32": OpenVINORunner(backbone.model, (size, size), "fp32", backbone.name, ROWS)}
    if native:
        out["openvino bf16"] = OpenVINORunner(backbone.model, (size, size), "bf16", backbone.name, ROWS)
    out["openvino int8"] = OpenVINORunner(backbone.model, (size, size), "int8", backbone.name, ROWS, ir=int8_xml)
    out["openvino int8, no accuracy control"] = OpenVINORunner(backbone.model, (size, size), "int8", backbone.name,
                                                               ROWS, ir=int8_all_xml)
    return out


def model_rate(runner, pool: torch.Tensor, n: int) -> float:
    runner(pool[:ROWS])
    runner(pool)  # warm-up
    done, t0 = 0, time.perf_counter()
    while done < n:
        runner(pool)
        done += len(pool)
    return done / (time.perf_counter() - t0)


def features(runner, crops: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([np.asarray(runner(torch.stack(crops[lo:lo + BATCH])), np.float32)
                           for lo in range(0, len(crops), BATCH)])


def fashion_pins(idx: Path, root: Path, n: int):
    """``n`` Fashion-MNIST training photos as 736 x 1100 JPEG files in ``root`` (``data_path.py``'s pins); their
    labels; boards of 20."""
    from data_path import fashion_pins as pins  # beside this script

    _, labels, boards = pins(idx, root, n)
    return [str(root / f"{i:05d}.jpg") for i in range(n)], labels, boards


def accuracies(X: np.ndarray, y: np.ndarray, boards: np.ndarray, test: np.ndarray) -> dict:
    """Test accuracy of logreg and svm (fixed hyper-parameters) with a 95 % bootstrap interval over test boards."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize
    from sklearn.svm import SVC

    Xn = normalize(X)
    out = {}
    test_boards = np.unique(boards[test])
    rng = np.random.default_rng(0)
    draws = [rng.choice(test_boards, len(test_boards)) for _ in range(1000)]
    for name, model in (("logreg", LogisticRegression(C=10.0, max_iter=3000)), ("svm", SVC(C=10.0))):
        right = model.fit(Xn[~test], y[~test]).predict(Xn[test]) == y[test]
        by_board = pd.Series(right).groupby(boards[test]).agg(["sum", "count"])
        shares = [by_board.loc[d, "sum"].sum() / by_board.loc[d, "count"].sum() for d in draws]
        out[name] = [float(right.mean()), float(np.quantile(shares, 0.025)), float(np.quantile(shares, 0.975))]
    return out


def rounds(backbones: dict, paths: list[str], stores: Path, common: list[str], n: int, cores: int) -> list[dict]:
    """``--pairs``: OpenVINO's model alone at ``extract.amp=auto`` and its ``extract`` with the default data path
    and with OpenCV's decode, each share computed from the data path, model and pipeline of one round."""
    backbone = backbones["tensor"]
    size = int(backbone.info["input_size"])
    amp = "bf16" if cpu_has_native_bf16() else "fp32"
    runner = OpenVINORunner(backbone.model, (size, size), amp, backbone.name, ROWS)
    pool = torch.stack([backbone.transform(load_rgb(p, min_size=backbone.resize_size)) for p in paths[:BATCH]])
    out = []
    for i in range(n):
        data = data_ms(backbones, paths[:300], passes=1)
        rate = model_rate(runner, pool, 1024)
        for decode in ("cpu", "opencv"):
            shutil.rmtree(stores, ignore_errors=True)
            meta = extract(make_cfg([*common, "extract.runtime=openvino", "extract.device=cpu",
                                     f"extract.amp={'off' if amp == 'fp32' else amp}", "extract.resize=tensor",
                                     f"extract.decode={decode}"]), progress=False)
            b = meta["last_run"]["images_per_s"]
            bound = cores * 1e3 / (cores * 1e3 / rate + data[f"{decode}/tensor"]["data_ms"])
            row = {"round": i, "amp": amp, "decode": decode, "data_ms": data[f"{decode}/tensor"]["data_ms"],
                   "model_alone": rate, "bound": bound, "extract_pins_per_s": b, "of_model_alone": b / rate,
                   "of_bound": b / bound}
            out.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    for decode in ("cpu", "opencv"):
        mine = [r for r in out if r["decode"] == decode]
        print(f"OpenVINO {amp}, extract.decode={decode}, resize=tensor, {n} rounds: of model alone "
              f"{statistics.median(r['of_model_alone'] for r in mine):.2f}, of bound "
              f"{statistics.median(r['of_bound'] for r in mine):.2f} (medians)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="generated 736 x 1100 pins for the rates")
    ap.add_argument("--fashion", type=int, default=2000, help="Fashion-MNIST pins for the features")
    ap.add_argument("--idx", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--dir", default="/tmp/cpu_bound_bench")
    ap.add_argument("--out", default="cpu_bound.json", help="the file written under results/ (one per machine)")
    ap.add_argument("--pairs", type=int, default=0,
                    help="only OpenVINO's pipelines at extract.amp=auto: the data path, the model alone and extract "
                         "measured in turn this many times, each share from one round (for a machine whose speed "
                         "drifts during a run), and their medians")
    args = ap.parse_args()
    base = Path(args.dir)
    os.environ.setdefault("PINTEREST_CLS_CACHE", str(base / "cache"))
    cores = len(os.sched_getaffinity(0))
    export = synthetic_export(base / f"export{args.n}", args.n, SIZE)
    work = base / "work"
    common = [f"paths.work={work}", f"data.root={export}", "mlflow.enabled=false", "extract.overwrite=true",
              f"extract.batch_size={BATCH}", "extract.calibrate.pins=0"]
    scan(make_cfg(common), progress=False)
    paths = pd.read_parquet(work / export.name / "manifest.parquet")["path"].tolist()
    print(f"{platform.processor() or platform.machine()}, {cores} cores, native bf16: {cpu_has_native_bf16()}, "
          f"torch {torch.__version__}, {args.n} JPEGs {SIZE[0]}x{SIZE[1]}, efficientnet_lite0", flush=True)
    out: dict = {"cores": cores, "n": args.n, "native_bf16": cpu_has_native_bf16(), "data": {}, "model": {},
                 "pipelines": [], "features": {}}

    # (1) the data path
    backbones = {r: build_backbone("efficientnet_lite0", resize=r) for r in ("tensor", "pil")}
    if args.pairs:
        out["rounds"] = rounds(backbones, paths, work / export.name / "embeddings", common, args.pairs, cores)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / args.out).write_text(json.dumps(out, indent=1))
        return
    out["data"] = data_ms(backbones, paths[:300])
    for key, row in out["data"].items():
        print(f"data path, extract.decode/resize={key}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()),
              flush=True)

    # (5 first: the int8 model is calibrated on the Fashion pins, as a store of them would be)
    fpaths, labels, boards = fashion_pins(Path(args.idx), base / "fashion", args.fashion)
    backbone = backbones["tensor"]
    xmls = {}
    for drop in (0.005, None):  # extract.int8.max_cosine_drop's default, and every operation quantized
        store = base / f"int8_store_{drop}"
        shutil.rmtree(store, ignore_errors=True)
        store.mkdir(parents=True)
        t0 = time.perf_counter()
        xmls[drop] = store_int8_model(store, "bench", backbone, fpaths, settings(300, 0, drop), ROWS, True, 89478485)
        out[f"int8_quantize_s_{drop}"] = time.perf_counter() - t0
        out[f"int8_record_{drop}"] = json.loads((xmls[drop].parent / "int8.json").read_text())
        out[f"int8_record_{drop}"].pop("rows")
    run = runners(backbone, xmls[0.005], xmls[None])

    # (2) the model alone
    pool = torch.stack([backbone.transform(load_rgb(p, min_size=backbone.resize_size)) for p in paths[:BATCH]])
    for name, r in run.items():
        rate = model_rate(r, pool, 1024)
        out["model"][name] = {"images_per_s": rate, "core_ms": cores * 1e3 / rate}
        print(f"model alone, {name}: {rate:.1f} images/s ({cores * 1e3 / rate:.2f} core-ms a pin)", flush=True)

    # (3, 4) each pipeline against its bound
    native = cpu_has_native_bf16()
    auto = "bf16" if native else "fp32"
    pipelines = [("torch", auto, "cpu", "pil"), ("torch", auto, "cpu", "tensor"), ("torch", auto, "opencv", "tensor"),
                 ("openvino", auto, "cpu", "pil"), ("openvino", auto, "cpu", "tensor"),
                 ("openvino", auto, "opencv", "tensor"), ("openvino", "int8", "cpu", "tensor"),
                 ("openvino", "int8", "opencv", "tensor")]
    for runtime, amp, decode, resize in pipelines:
        shutil.rmtree(work / export.name / "embeddings", ignore_errors=True)
        ov = ["extract.runtime=openvino", "extract.device=cpu"] if runtime == "openvino" else []
        meta = extract(make_cfg([*common, *ov, f"extract.amp={'off' if amp == 'fp32' else amp}",
                                 f"extract.resize={resize}", f"extract.decode={decode}"]), progress=False)
        b = meta["last_run"]["images_per_s"]
        model = out["model"][f"{runtime} {amp}"]
        bound = cores * 1e3 / (model["core_ms"] + out["data"][f"{decode}/{resize}"]["data_ms"])
        row = {"runtime": runtime, "amp": amp, "decode": decode, "resize": resize,
               "workers": meta["last_run"]["workers"], "extract_pins_per_s": b,
               "model_alone": model["images_per_s"], "bound": bound,
               "of_model_alone": b / model["images_per_s"], "of_bound": b / bound}
        out["pipelines"].append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    # (5) int8's features
    crops = [backbone.transform(load_rgb(p, min_size=backbone.resize_size)) for p in fpaths]
    feats = {name: features(r, crops) for name, r in run.items()}
    ref = feats["openvino fp32"]
    rng = np.random.default_rng(0)
    ub = np.unique(boards)
    test = np.isin(boards, rng.choice(ub, size=max(1, len(ub) // 5), replace=False))
    for name, X in feats.items():
        cos = (X * ref).sum(1) / np.linalg.norm(X, axis=1) / np.linalg.norm(ref, axis=1)
        out["features"][name] = {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                                 **accuracies(X, labels, boards, test)}
        f = out["features"][name]
        print(f"features, {name}: cosine to openvino fp32 {f['cos_mean']:.5f} (min {f['cos_min']:.4f}); logreg "
              f"{f['logreg'][0]:.3f} [{f['logreg'][1]:.3f}, {f['logreg'][2]:.3f}], svm {f['svm'][0]:.3f} "
              f"[{f['svm'][1]:.3f}, {f['svm'][2]:.3f}]", flush=True)
    a = out["model"]
    best = "openvino bf16" if native else "openvino fp32"
    print(f"\nint8 model alone / {best}: {a['openvino int8']['images_per_s'] / a[best]['images_per_s']:.2f}x; "
          "data path / cpu+pil's: " + ", ".join(f"{k} {v['data_ms'] / out['data']['cpu/pil']['data_ms']:.2f}"
                                                for k, v in out["data"].items()))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
