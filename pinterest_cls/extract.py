"""``python -m pinterest_cls.extract backbone=NAME``: stream the manifest's ok pins through a backbone into
``${paths.work}/${data.name}/embeddings/${backbone.name}/`` (resumable, shardable, corrupt-safe, AMP)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__, config
from .catalog import MANIFEST, file_sha256, load_manifest
from .errors import UserError, user_errors_exit
from .store import EmbeddingStore, rows_sha256, shard_range

#: Test hook: kill -9 this process right after writing the Nth batch's rows, before they are committed.
KILL_ENV = "PINTEREST_CLS_KILL_AFTER_BATCH"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"extract.device={name} but CUDA is not available here; use extract.device=auto or cpu")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast measures faster
    than fp32 (experiments/throughput); without it bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: on CUDA bf16 where supported, else fp16; on CPU bf16 where the CPU has native bf16, else
    none. ``off`` | ``bf16`` | ``fp16`` force it."""
    amp = str(amp)
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise UserError(f"extract.amp={amp!r} must be one of: auto, off, bf16, fp16")
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


class Runner:
    """Runs a feature model on batches; on CUDA out-of-memory, halves the micro-batch and retries."""

    def __init__(self, model: torch.nn.Module, device: torch.device, amp: torch.dtype | None,
                 channels_last: bool):
        self.model, self.device, self.amp, self.channels_last = model, device, amp, channels_last
        self.micro_batch: int | None = None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with ctx:
            return self.model(x).float()

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            while True:
                step = self.micro_batch or len(x)
                try:
                    parts = [self._forward(x[i:i + step]) for i in range(0, len(x), step)]
                    return torch.cat(parts).cpu().numpy()
                except torch.cuda.OutOfMemoryError:
                    if step <= 1:
                        raise
                    torch.cuda.empty_cache()
                    self.micro_batch = max(1, step // 2)
                    print(f"CUDA out of memory: retrying with micro-batches of {self.micro_batch}",
                          file=sys.stderr, flush=True)


def backbone_from_meta(meta: dict, check_weights: bool = True):
    """Rebuild the backbone that made a store (``meta.json``): same config, same seed for random init, and
    (when the store recorded one) the same weights sha256."""
    from .backbones import build_backbone

    bcfg = OmegaConf.create(meta["backbone_config"])
    torch.manual_seed(int(meta.get("extract", {}).get("seed", 0)))
    backbone = build_backbone(bcfg)
    want, got = meta.get("weights_sha256"), backbone.info.get("weights_sha256")
    if check_weights and want and got != want:
        raise UserError(f"the weights found for backbone {meta['backbone']} ({backbone.info.get('weights')}, "
                        f"sha256 {got}) differ from those the embeddings were made with (sha256 {want}); "
                        "supply the original file with backbone.weights")
    return backbone


def embed_paths(backbone, paths: list[str], *, batch_size: int = 64, workers: int | None = None,
                device: str = "auto", amp: str = "auto", draft: bool = True, progress: bool = False,
                max_pixels: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Features (len(paths) x D, float32; zeros where decoding failed) and a reason per path ("" = ok),
    through the same Dataset, loader and runner as ``extract``."""
    from tqdm.auto import tqdm

    from .data import PinDataset, default_workers, make_loader
    from .images import DEFAULT_MAX_PIXELS

    dev = resolve_device(device)
    runner = Runner(prepare_model(backbone.model, dev, True, False), dev, resolve_amp(amp, dev), True)
    dataset = PinDataset(list(map(str, paths)), range(len(paths)), backbone.transform, backbone.resize_size,
                         draft=draft, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    n_workers = default_workers() if workers is None else workers
    loader = make_loader(dataset, batch_size, min(n_workers, max(0, len(paths) // batch_size)),
                         pin_memory=dev.type == "cuda")
    feats = np.zeros((len(paths), backbone.dim), dtype=np.float32)
    reasons = [""] * len(paths)
    with tqdm(total=len(paths), desc=f"embed {backbone.name}", unit="img", disable=not progress) as bar:
        for rows, pixels, failed in loader:
            if pixels is not None:
                feats[rows.numpy()] = runner(pixels)
            for row, reason in failed:
                reasons[row] = reason
            bar.update(len(rows) + len(failed))
    return feats, reasons


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool, compile_: bool):
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        model = torch.compile(model)
    return model


def ok_rows(cfg: DictConfig):
    """The manifest's ok rows (running ``scan`` first when there is no manifest yet)."""
    out = config.data_dir(cfg)
    if not (out / MANIFEST).is_file():
        print(f"No manifest in {out}: scanning first.", flush=True)
        from .scan import scan

        scan(cfg)
    manifest = load_manifest(out)
    ok = manifest[manifest["status"] == "ok"].reset_index(drop=True)
    if ok.empty:
        raise UserError(f"the manifest {out / MANIFEST} has no ok pins to embed; see scan_report.json")
    return manifest, ok


def store_dir(cfg: DictConfig, backbone_name: str) -> Path:
    return config.data_dir(cfg) / "embeddings" / backbone_name


def library_versions() -> dict:
    import PIL
    import timm

    return {"pinterest_cls": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "python": sys.version.split()[0]}


def extract(cfg: DictConfig, progress: bool = True) -> dict:
    """Run (or resume) this job's shard of the extraction; returns the store's meta."""
    from tqdm.auto import tqdm

    from .backbones import build_backbone
    from .data import PinDataset, default_workers, make_loader

    ecfg = cfg.extract
    manifest, ok = ok_rows(cfg)
    device = resolve_device(str(ecfg.device))
    amp = resolve_amp(ecfg.amp, device)
    batch_size = int(ecfg.batch_size)
    if batch_size < 1:
        raise UserError(f"extract.batch_size={batch_size} must be >= 1")
    torch.manual_seed(int(ecfg.seed))  # random-init backbones (pretrained=false) are reproducible
    backbone = build_backbone(cfg.backbone)
    dtype = str(cfg.store.dtype)
    if dtype not in ("float16", "float32"):
        raise UserError(f"store.dtype={dtype!r} must be float16 or float32")

    folder = store_dir(cfg, backbone.name)
    index = ok.rename_axis("row").reset_index()[["row", "user", "board", "pin", "category", "path"]]
    fingerprint = {
        **{k: v for k, v in backbone.info.items() if k != "weights"},
        "weights": backbone.info["weights"] if backbone.info.get("weights_sha256") is None else None,
        "rows_sha256": rows_sha256(ok), "rows": len(ok), "dtype": dtype, "batch_size": batch_size,
        "draft": bool(ecfg.draft), "amp": str(amp).replace("torch.", "") if amp else None,
        "seed": int(ecfg.seed),
    }
    meta = {
        "backbone": backbone.name, "timm_id": backbone.info.get("timm_id"),
        "weights": backbone.info.get("weights"), "weights_sha256": backbone.info.get("weights_sha256"),
        "preprocessing": {k: backbone.info.get(k) for k in
                          ("input_size", "resize_size", "crop_pct", "interpolation", "mean", "std", "grayscale")
                          if k in backbone.info},
        "pool": backbone.info.get("pool"), "dtype": dtype,
        # what predict/search need to embed new images exactly like these rows
        "backbone_config": OmegaConf.to_container(cfg.backbone, resolve=True),
        "extract": {"seed": int(ecfg.seed), "draft": bool(ecfg.draft), "amp": str(ecfg.amp),
                    "batch_size": batch_size, "max_pixels": int(cfg.scan.max_pixels)},
        "manifest": str(config.data_dir(cfg) / MANIFEST),
        "manifest_sha256": file_sha256(config.data_dir(cfg) / MANIFEST),
        "versions": library_versions(),
    }
    store = EmbeddingStore.open_or_create(folder, index, backbone.dim, dtype, meta, fingerprint,
                                          overwrite=bool(ecfg.overwrite))
    lo, hi = shard_range(len(ok), batch_size, int(ecfg.shard.index), int(ecfg.shard.count))
    record = store.progress(lo, hi)
    start = record["done"]
    shard_name = f"shard {ecfg.shard.index}/{ecfg.shard.count} rows [{lo}, {hi})"
    if start >= hi:
        print(f"{backbone.name}: {shard_name} already done.", flush=True)
        return store.finalize()
    if start > lo:
        print(f"{backbone.name}: resuming {shard_name} at row {start} ({start - lo} rows already committed).",
              flush=True)

    workers = default_workers() if ecfg.workers is None else int(ecfg.workers)
    paths = ok["path"].tolist()
    dataset = PinDataset(paths, range(start, hi), backbone.transform, backbone.resize_size,
                         draft=bool(ecfg.draft), max_pixels=int(cfg.scan.max_pixels))
    loader = make_loader(dataset, batch_size, workers, pin_memory=device.type == "cuda")
    runner = Runner(prepare_model(backbone.model, device, bool(ecfg.channels_last), bool(ecfg.compile)),
                    device, amp, bool(ecfg.channels_last))
    commit_every = max(1, int(ecfg.commit_every))
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    array = store.array
    failures: dict = dict(record["failures"])
    timings: list[tuple[int, int, float, float]] = []
    done, batches = start, record["batches"]
    t_start = time.perf_counter()
    bar = tqdm(total=hi - start, desc=f"extract {backbone.name}", unit="img", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    t_ready = time.perf_counter()
    for n, (rows, pixels, failed) in enumerate(loader, start=1):
        t_batch = time.perf_counter()
        size = len(rows) + len(failed)
        if pixels is not None:
            feats = runner(pixels)
            array[rows.numpy()] = feats.astype(array.dtype)
        for row, reason in failed:
            array[row] = 0  # a failed row holds zeros, whatever an interrupted run left there
            failures[str(row)] = reason
        t_done = time.perf_counter()
        timings.append((batches, size, t_batch - t_ready, t_done - t_batch))
        done += size
        batches += 1
        bar.update(size)
        if kill_after and n == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if n % commit_every == 0 or done >= hi:
            elapsed = record["elapsed_s"] + time.perf_counter() - t_start
            store.commit({"lo": lo, "hi": hi, "done": done, "failures": failures, "elapsed_s": round(elapsed, 3),
                          "batches": batches})
        t_ready = time.perf_counter()
    bar.close()
    elapsed = time.perf_counter() - t_start
    rate = (hi - start) / elapsed if elapsed > 0 else float("nan")
    shard_failed = sum(1 for r in failures if lo <= int(r) < hi)
    stats = {"images_per_s": rate, "elapsed_s": elapsed, "rows": hi - start, "failed": shard_failed,
             "wait_s": sum(t[2] for t in timings), "compute_s": sum(t[3] for t in timings),
             "micro_batch": runner.micro_batch, "workers": workers, "device": device.type,
             "amp": str(amp).replace("torch.", "") if amp else "off", "shard": shard_name}
    meta = store.finalize({"last_run": {k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()}})
    tag = f"rows_{lo:010d}_{hi:010d}_from_{start:010d}"
    _report(cfg, backbone, meta, stats, timings, folder, tag, shard_name, workers, amp, device)
    return meta


def _report(cfg, backbone, meta, stats, timings, folder, tag, shard_name, workers, amp, device) -> None:
    from .plots import batch_timings_plot
    from .tracking import mlflow_run

    timing_csv = folder / "timings" / f"{tag}.csv"
    timing_csv.parent.mkdir(exist_ok=True)
    with open(timing_csv, "w") as f:
        f.write("batch,images,wait_s,compute_s\n")
        f.writelines(f"{b},{n},{w:.6f},{c:.6f}\n" for b, n, w, c in timings)
    png = batch_timings_plot(timings, timing_csv.with_suffix(".png"),
                             title=f"{backbone.name} on {device.type}, {shard_name}")
    print(f"{backbone.name}: {shard_name}: {stats['rows']} images in {stats['elapsed_s']:.1f} s "
          f"({stats['images_per_s']:.1f} images/s; waiting for data {stats['wait_s']:.1f} s, "
          f"computing {stats['compute_s']:.1f} s), {stats['failed']} failed", flush=True)
    state = "complete" if meta["complete"] else f"{meta['rows_done']}/{meta['rows']} rows done"
    print(f"store {folder}: {state}, {meta['rows_failed']} failed rows", flush=True)
    params = {"backbone": backbone.name, "timm_id": backbone.info.get("timm_id"),
              "weights_sha256": backbone.info.get("weights_sha256"), "weights": backbone.info.get("weights"),
              "image_size": backbone.info.get("input_size"), "pool": backbone.info.get("pool"),
              "batch_size": int(cfg.extract.batch_size), "workers": workers,
              "amp": str(amp).replace("torch.", "") if amp else "off", "device": device.type,
              "shard": shard_name, "dtype": meta["dtype"]}
    with mlflow_run(cfg, f"extract-{backbone.name}", tags={"verb": "extract"}) as run:
        if run is None:
            return
        import mlflow

        mlflow.log_params(params)
        mlflow.log_metrics({"images_per_s": stats["images_per_s"], "failed": stats["failed"],
                            "elapsed_s": stats["elapsed_s"], "wait_s": stats["wait_s"],
                            "compute_s": stats["compute_s"]})
        mlflow.log_artifact(str(png), "plots")
        mlflow.log_artifact(str(timing_csv), "timings")
        mlflow.log_text(json.dumps(meta, indent=2), "meta.json")


@hydra.main(config_path=config.CONF_DIR, config_name="extract", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    extract(cfg)


if __name__ == "__main__":
    main()
