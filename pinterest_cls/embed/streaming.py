"""Extraction: the manifest's ok pins, decoded once, through one or more backbones into their crash-safe stores
(resumable, shardable; a failed pin is a zero row with its reason)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from pinterest_cls.core import config
from pinterest_cls.core.errors import UserError
from pinterest_cls.core.fileio import file_sha256, slurm_job_id
from pinterest_cls.core.progress import progress_bar
from pinterest_cls.core.provenance import provenance
from pinterest_cls.core.stopping import StopRequest, graceful_stop
from pinterest_cls.data.gpu_decode import GpuDecoder
from pinterest_cls.data.loader import PinDataset, default_workers, make_loader
from pinterest_cls.data.manifest import MANIFEST, ok_rows, scan_uncategorised
from pinterest_cls.data.metadata import fingerprint_digest, read_meta
from pinterest_cls.data.store import (
    EmbeddingStore,
    NewStore,
    legacy_rows_sha256,
    read_records,
    rows_sha256,
    shard_range,
)
from pinterest_cls.embed import quantization
from pinterest_cls.embed.backbones import build_backbone, check_resize
from pinterest_cls.embed.calibration import calibrate, needs_calibration
from pinterest_cls.embed.device import INT8, amp_name, resolve_amp, runtime_device
from pinterest_cls.embed.openvino_runtime import OpenVINOOptions, check_runtime, openvino_version
from pinterest_cls.embed.runner import Runner, TorchOptions, make_runner

log = logging.getLogger(__name__)

#: Callbacks run with the batch's number after each batch's rows are written and before they are committed. A seam
#: for the crash-safety tests (tests/faults/ installs a kill there): empty in every other run.
BATCH_HOOKS: list[Callable[[int], None]] = []


class _Job:
    """One backbone's share of an extraction run: its model, store and progress through the shard."""

    def __init__(self, backbone, store: EmbeddingStore, folder: Path, record: dict, runner: Runner):
        self.backbone, self.store, self.folder, self.record, self.runner = backbone, store, folder, record, runner
        self.start = self.done = self.committed = record["done"]
        self.checksums: list = list(record.get("checksums", []))
        self.batches = record["batches"]
        self.failures: dict = dict(record["failures"])
        self.timings: list[tuple[int, int, float, float]] = []


@dataclass(frozen=True)
class _Ids:
    """The identities a run's stores record, computed once for all its backbones: the rows' (by content, and as
    format 1 had it, to recognise an older store) and the manifest's."""

    rows: str
    legacy_rows: str
    manifest: str


