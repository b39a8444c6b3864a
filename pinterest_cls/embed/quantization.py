"""int8 features (``extract.amp=int8``, with ``extract.runtime=openvino``): the backbone's OpenVINO model quantized
after training by NNCF (``nncf.quantize``: min/max statistics of the activations, fast bias correction, the
``performance`` preset of symmetric int8 weights and activations), calibrated on a seeded sample of at most
``extract.int8.pins`` (300) of the store's own pins, decoded and resized exactly as its rows are. With
``extract.int8.max_cosine_drop`` (0.005) NNCF's accuracy control returns the operations that move the features
most to floating point, until the features of the calibration pins keep a mean row cosine of at least 0.995 to the
float model's: a label-free measure on the store's own data, never on a test set.

- **One model per store.** The quantized IR is written into the store, ``<store>/int8/`` (``model.xml``,
  ``model.bin`` and ``int8.json``: the rows it was calibrated on, NNCF's version, the sha256 of ``model.bin`` and
  the digest of the store's fingerprint), before the first row is embedded. Every shard and every resume loads
  that one file (the first shard to finish quantizing wins; the others load its copy), so all rows come from
  the same model; ``train`` logs it with the run, and ``predict``, ``search`` and the served model embed new
  images with it (``int8_model``), refusing a missing or altered one in one line.
- **Precision.** The quantized operations run in int8; what NNCF leaves in floating point runs in f32 (the
  compiled model's inference precision is f32, checked), so int8 never means bf16 on one CPU and f32 on another.
- The seeded sample, its size and NNCF's version enter the store's fingerprint (``int8``), so a store is never
  resumed with another calibration.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pinterest_cls.core.errors import UserError
from pinterest_cls.core.fileio import atomic_write_json, file_sha256
from pinterest_cls.data.loader import PinDataset
from pinterest_cls.embed.openvino_runtime import convert

log = logging.getLogger(__name__)

#: The folder of a store that holds its int8 model.
INT8_DIR = "int8"
RECORD = "int8.json"
INSTALL = 'pip install -e ".[openvino]" (or pip install nncf)'


def import_nncf(key: str = "extract.amp"):
    try:
        import nncf
    except ImportError:
        raise UserError(f"{key}=int8 needs the nncf package, which is not installed: {INSTALL}") from None
    return nncf


def nncf_version() -> str | None:
    try:
        import nncf
    except ImportError:
        return None
    return str(nncf.__version__)


def calibration_rows(n_rows: int, pins: int, seed: int) -> list[int]:
    """The rows (sorted) of a store of ``n_rows`` whose pins calibrate its int8 model: a seeded sample of
    ``pins`` (all rows when there are fewer)."""
    if pins < 1:
        raise UserError(f"extract.int8.pins={pins} must be >= 1")
    rng = np.random.default_rng(seed)
    return sorted(int(r) for r in rng.choice(n_rows, size=min(pins, n_rows), replace=False))


def settings(pins: int, seed: int, max_cosine_drop: float | None) -> dict:
    """What enters a store's fingerprint (``int8``): the sample's size and seed, the accuracy control's bound and
    NNCF's version."""
    if max_cosine_drop is not None and not 0.0 < float(max_cosine_drop) < 1.0:
        raise UserError(f"extract.int8.max_cosine_drop={max_cosine_drop} must be between 0 and 1 (or null: "
                        "every operation NNCF can quantize)")
    return {"pins": int(pins), "seed": int(seed),
            "max_cosine_drop": None if max_cosine_drop is None else float(max_cosine_drop), "nncf": nncf_version()}


@dataclass(frozen=True)
class Int8Model:
    """A store's int8 model (its ``model.xml``, checked by ``int8_model``): what ``Embedder``'s ``amp`` is for a
    store of ``extract.amp=int8``, the precision being that model."""

    xml: Path


def has_int8_model(store_folder: Path) -> bool:
    """Whether the store in ``store_folder`` has an int8 model (its record; ``int8_model`` checks the rest)."""
    return (Path(store_folder) / INT8_DIR / RECORD).is_file()


def _read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def int8_model(folder: Path, fingerprint_digest: str, key: str = "the store") -> Path:
    """The int8 model (``model.xml``) in ``folder`` (a store's ``int8/`` or a run's copy of it), checked against
    the store's fingerprint digest and its own sha256: a one-line error naming ``key`` when it is missing, of
    other embeddings, or altered."""
    folder = Path(folder)
    record = _read_record(folder)
    xml, weights = folder / "model.xml", folder / "model.bin"
    if record is None or not xml.is_file() or not weights.is_file():
        raise UserError(f"{key} was embedded with extract.amp=int8 but its int8 model is missing ({folder}); "
                        "re-extract the store, or re-run train on it to log the model")
    if record.get("fingerprint") != fingerprint_digest:
        raise UserError(f"the int8 model in {folder} was calibrated for other embeddings than {key}'s; "
                        "re-extract the store with extract.overwrite=true")
    if file_sha256(weights) != record.get("sha256"):
        raise UserError(f"{weights} differs from the int8 model the rows were embedded with (sha256); "
                        "re-extract the store with extract.overwrite=true")
    return xml


def _cosine_to(reference: list[np.ndarray]):
    """NNCF's validation function: the mean row cosine of a model's features to ``reference`` (the float model's
    features of the same calibration batches, in order)."""
    def validate(compiled, batches) -> float:
        scores = []
        for k, x in enumerate(batches):
            q = np.asarray(compiled({0: x})[0], np.float64)
            r = reference[k].astype(np.float64)
            denom = np.linalg.norm(q, axis=1) * np.linalg.norm(r, axis=1)
            scores.append(np.where(denom > 0, (q * r).sum(1) / np.maximum(denom, 1e-30), 1.0).mean())
        return float(np.mean(scores))
    return validate


