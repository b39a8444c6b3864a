"""GPU decoding for ``extract.decode=gpu``: workers only read bytes, the GPU decodes and resizes; and which files are
plain JPEGs (``plain_jpeg``), the ones nvJPEG and OpenCV (``extract.decode=opencv``) decode.

At thousands of images/s a GPU outruns CPU workers that decode JPEGs (about 3.6 ms of one core per 736x1100
pin, decode in draft mode plus resize). Here a DataLoader worker reads the file and looks at its header only;
the main process decodes the whole batch in one nvJPEG call (TorchCodec's ``decode_jpeg``, or torchvision's:
``jpeg_decoder``) and resizes and crops each image on the GPU with the backbone's own preprocessing.

nvJPEG decodes baseline JPEGs, upsampling 4:2:0 chroma differently from libjpeg (features agree with the CPU
path at a mean row cosine of about 0.999, not bit for bit: experiments/throughput/README.md). Every other file
-- progressive or CMYK/grayscale JPEGs, PNG/WebP/GIF, files with an EXIF rotation, files without an
end-of-image marker (truncated) -- is decoded by the worker on the CPU path, exactly as with
``extract.decode=cpu``; a file nvJPEG refuses goes through the same CPU path in the main process. A file that
fails there fails for its own row with its reason, as always.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from pinterest_cls.core.errors import UserError
from pinterest_cls.data.images import ImageDecodeError, _decode_error, _open_checked, _pillow_limits

#: EXIF orientation tag; values other than 1 need a rotation that nvJPEG does not apply.
_ORIENTATION = 0x0112
#: The backbones' interpolations (embed.backbones.make_transform) that the GPU resize reproduces, as torch modes.
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}


@dataclass(frozen=True)
class Resize:
    """A backbone's resize on the GPU, the same as its CPU transform (``embed.backbones.make_transform``): the
    shorter side to ``resize`` then a centre crop of ``size`` (``squash=False``), or both sides to ``size``
    (``squash=True``), with ``interpolation`` and antialiasing as Pillow does."""

    size: int
    resize: int
    interpolation: str
    squash: bool = False

    def output_shape(self, h: int, w: int) -> tuple[int, int]:
        """(h, w) after the resize, before the crop: torchvision's ``Resize(int)`` rule."""
        if self.squash:
            return self.size, self.size
        if h <= w:
            return self.resize, int(self.resize * w / h)
        return int(self.resize * h / w), self.resize

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on the GPU -> uint8 (B, 3, size, size)."""
        h, w = images.shape[-2:]
        th, tw = self.output_shape(h, w)
        x = images.float()
        if (th, tw) != (h, w):
            mode = _MODES.get(self.interpolation)
            if mode is None:
                raise UserError(f"interpolation {self.interpolation!r} has no GPU resize; use extract.decode=cpu")
            kw = {} if mode == "nearest-exact" else {"align_corners": False, "antialias": True}
            x = torch.nn.functional.interpolate(x, size=(th, tw), mode=mode, **kw)
        x = x.round_().clamp_(0, 255)
        if not self.squash:  # torchvision CenterCrop: offsets round((H - size) / 2)
            top, left = int(round((th - self.size) / 2.0)), int(round((tw - self.size) / 2.0))
            x = x[:, :, top:top + self.size, left:left + self.size]
        return x.to(torch.uint8)


def resize_of(backbone) -> Resize:
    """The GPU resize equal to ``backbone``'s CPU transform, from its recorded preprocessing."""
    info = backbone.info
    size = int(info["input_size"])
    squash = info.get("pool") == "flatten"  # the pixel baseline squashes (backbones.build_backbone)
    return Resize(size, size if squash else int(backbone.resize_size), str(info.get("interpolation", "bicubic")),
                  squash)


def plain_jpeg(path: str, max_pixels: int) -> tuple[bytes, tuple[int, int]] | None:
    """(the file's bytes, its (width, height)) when it is a plain JPEG: baseline, 3-channel, no EXIF rotation,
    complete; else None. Such a file decodes the same in nvJPEG (up to its chroma upsampling) and, bit for bit, in
    OpenCV's libjpeg-turbo (``decode_opencv``) as in Pillow's. Reads the header only; raises ImageDecodeError for a
    file that cannot be opened or is over ``max_pixels`` (its row fails, as on the CPU path)."""
    try:
        with _pillow_limits(False), _open_checked(path, max_pixels) as im:
            if im.format != "JPEG" or im.mode != "RGB" or im.info.get("progressive") or im.info.get("progression"):
                return None
            try:
                if im.getexif().get(_ORIENTATION, 1) != 1:
                    return None
            except Exception:
                return None
            size = im.size
        with open(path, "rb") as f:
            data = f.read()
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise _decode_error(exc, None) from None
    return (data, size) if data.rstrip(b"\0")[-2:] == b"\xff\xd9" else None  # no end-of-image marker: truncated


