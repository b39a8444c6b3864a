"""Device and precision policy: which device ``auto`` means, which autocast dtype ``amp=auto`` means, and strict
fp32 where no autocast is asked for; one policy for extract, predict, search, the served model and finetune."""

from __future__ import annotations

import contextlib

import torch

from pinterest_cls.core.errors import UserError


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


#: ``extract.amp=int8``: OpenVINO's post-training int8 (embed.quantization), not an autocast dtype.
INT8 = "int8"


def resolve_amp(amp: str, device: torch.device, key: str = "extract.amp", training: bool = False,
                runtime: str = "torch") -> torch.dtype | str | None:
    """The autocast dtype (None: fp32), the one precision policy of extract, predict, search and finetune.

    ``auto`` for features (``training=False``): fp16 on CUDA; on CPU bf16 where the CPU has native bf16, else
    none. ``auto`` for training: bf16 on CUDA where supported (no loss scaling needed), else fp16 with a
    GradScaler; none on CPU, where bf16 autocast measured no faster for training (experiments/fashion_mnist).
    ``off`` (= ``fp32``) | ``bf16`` | ``fp16`` force it; ``int8`` (``INT8``, returned as that string) is
    NNCF's post-training quantization, with ``runtime="openvino"`` only; ``key`` names the setting in errors.

    On CUDA, fp16 keeps the features within a row cosine of 0.999 of fp32 while bf16 does not (measured on an
    H100 with efficientnet_lite0's real weights on real photos: fp16 >= 0.999, bf16 down to 0.993;
    tests/test_gpu.py), at the same speed; an fp16 overflow stops the run (``Runner``) rather than
    storing infinities."""
    amp = str(amp)
    if amp not in ("auto", "off", "fp32", "bf16", "fp16", INT8):
        raise UserError(f"{key}={amp!r} must be one of: auto, off (= fp32), bf16, fp16, int8 (OpenVINO)")
    if amp == INT8 and training:
        raise UserError(f"{key}=int8 quantizes features after training, it does not train; use auto, off, bf16 "
                        "or fp16")
    if amp == INT8 and runtime != "openvino":
        raise UserError(f"{key}=int8 is OpenVINO's post-training quantization: add extract.runtime=openvino")
    if amp == INT8:
        return INT8
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


def amp_name(dtype: torch.dtype | str | None) -> str:
    """The precision a run used, as recorded in ``meta.json``: ``bf16``, ``fp16``, ``fp32`` or ``int8``."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32", INT8: INT8}[dtype]


def runtime_device(runtime: str, device: str, key: str = "extract.device") -> torch.device:
    """The device a runtime runs on: OpenVINO runs on the CPU (``auto`` means the CPU there)."""
    if runtime == "openvino":
        if str(device) not in ("auto", "cpu"):
            raise UserError(f"{key}={device} but extract.runtime=openvino runs on the CPU; use {key}=cpu "
                            "(or auto), or extract.runtime=torch")
        return torch.device("cpu")
    return resolve_device(str(device), key)
