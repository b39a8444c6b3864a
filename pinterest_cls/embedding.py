"""Device and precision policy: which device ``auto`` means, which autocast dtype ``amp=auto`` means, and
strict fp32 where no autocast is asked for."""

from __future__ import annotations

import contextlib
import logging
import sys

import numpy as np
import torch
from omegaconf import OmegaConf

from . import __version__
from .backbones import build_backbone
from .data import PinDataset, default_workers, make_loader
from .errors import UserError
from .images import DEFAULT_MAX_PIXELS
from .openvino_runtime import OpenVINORunner, check_runtime

log = logging.getLogger(__name__)


def resolve_device(name: str, key: str = "extract.device") -> torch.device:
    """``auto``: CUDA when available, else the CPU. ``key`` names the setting in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}={name} but CUDA is not available here; use {key}=auto or cpu")
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


def resolve_amp(amp: str, device: torch.device, key: str = "extract.amp", training: bool = False
                ) -> torch.dtype | None:
    """The autocast dtype (None: fp32), the one precision policy of extract, predict, search and finetune.

    ``auto`` for features (``training=False``): fp16 on CUDA; on CPU bf16 where the CPU has native bf16, else
    none. ``auto`` for training: bf16 on CUDA where supported (no loss scaling needed), else fp16 with a
    GradScaler; none on CPU, where bf16 autocast measured no faster for training (experiments/fashion_mnist).
    ``off`` (= ``fp32``) | ``bf16`` | ``fp16`` force it; ``key`` names the setting in errors.

    On CUDA, fp16 keeps the features within a row cosine of 0.999 of fp32 while bf16 does not (measured on an
    H100 with efficientnet_lite0's real weights on real photos: fp16 >= 0.999, bf16 down to 0.993;
    tests/test_gpu.py), at the same speed; an fp16 overflow stops the run (:class:`Runner`) rather than
    storing infinities."""
    amp = str(amp)
    if amp not in ("auto", "off", "fp32", "bf16", "fp16"):
        raise UserError(f"{key}={amp!r} must be one of: auto, off (= fp32), bf16, fp16")
    if amp in ("off", "fp32"):
        return None
    if amp == "auto" and training:
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
        return torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


@contextlib.contextmanager
def strict_fp32(device: torch.device):
    """fp32 on CUDA means fp32: cuDNN convolutions (and matmuls, if someone enabled it) would otherwise run in
    TF32, a 10-bit mantissa, without saying so. ``extract.amp`` is the one switch for reduced precision."""
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def amp_name(dtype: torch.dtype | None) -> str:
    """The precision a run used, as recorded in ``meta.json``: ``bf16``, ``fp16`` or ``fp32``."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


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
                log.warning(f"CUDA out of memory: retrying with micro-batches of {self.micro_batch} "
                      f"(set extract.micro_batch={self.micro_batch} to start there)")


def backbone_from_meta(meta: dict, check_weights: bool = True):
    """Rebuild the backbone that made a store (``meta.json``): same config, same seed for random init, and
    (when the store recorded one) the same weights sha256."""
    bcfg = OmegaConf.create(meta["backbone_config"])
    torch.manual_seed(int(meta.get("extract", {}).get("seed", 0)))
    backbone = build_backbone(bcfg)
    want, got = meta.get("weights_sha256"), backbone.info.get("weights_sha256")
    if check_weights and want and got != want:
        raise UserError(f"the weights found for backbone {meta['backbone']} ({backbone.info.get('weights')}, "
                        f"sha256 {got}) differ from those the embeddings were made with (sha256 {want}); "
                        "supply the original file with backbone.weights")
    return backbone


def runtime_device(runtime: str, device: str, key: str = "extract.device") -> torch.device:
    """The device a runtime runs on: OpenVINO runs on the CPU (``auto`` means the CPU there)."""
    if runtime == "openvino":
        if str(device) not in ("auto", "cpu"):
            raise UserError(f"{key}={device} but extract.runtime=openvino runs on the CPU; use {key}=cpu "
                            "(or auto), or extract.runtime=torch")
        return torch.device("cpu")
    return resolve_device(str(device), key)