def _open_store(cfg: DictConfig, bcfg: DictConfig, ok, ids: _Ids, s: RunSettings):
    """Build ``bcfg``'s backbone and open (or create) its store."""
    amp, batch_size, dtype, decode, micro_batch = s.amp, s.batch_size, s.dtype, s.decode, s.micro_batch
    torch.manual_seed(int(cfg.extract.seed))  # random-init backbones (pretrained=false) are reproducible
    backbone = build_backbone(bcfg, resize=s.resize)
    folder = config.embeddings_dir(cfg, backbone.name)
    index = ok.rename_axis("row").reset_index()[["row", "user", "board", "pin", "category", "path"]]
    ecfg = cfg.extract
    fingerprint = {
        **{k: v for k, v in backbone.info.items() if k != "weights"},
        "weights": backbone.info["weights"] if backbone.info.get("weights_sha256") is None else None,
        "rows_sha256": ids.rows, "rows": len(ok), "dtype": dtype, "batch_size": batch_size,
        "draft": bool(ecfg.draft), "amp": str(amp).replace("torch.", "") if amp else None,
        "seed": int(ecfg.seed), "decode": decode, "micro_batch": micro_batch,
        # the runtime computes the features (a store is never resumed with another) and, for OpenVINO, the
        # request shape that their last bits depend on
        "runtime": s.runtime, "request_rows": s.request_rows, "fold_bn": s.fold_bn,
        **({"int8": s.int8} if s.int8 else {}),
    }
    meta = {
        "backbone": backbone.name, "timm_id": backbone.info.get("timm_id"),
        "weights": backbone.info.get("weights"), "weights_sha256": backbone.info.get("weights_sha256"),
        "preprocessing": {k: backbone.info.get(k) for k in
                          ("input_size", "resize_size", "crop_pct", "interpolation", "mean", "std", "grayscale",
                           "resize")
                          if k in backbone.info},
        "pool": backbone.info.get("pool"), "dtype": dtype,
        # what predict/search need to embed new images exactly like these rows
        "backbone_config": OmegaConf.to_container(bcfg, resolve=True),
        # the precision used (never "auto"): predict and search embed new images with it
        "extract": {"seed": int(ecfg.seed), "draft": bool(ecfg.draft), "amp": amp_name(amp),
                    "batch_size": batch_size, "max_pixels": int(cfg.scan.max_pixels), "decode": decode,
                    "micro_batch": micro_batch, "runtime": s.runtime, "request_rows": s.request_rows,
                    "resize": s.resize, "fold_bn": s.fold_bn, **({"int8": s.int8} if s.int8 else {})},
        "data_root": None if config.select(cfg, "data.root") in (None, "") else str(cfg.data.root),
        "manifest": str(config.data_dir(cfg) / MANIFEST),
        "manifest_sha256": ids.manifest,
        "versions": {**provenance(), **({"openvino": openvino_version()} if s.runtime == "openvino" else {}),
                     **({"nncf": s.int8["nncf"]} if s.int8 else {})},
    }
    legacy = {**fingerprint, "rows_sha256": ids.legacy_rows}  # format 1's fingerprint of this run
    new = NewStore(index, backbone.dim, dtype, meta, fingerprint, legacy=(legacy,))
    store = EmbeddingStore.open_or_create(folder, new, overwrite=bool(ecfg.overwrite))
    return backbone, store, folder


@dataclass
class ShardDone:
    """What one backbone's run over the shard did, for the caller to report (files, MLflow)."""

    backbone: object
    meta: dict
    stats: dict
    timings: list  # (batch, images, wait_s, compute_s) per batch
    folder: Path
    tag: str  # names this run's timing files: rows_<lo>_<hi>_from_<start>
    shard_name: str


@dataclass
class RunSettings:
    """An extraction run's validated settings and this job's shard of the rows."""

    device: torch.device
    amp: torch.dtype | None
    batch_size: int
    micro_batch: int | None
    decode: str
    max_failed: float
    dtype: str
    workers: int
    runtime: str  # torch | openvino
    request_rows: int | None  # OpenVINO's rows per infer request (None with torch)
    resize: str  # extract.resize: tensor | pil (embed.backbones.RESIZES)
    int8: dict | None  # extract.amp=int8: the calibration's settings (embed.quantization.settings)
    fold_bn: bool  # extract.fold_bn, with the torch runtime (OpenVINO folds its own batch norms)
    shard: tuple[int, int]
    lo: int
    hi: int

    @property
    def shard_name(self) -> str:
        return f"shard {self.shard[0]}/{self.shard[1]} rows [{self.lo}, {self.hi})"


def _decode_setting(cfg: DictConfig) -> str:
    """``extract.decode``, checked (OpenCV installed for ``opencv``)."""
    decode = str(config.select(cfg, "extract.decode"))
    if decode not in ("cpu", "gpu", "opencv"):
        raise UserError(f"extract.decode={decode!r} must be cpu (workers decode with Pillow), opencv (workers decode "
                        "plain JPEGs with OpenCV) or gpu (nvJPEG on the device)")
    if decode == "opencv":
        try:
            import cv2  # noqa: F401
        except ImportError:
            raise UserError('extract.decode=opencv needs OpenCV, which is not installed: pip install -e ".[opencv]" '
                            "(or pip install opencv-python-headless)") from None
    return decode