def gpu_decodable(path: str, max_pixels: int) -> bytes | None:
    """The file's bytes when nvJPEG decodes it as the CPU path does, up to its chroma upsampling (a plain JPEG:
    ``plain_jpeg``), else None; raises ImageDecodeError as ``plain_jpeg`` does."""
    plain = plain_jpeg(path, max_pixels)
    return None if plain is None else plain[0]


def decode_opencv(data: bytes, scale: int):
    """A plain JPEG's bytes (``plain_jpeg``) decoded by OpenCV at the DCT ``scale`` (1, 2, 4 or 8, as Pillow's
    draft mode picks it) to an RGB (H, W, 3) uint8 array, or None when OpenCV refuses it."""
    import cv2

    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[scale]
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def jpeg_decoder():
    """(decode_jpeg, description): TorchCodec's when it is installed (``pip install -e ".[gpu]"``), since
    torchvision deprecated its image decoders in 0.29 in favour of it; else torchvision's. Both take a list of
    uint8 byte tensors and decode it in one nvJPEG call on CUDA."""
    try:
        import torchcodec
        from torchcodec.decoders import decode_jpeg

        return (lambda datas, device: decode_jpeg(datas, mode="RGB", device=device)), \
            f"torchcodec {torchcodec.__version__}"
    except ImportError:
        pass
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas, device):
        with warnings.catch_warnings():  # the deprecation in favour of TorchCodec, installed with [gpu]
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)

    return decode, f"torchvision {torchvision.__version__}"


def decode_batch(datas: list[torch.Tensor], device: torch.device, decoder=None) -> list[torch.Tensor | None]:
    """Decode uint8 byte tensors on ``device`` with nvJPEG, as a batch; a file it refuses gives None (the
    caller decodes it on the CPU). Each result is uint8 (3, H, W) RGB."""
    decode = decoder or jpeg_decoder()[0]
    if not datas:
        return []
    try:
        return list(decode(datas, device))
    except RuntimeError:
        out = []
        for data in datas:  # one bad file fails the whole batched call: find it
            try:
                out.append(decode([data], device)[0])
            except RuntimeError:
                out.append(None)
        return out


class GpuDecoder:
    """The main process's half of ``extract.decode=gpu``: turns a batch from ``data.loader.collate_encoded``
    into one uint8 batch per backbone on the device, rows in order. Files nvJPEG refuses are decoded on the
    CPU path here, and fail for their own row if that fails too. ``counts``: rows decoded on each side."""

    def __init__(self, dataset, backbones, device: torch.device):
        self.dataset, self.device = dataset, device
        self.resizes = [resize_of(b) for b in backbones]
        for b, r in zip(backbones, self.resizes):  # before any work, not in the middle of a run
            if r.interpolation not in _MODES:
                raise UserError(f"backbone {b.name} resizes with {r.interpolation!r} interpolation, which has no GPU "
                                f"resize ({', '.join(_MODES)}); use extract.decode=cpu")
        self.first_of = [self.resizes.index(r) for r in self.resizes]
        self.counts = {"gpu": 0, "cpu": 0}
        self.decode, self.decoder = jpeg_decoder()

    def __call__(self, rows: torch.Tensor, payload, failed: list):
        if payload is None:
            return rows, None, failed
        encoded, decoded, failed = payload["encoded"], dict(payload["decoded"]), list(failed)
        buffer, offsets = encoded["buffer"], encoded["offsets"]
        datas = [buffer[offsets[i]:offsets[i + 1]] for i in range(len(encoded["rows"]))]
        images = {}
        for row, image in zip(encoded["rows"], decode_batch(datas, self.device, self.decode)):
            if image is not None:
                images[row] = image
                continue
            _, pixels, reason = self.dataset.decode_row(row)
            if pixels is None:
                failed.append((row, reason))
            else:
                decoded[row] = pixels
        order = sorted(images.keys() | decoded.keys())
        self.counts["gpu"] += len(images)
        self.counts["cpu"] += len(decoded)
        if not order:
            return torch.zeros(0, dtype=torch.long), None, failed
        return torch.tensor(order, dtype=torch.long), self._pixels(order, images, decoded), failed

    def _pixels(self, order, images, decoded) -> list[torch.Tensor]:
        """Per backbone, the batch for ``order``: GPU-decoded images resized in groups of equal size (one
        call per group), CPU-decoded ones (a tensor per backbone) copied over."""
        by_shape: dict[tuple, list[int]] = {}
        for row, image in images.items():
            by_shape.setdefault(tuple(image.shape), []).append(row)
        out: list[torch.Tensor] = []
        for k, resize in enumerate(self.resizes):
            if self.first_of[k] != k:
                out.append(out[self.first_of[k]])
                continue
            done = {}
            for group in by_shape.values():
                for i in range(0, len(group), 64):  # bounds the float copy: 64 pins of 736x1100 are 0.6 GB
                    part = group[i:i + 64]
                    done.update(zip(part, resize(torch.stack([images[r] for r in part]))))
            out.append(torch.stack([done[r] if r in done else decoded[r][k].to(self.device, non_blocking=True)
                                    for r in order]))
        return out
