"""The OpenVINO runtime (``extract.runtime=openvino``): a backbone converted with ``openvino.convert_model`` and
compiled for the CPU, in place of eager PyTorch.

- **Precision** follows the one policy of ``embed.device.resolve_amp``: bf16 where the CPU computes it natively,
  else f32; a forced precision the CPU plugin does not run is an error, never a silent change.
- **Throughput.** The model is compiled with a fixed request shape of ``request_rows`` pins (static shapes are
  OpenVINO's fast path) under the THROUGHPUT hint; a batch is split into requests of that many rows (the last
  one padded with zeros) that run asynchronously on the plugin's streams. A row's features depend on the
  request shape, never on which stream ran it or on the rows beside it, so they are bitwise reproducible for a
  given ``request_rows``, precision and thread count (which is why ``request_rows``, not the number of
  streams, enters a store's fingerprint).
- **Cache.** The converted model is saved as OpenVINO IR under ``$PINTEREST_CLS_CACHE/openvino/<key>/`` (default
  ``~/.cache/pinterest_cls``), keyed by the sha256 of the backbone's weights and buffers, its class, the input
  shape and the OpenVINO version, so a second run skips the conversion.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pinterest_cls.core.errors import UserError

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "openvino")
INSTALL = 'pip install -e ".[openvino]" (or pip install openvino)'
#: OpenVINO's name for each precision of ``embed.device.amp_name``
OV_PRECISION = {"bf16": "bf16", "fp16": "f16", "fp32": "f32", "int8": "f32"}  # int8: the rest of the model in f32


def check_runtime(name: str, key: str = "extract.runtime") -> str:
    name = str(name)
    if name not in RUNTIMES:
        raise UserError(f"{key}={name!r} must be one of: {', '.join(RUNTIMES)}")
    if name == "openvino":
        import_openvino(key)
    return name


def import_openvino(key: str = "extract.runtime"):
    try:
        import openvino
    except ImportError:
        raise UserError(f"{key}=openvino needs the openvino package, which is not installed: {INSTALL}") from None
    return openvino


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__.split("-")[0]


def cache_root() -> Path:
    return Path(os.environ.get("PINTEREST_CLS_CACHE") or Path.home() / ".cache" / "pinterest_cls")


def model_key(model: torch.nn.Module, shape: tuple[int, ...]) -> str:
    """sha256 of what the converted model depends on: weights and buffers (names, dtypes, values), the module
    classes, the input shape and the OpenVINO version."""
    h = hashlib.sha256()
    h.update(f"{openvino_version()}|{shape}|".encode())
    h.update("|".join(type(m).__qualname__ for m in model.modules()).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes() if t.dtype != torch.bfloat16
                 else t.detach().float().numpy().tobytes())
    return h.hexdigest()[:32]


def convert(model: torch.nn.Module, shape: tuple[int, ...], name: str):
    """The OpenVINO model of ``model`` for uint8 input of ``shape`` (static), from the cache or converted now."""
    ov = import_openvino()
    key = model_key(model, shape)
    folder = cache_root() / "openvino" / key
    xml = folder / "model.xml"
    core = ov.Core()
    if xml.is_file():
        try:
            return core.read_model(str(xml)), True
        except Exception as exc:  # a damaged cache entry is converted again, and said so
            log.warning(f"{name}: the cached OpenVINO model {xml} could not be read ({exc}); converting again")
    t0 = time.perf_counter()
    example = torch.zeros(shape, dtype=torch.uint8)
    try:  # through torch.export (OpenVINO's TorchScript path uses the deprecated torch.jit.trace)
        program = torch.export.export(model.eval(), (example,))
        ov_model = ov.convert_model(program)
        ov_model.reshape({ov_model.inputs[0]: ov.PartialShape(list(shape))})
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"OpenVINO cannot convert backbone {name} ({type(exc).__name__}: {first}); "
                        "use extract.runtime=torch for this backbone") from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    try:
        ov.save_model(ov_model, str(tmp / "model.xml"), compress_to_fp16=False)
        try:
            tmp.rename(folder)  # atomic: a concurrent run that got there first keeps its copy
        except OSError:
            if not xml.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"{name}: converted to OpenVINO in {time.perf_counter() - t0:.1f} s (cached in {folder})")
    # compiled from the saved IR, as every later run is: the model in memory computes other last bits
    return core.read_model(str(xml)), False


@dataclass(frozen=True)
class OpenVINOOptions:
    """What the OpenVINO runtime takes beside the backbone and precision: the request shape's rows
    (``extract.openvino.request_rows``) and, for int8, the store's quantized IR (``embed.quantization``)."""

    request_rows: int
    ir: Path | None = None


