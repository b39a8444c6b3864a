"""Running a feature model on batches: eager PyTorch (``Runner``) or OpenVINO, chosen by ``make_runner``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pinterest_cls.core.errors import UserError
from pinterest_cls.embed.device import amp_name, strict_fp32
from pinterest_cls.embed.folding import folded
from pinterest_cls.embed.openvino_runtime import OpenVINOOptions, OpenVINORunner

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class TorchOptions:
    """Eager PyTorch's settings (``extract.channels_last``, ``extract.compile``, ``extract.micro_batch``,
    ``extract.fold_bn``: the batch norms folded into their convolutions, ``embed.folding``)."""

    channels_last: bool = True
    compile: bool = False
    micro_batch: int | None = None
    fold_bn: bool = False


def make_runner(backbone, device: torch.device, amp: torch.dtype | None, runtime: str = "torch",
                options: TorchOptions | None = None, openvino: OpenVINOOptions | None = None):
    """The runner of ``backbone``'s model: ``Runner`` (eager PyTorch with ``options``) or, for
    ``runtime="openvino"``, ``embed.openvino_runtime.OpenVINORunner`` with ``openvino``'s request rows (and, for
    ``amp="int8"``, its quantized IR)."""
    if runtime == "openvino":
        size = int(backbone.info["input_size"])
        if openvino is None:
            raise ValueError("the OpenVINO runtime needs its options (extract.openvino.request_rows)")
        return OpenVINORunner(backbone.model, (size, size), amp_name(amp), backbone.name, openvino.request_rows,
                              ir=openvino.ir)
    options = options or TorchOptions()
    example = None
    if options.fold_bn:
        size = int(backbone.info["input_size"])
        example = torch.zeros(1, 3, size, size)
    return Runner(prepare_model(backbone.model, device, options.channels_last, options.compile, example),
                  device, amp, options.channels_last, options.micro_batch)


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool, compile_: bool,
                  fold_example: torch.Tensor | None = None):
    """``model`` on ``device`` in eval mode, channels-last and compiled as asked; with ``fold_example`` (an input
    batch), a copy of it with its batch norms folded into their convolutions (``embed.folding.folded``)."""
    model = model.to(device).eval()
    if fold_example is not None:
        model = folded(model, fold_example.to(device))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        model = torch.compile(model)
    return model
