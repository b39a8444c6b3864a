"""``python -m pinterest_cls.extract backbone=NAME``: stream the manifest's ok pins through a backbone into
``${paths.work}/${data.name}/embeddings/${backbone.name}/`` (resumable, shardable, corrupt-safe, AMP)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__, config
from .catalog import MANIFEST, file_sha256, load_manifest, locked
from .devices import amp_name, cpu_has_native_bf16, resolve_amp, resolve_device, strict_fp32  # noqa: F401
from .errors import UserError, user_errors_exit
from .store import EmbeddingStore, rows_sha256, shard_range

#: Test hook: kill -9 this process right after writing the Nth batch's rows, before they are committed.
KILL_ENV = "PINTEREST_CLS_KILL_AFTER_BATCH"


class Runner:
    """Runs a feature model on batches (on the CPU or already on the device); on CUDA out-of-memory, halves
    the micro-batch and retries, and keeps the smaller micro-batch from then on.

    ``micro_batch``: rows per forward pass (None: the whole batch). The features' last bits depend on it, so
    extract records the micro-batch in effect with each commit and a resumed run continues with it."""

    def __init__(self, model: torch.nn.Module, device: torch.device, amp: torch.dtype | None,
                 channels_last: bool, micro_batch: int | None = None):
        self.model, self.device, self.amp, self.channels_last = model, device, amp, channels_last
        self.micro_batch: int | None = micro_batch

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(self.device.type, dtype=self.amp) if self.amp else strict_fp32(self.device)
        with ctx:
            return self.model(x).float()

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            while True:
                step = self.micro_batch or len(x)
                try:
                    parts = [self._forward(x[i:i + step]) for i in range(0, len(x), step)]
                    out = torch.cat(parts).cpu()
                    if self.amp == torch.float16 and not torch.isfinite(out).all():
                        raise UserError("fp16 autocast overflowed: the model gave non-finite features; "
                                        "use extract.amp=bf16 or extract.amp=off")
                    return out.numpy()
                except torch.cuda.OutOfMemoryError:
                    if step <= 1:
                        raise
                # out of the except block, the failed pass's tensors are freed with its traceback
                torch.cuda.empty_cache()
                self.micro_batch = max(1, step // 2)
                print(f"CUDA out of memory: retrying with micro-batches of {self.micro_batch} "
                      f"(set extract.micro_batch={self.micro_batch} to start there)", file=sys.stderr, flush=True)


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
                max_pixels: int | None = None, dtype: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Features (len(paths) x D, float32; zeros where decoding failed) and a reason per path ("" = ok),
    through the same Dataset, loader and runner as ``extract``. ``amp``: the precision a store recorded
    (``bf16``, ``fp16``, ``fp32``); ``dtype``: the store's dtype, whose rounding the features then get, so that
    they compare with the store's rows."""
    from tqdm.auto import tqdm

    from .data import PinDataset, default_workers, make_loader
    from .images import DEFAULT_MAX_PIXELS

    if amp == "auto":
        print("note: the embeddings' meta.json does not record the precision they were made with (made before it "
              "was recorded); embedding with extract.amp=auto as resolved on this device", file=sys.stderr,
              flush=True)
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
    if dtype is not None:
        feats = feats.astype(dtype).astype(np.float32)
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
    with locked(out):  # parallel shard jobs: the first scans, the others wait and read its manifest
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


def backbone_configs(cfg: DictConfig) -> list[DictConfig]:
    """The backbones this run extracts: ``backbone``, or every entry of ``backbones`` when that is set.

    An entry of ``backbones`` is a name from ``conf/backbone/`` (``convnext_tiny``), or a mapping merged over
    the ``conf/backbone/<kind>.yaml`` it names (``{kind: timm, model: resnet50.a1_in1k}``); each is resolved
    exactly as ``backbone=<entry>`` would be, so its store is the one a run of its own writes.
    """
    entries = OmegaConf.select(cfg, "backbones", default=None)
    if entries is None or (not isinstance(entries, str) and len(entries) == 0):
        return [cfg.backbone]
    if isinstance(entries, str) or not OmegaConf.is_list(entries):
        raise UserError(f"backbones={entries} must be a list, e.g. backbones=[convnext_tiny,efficientnet_v2_b0]")
    folder = Path(config.CONF_DIR) / "backbone"
    options = sorted(p.stem for p in folder.glob("*.yaml"))
    out, names = [], []
    for entry in entries:
        if isinstance(entry, str):
            kind, extra = entry, {}
        elif OmegaConf.is_dict(entry):
            extra = OmegaConf.to_container(entry, resolve=True)
            kind = str(extra.get("kind", "timm"))
        else:
            raise UserError(f"backbones entry {entry!r} must be a backbone name or a mapping with kind: ...")
        if kind not in options:
            raise UserError(f"backbones entry {entry!r}: there is no conf/backbone/{kind}.yaml; "
                            f"choose from {', '.join(options)}")
        merged = OmegaConf.merge(OmegaConf.load(folder / f"{kind}.yaml"), extra)
        try:  # resolve as it would be at the backbone key (timm.yaml's name is ${backbone.model})
            bcfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create({"backbone": merged}),
                                                           resolve=True, throw_on_missing=True)["backbone"])
        except Exception as exc:
            raise UserError(f"backbones entry {entry!r}: {exc}".splitlines()[0]) from None
        if bcfg.name in names:
            raise UserError(f"backbones lists {bcfg.name} twice")
        names.append(bcfg.name)
        out.append(bcfg)
    return out