def quantize_for_store(store_folder: Path, fingerprint_digest: str, ov_model, calibration_batches, rows: list[int],
                       name: str, max_cosine_drop: float | None = 0.005) -> Path:
    """``ov_model`` quantized by NNCF on ``calibration_batches`` (uint8 arrays of the compiled request shape, from the
    pins of ``rows``) and written atomically into ``<store_folder>/int8/`` (a store that already has one keeps it:
    ``store_int8_model`` looks first). Returns its ``model.xml``.

    ``max_cosine_drop``: NNCF's accuracy control (``nncf.quantize_with_accuracy_control``) with the mean row
    cosine of the features to the float model's, on the calibration pins, as the metric: the operations that
    cost the most of it go back to floating point until the drop is at most this much. None: plain
    ``nncf.quantize``, every operation NNCF can quantize in int8. The cosine reached is recorded either way."""
    import openvino as ov

    folder = Path(store_folder) / INT8_DIR
    nncf = import_nncf()
    batches = list(calibration_batches)
    if not batches:
        raise UserError(f"{name}: none of the {len(rows)} calibration pins of extract.amp=int8 could be decoded")
    nncf.set_log_level(logging.WARNING)  # its per-step INFO lines; the outcome is logged below
    t0 = time.perf_counter()
    float_model = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    validate = _cosine_to([np.asarray(float_model({0: x})[0]) for x in batches])
    dataset = nncf.Dataset(batches)
    preset = nncf.QuantizationPreset.PERFORMANCE
    if max_cosine_drop is None:
        quantized = nncf.quantize(ov_model, dataset, subset_size=len(batches), preset=preset)
    else:
        quantized = nncf.quantize_with_accuracy_control(
            ov_model, dataset, dataset, validate, max_drop=float(max_cosine_drop), drop_type=nncf.DropType.ABSOLUTE,
            subset_size=len(batches), preset=preset)
    cosine = validate(ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), batches)
    tmp = Path(tempfile.mkdtemp(prefix=".int8.", dir=store_folder))
    try:
        ov.save_model(quantized, str(tmp / "model.xml"), compress_to_fp16=False)
        record = {"fingerprint": fingerprint_digest, "rows": rows, "pins": len(rows), "nncf": nncf_version(),
                  "preset": "performance", "max_cosine_drop": max_cosine_drop,
                  "cosine_to_float_on_calibration_pins": round(cosine, 6),
                  "sha256": file_sha256(tmp / "model.bin"), "seconds": round(time.perf_counter() - t0, 2)}
        atomic_write_json(tmp / RECORD, record)
        try:
            tmp.rename(folder)  # atomic: a shard that got there first keeps its model, and this one loads it
        except OSError:
            if not (folder / RECORD).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"{name}: quantized to int8 by NNCF on {len(rows)} of the store's pins in "
             f"{time.perf_counter() - t0:.1f} s, features at a mean cosine of {cosine:.5f} to the float model's on "
             f"them ({folder})")
    if max_cosine_drop is not None and cosine < 1.0 - float(max_cosine_drop) - 1e-6:
        log.warning(f"warning: {name}'s int8 features reach a mean cosine of only {cosine:.5f} to the float "
                    f"model's (extract.int8.max_cosine_drop={max_cosine_drop}); NNCF kept what it could")
    return int8_model(folder, fingerprint_digest, name)


def store_int8_model(store_folder: Path, fingerprint_digest: str, backbone, paths: list[str], int8: dict,
                     request_rows: int, draft: bool, max_pixels: int) -> Path:
    """The int8 model of the store in ``store_folder`` (``quantize_for_store``), calibrated, when it has none yet,
    on the seeded sample of its rows (``paths``: every row's file) that ``int8`` (``settings``) names, each decoded
    and resized by ``backbone``'s own transform; unreadable pins are left out of the sample."""
    pins, seed, max_cosine_drop = int(int8["pins"]), int(int8["seed"]), int8.get("max_cosine_drop")
    if has_int8_model(store_folder):
        return int8_model(Path(store_folder) / INT8_DIR, fingerprint_digest, backbone.name)
    rows = calibration_rows(len(paths), pins, seed)
    size = int(backbone.info["input_size"])
    dataset = PinDataset(paths, rows, backbone.transform, backbone.resize_size, draft=draft, max_pixels=max_pixels)
    decoded = [dataset[i] for i in range(len(rows))]
    used = [row for row, pixels, _ in decoded if pixels is not None]
    pixels = [p for _, p, _ in decoded if p is not None]
    ov_model, _ = convert(backbone.model, (request_rows, 3, size, size), backbone.name)
    return quantize_for_store(store_folder, fingerprint_digest, ov_model, request_batches(pixels, request_rows),
                              used, backbone.name, max_cosine_drop)


def request_batches(pixels: list, rows_per_request: int):
    """uint8 (3, H, W) tensors grouped into (rows_per_request, 3, H, W) arrays, the last one padded by repeating
    its pins (so that padding adds no statistics of its own)."""
    for lo in range(0, len(pixels), rows_per_request):
        part = [np.asarray(p) for p in pixels[lo:lo + rows_per_request]]
        part += [part[k % len(part)] for k in range(rows_per_request - len(part))]
        yield np.stack(part)