def make_runner(backbone, device: torch.device, amp: torch.dtype | None, runtime: str = "torch",
                channels_last: bool = True, compile_: bool = False, micro_batch: int | None = None,
                request_rows: int | None = None):
    """The runner of ``backbone``'s model: :class:`Runner` (eager PyTorch, optionally compiled) or, for
    ``runtime="openvino"``, :class:`openvino_runtime.OpenVINORunner` with ``request_rows`` pins per request."""
    if runtime == "openvino":
        size = int(backbone.info["input_size"])
        if request_rows is None:
            raise ValueError("the OpenVINO runtime needs request_rows (extract.openvino.request_rows)")
        return OpenVINORunner(backbone.model, (size, size), amp_name(amp), backbone.name, request_rows)
    return Runner(prepare_model(backbone.model, device, channels_last, compile_), device, amp, channels_last,
                  micro_batch)


class Embedder:
    """A backbone and its runner, built once, that embed any image paths through the same Dataset, loader and
    runner as ``extract``: what ``predict``, ``search`` and the served model use, so that a long-lived model
    (a server) compiles its runtime once. ``amp``: the precision a store recorded (``bf16``, ``fp16``,
    ``fp32``); ``dtype``: the store's dtype, whose rounding the features then get, so that they compare with
    the store's rows; ``runtime`` and ``request_rows``: the store's runtime (``extract.runtime``) and OpenVINO
    request shape."""

    def __init__(self, backbone, *, device: str = "auto", amp: str = "auto", draft: bool = True,
                 max_pixels: int | None = None, dtype: str | None = None, runtime: str = "torch",
                 request_rows: int | None = None):
        if amp == "auto":
            log.warning("note: the embeddings' meta.json does not record the precision they were made with (made "
                        "before it was recorded); embedding with extract.amp=auto as resolved on this device")
        runtime = check_runtime(runtime)
        self.backbone, self.draft, self.dtype = backbone, draft, dtype
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.device = runtime_device(runtime, device)
        self.runner = make_runner(backbone, self.device, resolve_amp(amp, self.device), runtime,
                                  request_rows=request_rows)

    @classmethod
    def for_store(cls, backbone, meta: dict, device: str = "auto") -> Embedder:
        """Embedding new images exactly as the store of ``meta`` (its ``meta.json``) embedded its pins."""
        ex = meta.get("extract", {})
        return cls(backbone, device=device, amp=ex.get("amp", "auto"), draft=ex.get("draft", True),
                   max_pixels=ex.get("max_pixels"), dtype=meta.get("dtype"), runtime=ex.get("runtime", "torch"),
                   request_rows=ex.get("request_rows"))

    def __call__(self, paths: list[str], *, batch_size: int = 64, workers: int | None = None,
                 progress: bool = False) -> tuple[np.ndarray, list[str]]:
        """Features (len(paths) x D, float32; zeros where decoding failed) and a reason per path ("" = ok)."""
        from tqdm.auto import tqdm

        backbone = self.backbone
        dataset = PinDataset(list(map(str, paths)), range(len(paths)), backbone.transform, backbone.resize_size,
                             draft=self.draft, max_pixels=self.max_pixels)
        n_workers = default_workers() if workers is None else workers
        loader = make_loader(dataset, batch_size, min(n_workers, max(0, len(paths) // batch_size)),
                             pin_memory=self.device.type == "cuda")
        feats = np.zeros((len(paths), backbone.dim), dtype=np.float32)
        reasons = [""] * len(paths)
        with tqdm(total=len(paths), desc=f"embed {backbone.name}", unit="img", disable=not progress) as bar:
            for rows, pixels, failed in loader:
                if pixels is not None:
                    feats[rows.numpy()] = self.runner(pixels)
                for row, reason in failed:
                    reasons[row] = reason
                bar.update(len(rows) + len(failed))
        if self.dtype is not None:
            feats = feats.astype(self.dtype).astype(np.float32)
        return feats, reasons


def embed_paths(backbone, paths: list[str], *, batch_size: int = 64, workers: int | None = None,
                progress: bool = False, **settings) -> tuple[np.ndarray, list[str]]:
    """``paths`` embedded once by an :class:`Embedder` of ``backbone`` with ``settings``."""
    return Embedder(backbone, **settings)(paths, batch_size=batch_size, workers=workers, progress=progress)


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool, compile_: bool):
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        model = torch.compile(model)
    return model


def library_versions() -> dict:
    import PIL
    import timm

    return {"pinterest_cls": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "pillow": PIL.__version__, "python": sys.version.split()[0]}