class _Job:
    """One backbone's share of an extraction run: its model, store and progress through the shard."""

    def __init__(self, backbone, store: EmbeddingStore, folder: Path, record: dict, runner: Runner):
        self.backbone, self.store, self.folder, self.record, self.runner = backbone, store, folder, record, runner
        self.start = self.done = record["done"]
        self.batches = record["batches"]
        self.failures: dict = dict(record["failures"])
        self.timings: list[tuple[int, int, float, float]] = []


def _open_store(cfg: DictConfig, bcfg: DictConfig, ok, rows_id: str, manifest_id: str, amp, batch_size: int,
                dtype: str, decode: str, micro_batch: int | None):
    """Build ``bcfg``'s backbone and open (or create) its store. ``rows_id``/``manifest_id``: the sha256 of
    the rows to embed and of the manifest, computed once per run for all its backbones."""
    from .backbones import build_backbone

    torch.manual_seed(int(cfg.extract.seed))  # random-init backbones (pretrained=false) are reproducible
    backbone = build_backbone(bcfg)
    folder = store_dir(cfg, backbone.name)
    index = ok.rename_axis("row").reset_index()[["row", "user", "board", "pin", "category", "path"]]
    ecfg = cfg.extract
    fingerprint = {
        **{k: v for k, v in backbone.info.items() if k != "weights"},
        "weights": backbone.info["weights"] if backbone.info.get("weights_sha256") is None else None,
        "rows_sha256": rows_id, "rows": len(ok), "dtype": dtype, "batch_size": batch_size,
        "draft": bool(ecfg.draft), "amp": str(amp).replace("torch.", "") if amp else None,
        "seed": int(ecfg.seed), "decode": decode, "micro_batch": micro_batch,
    }
    meta = {
        "backbone": backbone.name, "timm_id": backbone.info.get("timm_id"),
        "weights": backbone.info.get("weights"), "weights_sha256": backbone.info.get("weights_sha256"),
        "preprocessing": {k: backbone.info.get(k) for k in
                          ("input_size", "resize_size", "crop_pct", "interpolation", "mean", "std", "grayscale")
                          if k in backbone.info},
        "pool": backbone.info.get("pool"), "dtype": dtype,
        # what predict/search need to embed new images exactly like these rows
        "backbone_config": OmegaConf.to_container(bcfg, resolve=True),
        # the precision used (never "auto"): predict and search embed new images with it
        "extract": {"seed": int(ecfg.seed), "draft": bool(ecfg.draft), "amp": amp_name(amp),
                    "batch_size": batch_size, "max_pixels": int(cfg.scan.max_pixels), "decode": decode,
                    "micro_batch": micro_batch},
        "data_root": None if config.select(cfg, "data.root") in (None, "") else str(cfg.data.root),
        "manifest": str(config.data_dir(cfg) / MANIFEST),
        "manifest_sha256": manifest_id,
        "versions": library_versions(),
    }
    store = EmbeddingStore.open_or_create(folder, index, backbone.dim, dtype, meta, fingerprint,
                                          overwrite=bool(ecfg.overwrite))
    return backbone, store, folder


def extract(cfg: DictConfig, progress: bool = True) -> dict:
    """Run (or resume) this job's shard of the extraction of ``backbone``; returns the store's meta.
    With ``backbones=[...]`` set, every listed backbone is extracted from one decode of each pin and the
    result is ``{backbone name: meta}``."""
    metas = extract_many(cfg, backbone_configs(cfg), progress=progress)
    if OmegaConf.select(cfg, "backbones", default=None):
        return metas
    return next(iter(metas.values()))