class OpenVINORunner:
    """Runs a feature model (uint8 (B, 3, H, W) -> (B, D)) compiled by OpenVINO for the CPU; the same interface
    as ``embed.runner.Runner``. ``precision``: ``bf16`` | ``fp16`` | ``fp32`` | ``int8`` (``embed.device.amp_name``;
    int8 runs the quantized IR ``ir``, a store's ``embed.quantization.int8_model``, its other operations in f32);
    ``threads``: the CPU threads of all streams together (None: torch's current number)."""

    micro_batch = None  # the request shape plays its part

    def __init__(self, model: torch.nn.Module, input_size: tuple[int, int], precision: str, name: str,
                 request_rows: int, threads: int | None = None, ir: Path | None = None):
        ov = import_openvino()
        if int(request_rows) < 1:
            raise UserError(f"extract.openvino.request_rows={request_rows} must be >= 1")
        self.rows = int(request_rows)
        self.shape = (self.rows, 3, *input_size)
        self.precision = precision
        if (precision == "int8") != (ir is not None):
            raise ValueError("the int8 precision runs a quantized IR (embed.quantization), and only it")
        if ir is not None:
            ov_model, self.cached = ov.Core().read_model(str(ir)), True
            got_shape = tuple(ov_model.inputs[0].get_partial_shape().to_shape())
            if got_shape != self.shape:
                raise UserError(f"the int8 model {ir} takes requests of shape {got_shape}, not {self.shape}; "
                                "re-extract the store with extract.overwrite=true")
        else:
            ov_model, self.cached = convert(model, self.shape, name)
        threads = int(threads or torch.get_num_threads())
        config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
                  "INFERENCE_NUM_THREADS": threads}
        try:
            self.compiled = ov.Core().compile_model(ov_model, "CPU", config)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise UserError(f"OpenVINO cannot compile backbone {name} for the CPU in {precision} ({first}); "
                            "use extract.amp=off or extract.runtime=torch") from None
        got = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        if _precision_name(got) != OV_PRECISION[precision]:
            raise UserError(f"OpenVINO runs {name} in {got}, not the {precision} asked for (this CPU lacks it); "
                            "use extract.amp=off (f32) or extract.runtime=torch")
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self.requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.queue = ov.AsyncInferQueue(self.compiled, self.requests)
        self.out: dict[int, np.ndarray] = {}
        self.queue.set_callback(self._done)
        self.pad = np.zeros(self.shape, dtype=np.uint8)
        self.lock = threading.Lock()

    def _done(self, request, k: int) -> None:
        self.out[k] = request.get_output_tensor(0).data.copy()

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if x.dtype != np.uint8 or tuple(x.shape[1:]) != self.shape[1:]:
            raise ValueError(f"expected uint8 batches of shape (B, {', '.join(map(str, self.shape[1:]))}), "
                             f"got {x.dtype} {tuple(x.shape)}")
        n = len(x)
        with self.lock:  # one batch at a time (a server may call from several threads)
            self.out = {}
            for k, lo in enumerate(range(0, n, self.rows)):
                part = x[lo:lo + self.rows]
                if len(part) < self.rows:
                    part = np.concatenate([part, self.pad[: self.rows - len(part)]])
                self.queue.start_async({0: np.ascontiguousarray(part)}, k)
            self.queue.wait_all()
            if not self.out:
                return np.zeros((0, self.compiled.outputs[0].get_partial_shape()[1].get_length()), np.float32)
            return np.concatenate([self.out[k] for k in range(len(self.out))])[:n].astype(np.float32, copy=False)

    def describe(self) -> dict:
        return {"version": openvino_version(), "request_rows": self.rows, "streams": self.streams,
                "requests": self.requests, "precision": self.precision,
                "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS"))}


def _precision_name(prop: str) -> str:
    """OpenVINO reports element types as ``bf16``/``f32`` or as ``<Type: 'bfloat16'>``."""
    s = prop.lower()
    for full, short in (("bfloat16", "bf16"), ("float16", "f16"), ("float32", "f32")):
        if full in s:
            return short
    return s.strip()
