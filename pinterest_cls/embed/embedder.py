"""Embedding any image paths exactly as a store embedded its pins: what ``predict``, ``search``, the served model
and notebooks (``pinterest_cls.Embedder``) use."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pinterest_cls.core.errors import UserError
from pinterest_cls.core.progress import progress_bar
from pinterest_cls.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_rgb
from pinterest_cls.data.loader import PinDataset, default_workers, make_loader
from pinterest_cls.data.metadata import StoreMeta, fingerprint_digest
from pinterest_cls.embed.backbones import Backbone, build_backbone
from pinterest_cls.embed.device import INT8, resolve_amp, runtime_device
from pinterest_cls.embed.openvino_runtime import OpenVINOOptions, check_runtime
from pinterest_cls.embed.quantization import Int8Model, int8_model
from pinterest_cls.embed.runner import TorchOptions, make_runner

log = logging.getLogger(__name__)


def backbone_from_meta(meta: StoreMeta, check_weights: bool = True):
    """Rebuild the backbone that made a store: same config, same seed for random init, and (when the store
    recorded one) the same weights sha256."""
    torch.manual_seed(meta.extract.seed)
    backbone = build_backbone(OmegaConf.create(meta.backbone_config), resize=meta.extract.resize)
    want, got = meta.weights_sha256, backbone.info.get("weights_sha256")
    if check_weights and want and got != want:
        raise UserError(f"the weights found for backbone {meta.backbone} ({backbone.info.get('weights')}, "
                        f"sha256 {got}) differ from those the embeddings were made with (sha256 {want}); "
                        "supply the original file with backbone.weights")
    return backbone


class Embedder:
    """A backbone and its runner, built once, that embed any image paths through the same Dataset, loader and
    runner as ``extract``: what ``predict``, ``search`` and the served model use, so that a long-lived model
    (a server) compiles its runtime once. ``amp``: the precision (``auto``, ``bf16``, ``fp16``, ``fp32``, as
    ``extract.amp``; for int8, the store's model as an ``embed.quantization.Int8Model``); ``dtype``: a store's
    dtype, whose rounding the features then get, so that they compare with the store's rows; ``runtime`` and
    ``request_rows``: ``extract.runtime`` and OpenVINO's request shape. Eager PyTorch's batch norms are folded into
    their convolutions, as ``extract.fold_bn`` does by default; ``for_store`` follows the store's setting.

    >>> from pinterest_cls import Embedder, build_backbone
    >>> embed = Embedder(build_backbone("efficientnet_lite0"))
    >>> features, reasons = embed(["a.jpg", "b.png"])   # (2, 1280) float32; reasons[i] == "" where ok
    """

    def __init__(self, backbone, *, device: str = "auto", amp: str | Int8Model = "auto", draft: bool = True,
                 max_pixels: int | None = None, dtype: str | None = None, runtime: str = "torch",
                 request_rows: int | None = None):
        runtime = check_runtime(runtime)
        self.backbone, self.draft, self.dtype = backbone, draft, dtype
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.device = runtime_device(runtime, device)
        ir = amp.xml if isinstance(amp, Int8Model) else None
        amp = resolve_amp(INT8 if ir else amp, self.device, runtime=runtime)
        if amp == INT8 and ir is None:
            raise UserError("amp=int8 embeds with a store's int8 model: use Embedder.for_store with the store's "
                            "int8 folder (or amp=Int8Model(model.xml))")
        openvino = OpenVINOOptions(request_rows, ir) if runtime == "openvino" and request_rows is not None else None
        self._settings = (amp, runtime, openvino)
        self.runner = self._make_runner(fold_bn=True)

    def _make_runner(self, fold_bn: bool):
        amp, runtime, openvino = self._settings
        return make_runner(self.backbone, self.device, amp, runtime, TorchOptions(fold_bn=fold_bn), openvino)

    @classmethod
    def for_store(cls, backbone, meta: StoreMeta, device: str = "auto", max_pixels: int | None = None,
                  int8_dir: Path | None = None) -> Embedder:
        """Embedding new images exactly as the store of ``meta`` embedded its pins (``max_pixels``: a pixel limit
        other than the store's; ``int8_dir``: where its int8 model is, for a store of ``extract.amp=int8``: the
        store's ``int8/`` folder or a train run's copy of it)."""
        ex = meta.extract
        ir = None
        if ex.amp == INT8:
            if int8_dir is None:
                raise UserError(f"the embeddings of {meta.backbone} were made with extract.amp=int8, and its int8 "
                                "model was not given; re-run train on the store to log it with the run")
            ir = Int8Model(int8_model(Path(int8_dir), fingerprint_digest(meta.fingerprint), f"the store of "
                                      f"{meta.backbone}"))
        if backbone.info.get("resize", "pil") != ex.resize:
            raise UserError(f"backbone {backbone.name} resizes with {backbone.info.get('resize')!r}, its store's pins "
                            f"with extract.resize={ex.resize!r}; build it with embed.embedder.backbone_from_meta")
        if ex.amp is None:
            log.warning("note: the embeddings' meta.json does not record the precision they were made with (made "
                        "before it was recorded); embedding with extract.amp=auto as resolved on this device")
        embedder = cls(backbone, device=device, amp=ir or ex.amp or "auto", draft=ex.draft,
                       max_pixels=max_pixels or ex.max_pixels, dtype=meta.dtype, runtime=ex.runtime,
                       request_rows=ex.request_rows)
        if ex.runtime == "torch" and not ex.fold_bn:  # a store from before extract.fold_bn, or made without it
            embedder.runner = embedder._make_runner(fold_bn=False)
        return embedder

    def __call__(self, paths: list[str], *, batch_size: int = 64, workers: int | None = None,
                 progress: bool = False) -> tuple[np.ndarray, list[str]]:
        """Features (len(paths) x D, float32; zeros where decoding failed) and a reason per path ("" = ok)."""
        backbone = self.backbone
        dataset = PinDataset(list(map(str, paths)), range(len(paths)), backbone.transform, backbone.resize_size,
                             draft=self.draft, max_pixels=self.max_pixels)
        n_workers = default_workers() if workers is None else workers
        loader = make_loader(dataset, batch_size, min(n_workers, max(0, len(paths) // batch_size)),
                             pin_memory=self.device.type == "cuda")
        feats = np.zeros((len(paths), backbone.dim), dtype=np.float32)
        reasons = [""] * len(paths)
        with progress_bar(len(paths), f"embed {backbone.name}", "img", progress, leave=True) as bar:
            for rows, pixels, failed in loader:
                if pixels is not None:
                    feats[rows.numpy()] = self.runner(pixels)
                for row, reason in failed:
                    reasons[row] = reason
                bar.update(len(rows) + len(failed))
        if self.dtype is not None:
            feats = feats.astype(self.dtype).astype(np.float32)
        return feats, reasons


def embed_images(backbone, paths: list[str], *, batch_size: int = 64, workers: int | None = None,
                 progress: bool = False, **settings) -> tuple[np.ndarray, list[str]]:
    """``paths`` embedded once: (features, len(paths) x D float32, zeros where a file failed; a reason per path,
    "" where it was embedded). ``backbone``: a ``pinterest_cls.embed.backbones.Backbone``, a name from
    ``conf/backbone/`` or a backbone config (built with ``pinterest_cls.embed.backbones.build_backbone``);
    ``settings``: those of ``Embedder`` (``device``, ``amp``, ``runtime``, ...).

    >>> features, reasons = embed_images("efficientnet_lite0", ["a.jpg", "b.jpg"])
    """
    if not isinstance(backbone, Backbone):
        backbone = build_backbone(backbone)
    return Embedder(backbone, **settings)(paths, batch_size=batch_size, workers=workers, progress=progress)


def embed_file(meta: StoreMeta, path: str | Path, key: str = "query", int8_dir: Path | None = None) -> np.ndarray:
    """One image file embedded exactly as the store of ``meta`` embedded its pins: a (1, D) float32 vector
    (``int8_dir``: as for ``Embedder.for_store``). The file is decoded first, so one that is not an image fails (a
    one-line error naming ``key``) before any model is built."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise UserError(f"{key}={path} is not a file")
    try:
        load_rgb(path)
    except ImageDecodeError as exc:
        raise UserError(f"{key}={path} is not an image ({exc})") from None
    vec, reasons = Embedder.for_store(backbone_from_meta(meta), meta, int8_dir=int8_dir)([str(path)], batch_size=1,
                                                                                          workers=0)
    if reasons[0]:
        raise UserError(f"{key}={path} is not an image ({reasons[0]})")
    return vec