def _int8_setting(cfg: DictConfig) -> dict:
    """``extract.int8.*`` for ``extract.amp=int8``, checked (NNCF installed): ``quantization.settings``."""
    if bool(OmegaConf.select(cfg, "extract.uncategorised", default=False)):
        # their store would get an int8 model calibrated on other pins than the export's: other features
        raise UserError("extract.uncategorised=true cannot be combined with extract.amp=int8 yet (each store "
                        "calibrates its own int8 model); embed the uncategorised boards with another extract.amp")
    quantization.import_nncf()
    int8 = quantization.settings(int(config.select(cfg, "extract.int8.pins")),
                                 int(config.select(cfg, "extract.int8.seed")),
                                 config.select(cfg, "extract.int8.max_cosine_drop"))
    quantization.calibration_rows(1, int8["pins"], int8["seed"])  # a bad extract.int8.pins fails here
    return int8


def run_settings(cfg: DictConfig, n_rows: int) -> RunSettings:
    """``extract.*`` checked, each bad value a one-line error naming its key; sets ``extract.threads``."""
    ecfg = cfg.extract
    runtime = check_runtime(str(config.select(cfg, "extract.runtime")))
    device = runtime_device(runtime, str(ecfg.device))
    batch_size = int(ecfg.batch_size)
    if batch_size < 1:
        raise UserError(f"extract.batch_size={batch_size} must be >= 1")
    micro_batch = config.select(cfg, "extract.micro_batch")
    micro_batch = None if micro_batch is None or int(micro_batch) >= batch_size else int(micro_batch)
    if micro_batch is not None and micro_batch < 1:
        raise UserError(f"extract.micro_batch={micro_batch} must be >= 1 (or null for the whole batch)")
    decode = _decode_setting(cfg)
    request_rows = None
    if runtime == "openvino":
        request_rows = int(config.select(cfg, "extract.openvino.request_rows"))
        if request_rows < 1:
            raise UserError(f"extract.openvino.request_rows={request_rows} must be >= 1")
        if bool(ecfg.compile):
            raise UserError("extract.compile=true compiles PyTorch's model; OpenVINO compiles its own: set "
                            "extract.compile=false with extract.runtime=openvino")
        if micro_batch is not None:
            raise UserError("extract.micro_batch applies to extract.runtime=torch; OpenVINO splits a batch into "
                            "requests of extract.openvino.request_rows pins")
    if decode == "gpu" and device.type != "cuda":
        raise UserError(f"extract.decode=gpu needs a CUDA device, but extract.device={ecfg.device} resolved to "
                        f"{device}; use extract.decode=cpu")
    max_failed = float(config.select(cfg, "extract.max_failed_fraction"))
    if not 0.0 <= max_failed <= 1.0:
        raise UserError(f"extract.max_failed_fraction={max_failed} must be between 0 and 1")
    resize = check_resize(str(config.select(cfg, "extract.resize")))
    dtype = str(cfg.store.dtype)
    if dtype not in ("float16", "float32"):
        raise UserError(f"store.dtype={dtype!r} must be float16 or float32")
    threads = config.select(cfg, "extract.threads")
    if threads is not None:
        if int(threads) < 1:
            raise UserError(f"extract.threads={threads} must be >= 1 (or null for PyTorch's default)")
        torch.set_num_threads(int(threads))
    shard = (int(ecfg.shard.index), int(ecfg.shard.count))
    lo, hi = shard_range(n_rows, batch_size, *shard)
    workers = default_workers() if ecfg.workers is None else int(ecfg.workers)
    amp = resolve_amp(ecfg.amp, device, runtime=runtime)
    int8 = _int8_setting(cfg) if amp == INT8 else None
    fold_bn = config.select(cfg, "extract.fold_bn")
    if not isinstance(fold_bn, bool):
        raise UserError(f"extract.fold_bn={fold_bn} must be true or false")
    return RunSettings(device, amp, batch_size, micro_batch, decode, max_failed, dtype, workers, runtime,
                       request_rows, resize, int8, fold_bn and runtime == "torch", shard, lo, hi)