def extract_many(cfg: DictConfig, bcfgs: list[DictConfig], progress: bool = True) -> dict[str, dict]:
    """Extract this job's shard for each backbone config in ``bcfgs``, decoding every pin once for all of
    them; each backbone's store is written exactly as a run of its own would write it."""
    from tqdm.auto import tqdm

    from .data import PinDataset, default_workers, make_loader
    from .gpu_decode import GpuDecoder

    ecfg = cfg.extract
    manifest, ok = ok_rows(cfg)
    device = resolve_device(str(ecfg.device))
    amp = resolve_amp(ecfg.amp, device)
    batch_size = int(ecfg.batch_size)
    if batch_size < 1:
        raise UserError(f"extract.batch_size={batch_size} must be >= 1")
    micro_batch = OmegaConf.select(cfg, "extract.micro_batch", default=None)
    micro_batch = None if micro_batch is None or int(micro_batch) >= batch_size else int(micro_batch)
    if micro_batch is not None and micro_batch < 1:
        raise UserError(f"extract.micro_batch={micro_batch} must be >= 1 (or null for the whole batch)")
    decode = str(OmegaConf.select(cfg, "extract.decode", default="cpu"))
    if decode not in ("cpu", "gpu"):
        raise UserError(f"extract.decode={decode!r} must be cpu (workers decode) or gpu (nvJPEG on the device)")
    if decode == "gpu" and device.type != "cuda":
        raise UserError(f"extract.decode=gpu needs a CUDA device, but extract.device={ecfg.device} resolved to "
                        f"{device}; use extract.decode=cpu")
    max_failed = float(OmegaConf.select(cfg, "extract.max_failed_fraction", default=1.0))
    if not 0.0 <= max_failed <= 1.0:
        raise UserError(f"extract.max_failed_fraction={max_failed} must be between 0 and 1")
    dtype = str(cfg.store.dtype)
    if dtype not in ("float16", "float32"):
        raise UserError(f"store.dtype={dtype!r} must be float16 or float32")
    threads = OmegaConf.select(cfg, "extract.threads", default=None)
    if threads is not None:
        if int(threads) < 1:
            raise UserError(f"extract.threads={threads} must be >= 1 (or null for PyTorch's default)")
        torch.set_num_threads(int(threads))
    shard = (int(ecfg.shard.index), int(ecfg.shard.count))
    lo, hi = shard_range(len(ok), batch_size, *shard)
    shard_name = f"shard {shard[0]}/{shard[1]} rows [{lo}, {hi})"

    metas: dict[str, dict] = {}
    jobs: list[_Job] = []
    rows_id, manifest_id = rows_sha256(ok), file_sha256(config.data_dir(cfg) / MANIFEST)
    for bcfg in bcfgs:
        backbone, store, folder = _open_store(cfg, bcfg, ok, rows_id, manifest_id, amp, batch_size, dtype,
                                              decode, micro_batch)
        record = store.progress(lo, hi)
        if record["done"] >= hi:
            print(f"{backbone.name}: {shard_name} already done.", flush=True)
            metas[backbone.name] = store.finalize()
            _check_failures(backbone.name, record["failures"], lo, hi, shard_name, max_failed)
            continue
        if record["done"] > lo:
            print(f"{backbone.name}: resuming {shard_name} at row {record['done']} "
                  f"({record['done'] - lo} rows already committed).", flush=True)
        # an earlier run that ran out of memory went on with smaller micro-batches: so does this one
        runner = Runner(prepare_model(backbone.model, device, bool(ecfg.channels_last), bool(ecfg.compile)),
                        device, amp, bool(ecfg.channels_last), record.get("micro_batch", micro_batch))
        jobs.append(_Job(backbone, store, folder, record, runner))
    if not jobs:
        return metas

    workers = default_workers() if ecfg.workers is None else int(ecfg.workers)
    first = min(job.start for job in jobs)
    dataset = PinDataset(ok["path"].tolist(), range(first, hi), [j.backbone.transform for j in jobs],
                         [j.backbone.resize_size for j in jobs], draft=bool(ecfg.draft),
                         max_pixels=int(cfg.scan.max_pixels), encoded=decode == "gpu")
    gpu = GpuDecoder(dataset, [j.backbone for j in jobs], device) if decode == "gpu" else None
    loader = make_loader(dataset, batch_size, workers, pin_memory=device.type == "cuda")
    commit_every = max(1, int(ecfg.commit_every))
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    names = ", ".join(j.backbone.name for j in jobs)
    t_start = time.perf_counter()
    t_first = None  # when the first batch was done: the steady rate leaves out worker start-up
    bar = tqdm(total=hi - first, desc=f"extract {names if len(jobs) < 4 else f'{len(jobs)} backbones'}",
               unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1)
    t_ready = time.perf_counter()
    for n, (rows, pixels, failed) in enumerate(loader, start=1):
        t_batch = time.perf_counter()
        if gpu is not None:
            rows, pixels, failed = gpu(rows, pixels, failed)
        size = len(rows) + len(failed)
        batch_lo = min(([int(rows.min())] if len(rows) else []) + [row for row, _ in failed])
        for k, job in enumerate(jobs):
            if batch_lo < job.start:  # committed by an earlier run of this backbone
                continue
            t_job = time.perf_counter()
            array = job.store.array
            if pixels is not None:
                array[rows.numpy()] = job.runner(pixels[k]).astype(array.dtype)
            for row, reason in failed:
                array[row] = 0  # a failed row holds zeros, whatever an interrupted run left there
                job.failures[str(row)] = reason
            job.timings.append((job.batches, size, t_batch - t_ready, time.perf_counter() - t_job))
            job.done += size
            job.batches += 1
        bar.update(size)
        if kill_after and n == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        for job in jobs:
            if job.done > job.start and (n % commit_every == 0 or job.done >= hi):
                elapsed = job.record["elapsed_s"] + time.perf_counter() - t_start
                job.store.commit({"lo": lo, "hi": hi, "done": job.done, "failures": job.failures,
                                  "elapsed_s": round(elapsed, 3), "batches": job.batches,
                                  "shard": list(shard), "micro_batch": job.runner.micro_batch})
        t_ready = time.perf_counter()
        if t_first is None:
            t_first, first_size = t_ready, size
    bar.close()
    elapsed = time.perf_counter() - t_start
    for job in jobs:
        rate = (hi - job.start) / elapsed if elapsed > 0 else float("nan")
        shard_failed = sum(1 for r in job.failures if lo <= int(r) < hi)
        steady = (hi - first - first_size) / (t_ready - t_first) if t_first and t_ready > t_first else rate
        stats = {"images_per_s": rate, "elapsed_s": elapsed, "rows": hi - job.start, "failed": shard_failed,
                 "images_per_s_after_first_batch": steady, "decode": decode,
                 **({"decoded_on_gpu": gpu.counts["gpu"], "decoded_on_cpu": gpu.counts["cpu"],
                     "jpeg_decoder": gpu.decoder} if gpu else {}),
                 "wait_s": sum(t[2] for t in job.timings), "compute_s": sum(t[3] for t in job.timings),
                 "micro_batch": job.runner.micro_batch, "workers": workers, "threads": torch.get_num_threads(),
                 "device": device.type, "amp": str(amp).replace("torch.", "") if amp else "off",
                 "shard": shard_name, "decoded_for": [j.backbone.name for j in jobs]}
        meta = job.store.finalize({"last_run": {k: round(v, 3) if isinstance(v, float) else v
                                                for k, v in stats.items()}})
        tag = f"rows_{lo:010d}_{hi:010d}_from_{job.start:010d}"
        _report(cfg, job.backbone, meta, stats, job.timings, job.folder, tag, shard_name, workers, amp, device)
        metas[job.backbone.name] = meta
    for job in jobs:  # after every store has committed and reported: nothing written is lost
        _check_failures(job.backbone.name, job.failures, lo, hi, shard_name, max_failed)
    return metas