def extract_many(cfg: DictConfig, bcfgs: list[DictConfig], progress: bool = True,
                 on_done: Callable[[ShardDone], None] | None = None,
                 on_start: Callable[[list[str]], None] | None = None) -> dict[str, dict]:
    """Extract this job's shard for each backbone config in ``bcfgs``, decoding every pin once for all of
    them; each backbone's store is written exactly as a run of its own would write it.

    ``on_done(ShardDone)`` is called for each backbone once its store is finalized, before the failure check
    may stop the run (so what was written is reported first). ``on_start(names)`` is called
    with the backbones that have work to do, once their stores are open and before the first pin is decoded."""
    # a runtime that cannot run here fails before the export is scanned
    runtime_device(check_runtime(str(config.select(cfg, "extract.runtime"))), str(cfg.extract.device))
    _, ok = ok_rows(cfg)
    threads = torch.get_num_threads()  # extract.threads holds for this run only, not for the caller after it
    with contextlib.ExitStack() as stack:  # the shards' claims, and the caller's thread count restored
        stack.callback(torch.set_num_threads, threads)
        s = run_settings(cfg, len(ok))
        metas, jobs, backbones = _open_jobs(cfg, bcfgs, ok, s, stack)
        if jobs and on_start is not None:
            on_start([job.backbone.name for job in jobs])
        if jobs:
            with graceful_stop() as stop:
                clock, gpu = _stream(cfg, ok, jobs, s, progress, stop)
            if stop.signum is not None and any(job.done < s.hi for job in jobs):  # after the last batch: finish
                done = ", ".join(f"{j.backbone.name} {j.done - s.lo}/{s.hi - s.lo}" for j in jobs)
                stop.stopped(f"every written row ({s.shard_name}: {done} rows)")
            metas.update(_finish(jobs, s, clock, gpu, on_done))
            for job in jobs:  # after every store has committed and reported: nothing written is lost
                _check_failures(job.backbone.name, job.failures, s.lo, s.hi, s.shard_name, s.max_failed)
        _calibrate(cfg, backbones)
    return metas


def extract_uncategorised(cfg: DictConfig, bcfgs: list[DictConfig], progress: bool = True,
                          on_done: Callable | None = None) -> dict[str, dict]:
    """The pins of the export's uncategorised boards (``data.manifest.scan_uncategorised``) through the same
    backbones and settings, into stores of their own in ``<paths.data>/uncategorised/embeddings/``; the export's
    stores are left as they are. Not calibrated (no copies are looked for among them)."""
    sub = scan_uncategorised(cfg, progress)
    if sub is None:
        log.warning("warning: extract.uncategorised=true, but the manifest has no uncategorised boards")
        return {}
    sub_cfg = cfg.copy()
    with open_dict(sub_cfg):
        OmegaConf.update(sub_cfg, "paths.data", str(sub), merge=False)
        OmegaConf.update(sub_cfg, "paths.embeddings", str(sub / "embeddings"), merge=False)
        OmegaConf.update(sub_cfg, "extract.calibrate.pins", 0, merge=False)
    log.info(f"uncategorised boards: {sub}")
    return extract_many(sub_cfg, bcfgs, progress=progress, on_done=on_done)


def _calibrate(cfg: DictConfig, backbones: dict) -> None:
    """Calibrate the near-copy threshold of each store that is now complete and has none (``extract.calibrate``),
    with the backbone already loaded: ``train`` and ``audit`` never load one."""
    pins = int(config.select(cfg, "extract.calibrate.pins"))
    for name, backbone in backbones.items():
        folder = config.embeddings_dir(cfg, name)
        if pins > 0 and needs_calibration(folder, read_meta(folder)):
            calibrate(folder, backbone, pins, int(config.select(cfg, "extract.calibrate.seed")),
                      float(config.select(cfg, "repins.min_pixel_score")), device=str(cfg.extract.device))


def _open_jobs(cfg: DictConfig, bcfgs: list[DictConfig], ok, s: RunSettings, claims: contextlib.ExitStack
               ) -> tuple[dict[str, dict], list[_Job], dict]:
    """Open each backbone's store and claim its shard (held in ``claims``): a store whose shard is done gives its
    meta, the others a job that resumes at their last commit (after checking the committed rows' checksums with
    ``extract.verify=true``); and every backbone built, by name."""
    metas: dict[str, dict] = {}
    jobs: list[_Job] = []
    backbones = {}
    ids = _Ids(rows_sha256(ok), legacy_rows_sha256(ok), file_sha256(config.data_dir(cfg) / MANIFEST))
    for bcfg in bcfgs:
        backbone, store, folder = _open_store(cfg, bcfg, ok, ids, s)
        backbones[backbone.name] = backbone
        claims.enter_context(store.claim(s.lo, s.hi))
        if bool(config.select(cfg, "extract.verify")):
            store.verify(s.lo, s.hi)
        record = store.progress(s.lo, s.hi)
        if record["done"] >= s.hi:
            log.info(f"{backbone.name}: {s.shard_name} already done.")
            metas[backbone.name] = store.finalize()
            _check_failures(backbone.name, record["failures"], s.lo, s.hi, s.shard_name, s.max_failed)
            continue
        if record["done"] > s.lo:
            log.info(f"{backbone.name}: resuming {s.shard_name} at row {record['done']} "
                     f"({record['done'] - s.lo} rows already committed).")
        # an earlier run that ran out of memory went on with smaller micro-batches: so does this one
        channels_last = bool(cfg.extract.channels_last)
        ir = None
        if s.int8 and not quantization.has_int8_model(folder) and any(
                r["done"] > r["lo"] for r in read_records(folder)):  # rows of a model no longer there
            raise UserError(f"{folder} holds rows embedded with an int8 model that is no longer in "
                            f"{folder / quantization.INT8_DIR}; re-extract the store with extract.overwrite=true")
        if s.int8:  # the store's one int8 model, quantized now on its own pins if it has none yet
            ir = quantization.store_int8_model(folder, fingerprint_digest(store.meta.fingerprint), backbone,
                                               ok["path"].tolist(), s.int8, s.request_rows,
                                               bool(cfg.extract.draft), int(cfg.scan.max_pixels))
        openvino = OpenVINOOptions(s.request_rows, ir) if s.runtime == "openvino" else None
        options = TorchOptions(channels_last, bool(cfg.extract.compile), record.get("micro_batch", s.micro_batch),
                               s.fold_bn)
        runner = make_runner(backbone, s.device, s.amp, s.runtime, options, openvino)
        jobs.append(_Job(backbone, store, folder, record, runner))
    return metas, jobs, backbones


@dataclass
class _Clock:
    start: float  # when streaming began
    first: float | None = None  # when the first batch was done: the steady rate leaves out worker start-up
    first_size: int = 0
    ready: float = 0.0  # when the last batch was done