def _check_failures(name: str, failures: dict, lo: int, hi: int, shard_name: str, max_failed: float) -> None:
    """Stop when more than ``extract.max_failed_fraction`` of the shard's rows failed: a broken transform or
    a changed export must not leave a store of zero rows that looks finished."""
    failed = {int(r): why for r, why in failures.items() if lo <= int(r) < hi}
    if hi > lo and len(failed) / (hi - lo) > max_failed:
        common = "; ".join(f"{why!r} x{n}" for why, n in Counter(failed.values()).most_common(3))
        raise UserError(f"{name}: {len(failed)} of {hi - lo} rows of {shard_name} failed "
                        f"({len(failed) / (hi - lo):.1%} > extract.max_failed_fraction={max_failed:g}): {common}; "
                        "the committed rows are kept: fix the cause and re-run with extract.overwrite=true, or "
                        "accept the failures with a higher extract.max_failed_fraction")


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
    _check_sweep(cfg)
    extract(cfg)


def _check_sweep(cfg: DictConfig) -> None:
    """A multirun job that sweeps ``backbone`` while ``backbones`` is also set (e.g. by an experiment config)
    would extract every listed backbone in every job: refuse it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not OmegaConf.select(cfg, "backbones", default=None) or not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    swept = [o for o in hc.overrides.task if o.split("=", 1)[0] in ("backbone", "+backbone")]
    if hc.mode == RunMode.MULTIRUN and swept:
        raise UserError(f"this multirun job has {swept[0]} but backbones={list(cfg.backbones)} is set too, so "
                        "every job would extract every listed backbone; add backbones=null for one backbone "
                        "per job, or run without -m to extract them all in one process")


if __name__ == "__main__":
    main()