def _stream(cfg: DictConfig, ok, jobs: list[_Job], s: RunSettings, progress: bool, stop: StopRequest):
    """Decode the shard's pins once, run every job's model on each batch, write the rows and commit; after a
    stop request, commit what is written and stop."""
    first = min(job.start for job in jobs)
    dataset = PinDataset(ok["path"].tolist(), range(first, s.hi), [j.backbone.transform for j in jobs],
                         [j.backbone.resize_size for j in jobs], draft=bool(cfg.extract.draft),
                         max_pixels=int(cfg.scan.max_pixels), encoded=s.decode == "gpu", opencv=s.decode == "opencv")
    gpu = GpuDecoder(dataset, [j.backbone for j in jobs], s.device) if s.decode == "gpu" else None
    loader = make_loader(dataset, s.batch_size, s.workers, pin_memory=s.device.type == "cuda")
    commit_every = max(1, int(cfg.extract.commit_every))
    names = ", ".join(j.backbone.name for j in jobs)
    clock = _Clock(time.perf_counter())
    bar = progress_bar(s.hi - first, f"extract {names if len(jobs) < 4 else f'{len(jobs)} backbones'}", "img",
                       progress, leave=True, smoothing=0.1)
    clock.ready = time.perf_counter()
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
            job.timings.append((job.batches, size, t_batch - clock.ready, time.perf_counter() - t_job))
            job.done += size
            job.batches += 1
        bar.update(size)
        for hook in BATCH_HOOKS:
            hook(n)
        for job in jobs:
            if job.done > job.start and (n % commit_every == 0 or job.done >= s.hi or stop.signum is not None):
                elapsed = job.record["elapsed_s"] + time.perf_counter() - clock.start
                job.store.commit({"lo": s.lo, "hi": s.hi, "done": job.done, "failures": job.failures,
                                  "elapsed_s": round(elapsed, 3), "batches": job.batches,
                                  "shard": list(s.shard), "micro_batch": job.runner.micro_batch,
                                  "slurm_job": slurm_job_id(), "checksums": job.checksums}, job.committed)
                job.committed = job.done
        clock.ready = time.perf_counter()
        if clock.first is None:
            clock.first, clock.first_size = clock.ready, size
        if stop.signum is not None:
            break
    bar.close()
    del loader  # its workers end here, before a stop request is answered
    return clock, gpu


def _finish(jobs: list[_Job], s: RunSettings, clock: _Clock, gpu, on_done) -> dict[str, dict]:
    """Each store finalized with this run's statistics, and handed to ``on_done``."""
    metas = {}
    elapsed = time.perf_counter() - clock.start
    first = min(job.start for job in jobs)
    for job in jobs:
        rate = (s.hi - job.start) / elapsed if elapsed > 0 else float("nan")
        shard_failed = sum(1 for r in job.failures if s.lo <= int(r) < s.hi)
        steady = ((s.hi - first - clock.first_size) / (clock.ready - clock.first)
                  if clock.first and clock.ready > clock.first else rate)
        stats = {"images_per_s": rate, "elapsed_s": elapsed, "rows": s.hi - job.start, "failed": shard_failed,
                 "images_per_s_after_first_batch": steady, "decode": s.decode,
                 **({"decoded_on_gpu": gpu.counts["gpu"], "decoded_on_cpu": gpu.counts["cpu"],
                     "jpeg_decoder": gpu.decoder} if gpu else {}),
                 "wait_s": sum(t[2] for t in job.timings), "compute_s": sum(t[3] for t in job.timings),
                 "micro_batch": job.runner.micro_batch, "workers": s.workers, "threads": torch.get_num_threads(),
                 "device": s.device.type, "amp": str(s.amp).replace("torch.", "") if s.amp else "off",
                 "runtime": s.runtime,
                 **({"openvino": job.runner.describe()} if s.runtime == "openvino" else {}),
                 "shard": s.shard_name, "decoded_for": [j.backbone.name for j in jobs]}
        meta = job.store.finalize({"last_run": {k: round(v, 3) if isinstance(v, float) else v
                                                for k, v in stats.items()}})
        tag = f"rows_{s.lo:010d}_{s.hi:010d}_from_{job.start:010d}"
        if on_done is not None:
            on_done(ShardDone(job.backbone, meta, stats, job.timings, job.folder, tag, s.shard_name))
        metas[job.backbone.name] = meta
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
