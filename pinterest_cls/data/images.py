"""Safe image decoding: verification for ``scan`` and RGB loading for ``extract``.

Both read the file's content, never its extension, and never decode an image whose header claims more
than ``max_pixels`` pixels (a decompression bomb is a small file that would expand to gigabytes).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

#: Pillow's own limit (about 0.25 GB for a 24-bit image); ``scan.max_pixels`` overrides it.
DEFAULT_MAX_PIXELS = 89_478_485
#: Background that transparent pixels are composited onto (Pinterest shows pins on white).
BACKGROUND = (255, 255, 255)
# EXIF orientations 5-8 rotate by 90 degrees: the displayed width is the stored height.
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}


class ImageDecodeError(Exception):
    """The file is not a usable image; ``str(exc)`` is the human-readable reason."""


@dataclass(frozen=True)
class Verdict:
    status: str  # "ok" | "corrupt" | "missing"
    reason: str  # "" when ok without remark
    width: int | None = None
    height: int | None = None
    format: str | None = None


@contextlib.contextmanager
def _pillow_limits(allow_truncated: bool):
    """Our own pixel check (in ``_open_checked``) decides instead of Pillow's global limit, and
    truncated files raise unless allowed. Restores Pillow's globals on exit."""
    old_truncated, old_max = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = old_truncated, old_max


def _describe(exc: BaseException, fmt: str | None) -> str:
    """A one-line reason for a decoding failure."""
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image file"
    text = str(exc).strip() or type(exc).__name__
    if "truncated" in text.lower() or "premature end" in text.lower():
        return f"truncated {fmt or 'image'}"
    return f"{fmt + ': ' if fmt else ''}{text}".splitlines()[0]


def _decode_error(exc: Exception, fmt: str | None) -> ImageDecodeError:
    """The ``ImageDecodeError`` a decoding failure is reported as."""
    if isinstance(exc, ImageDecodeError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return ImageDecodeError("file not found")
    return ImageDecodeError(_describe(exc, fmt))


def _open_checked(path: str | os.PathLike, max_pixels: int) -> Image.Image:
    """``Image.open`` plus the pixel-count check made on the header alone, before any decoding."""
    im = Image.open(path)
    w, h = im.size
    if w * h > max_pixels:
        fmt = im.format
        im.close()
        raise ImageDecodeError(f"image larger than {max_pixels} pixels ({w}x{h} {fmt})")
    return im


def _displayed_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    try:
        orientation = im.getexif().get(0x0112)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        orientation = None
    return (h, w) if orientation in _ROTATING_ORIENTATIONS else (w, h)


def verify_image(
    path: str | os.PathLike,
    *,
    full: bool = True,
    allow_truncated: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Verdict:
    """Judge one file. ``full=True`` decodes every pixel (``Image.load``); ``Image.verify`` alone misses
    truncated JPEGs. ``full=False`` reads the header only (fast, used to compare in benchmarks).

    Width and height are the displayed size (after EXIF orientation).
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return Verdict("missing", "file not found")
    except OSError as exc:
        return Verdict("corrupt", f"cannot read file: {exc.strerror or exc}")
    if size == 0:
        return Verdict("corrupt", "empty file (0 bytes)")

    fmt = None
    truncated_allowed_note = ""
    with _pillow_limits(allow_truncated):
        try:
            with _open_checked(path, max_pixels) as im:
                fmt = im.format
                width, height = _displayed_size(im)
                if full:
                    if allow_truncated:
                        # Pillow pads a truncated image silently when allowed: find out first, strictly.
                        ImageFile.LOAD_TRUNCATED_IMAGES = False
                        try:
                            im.load()
                        except OSError as exc:
                            if "truncated" not in str(exc).lower():
                                raise
                            truncated_allowed_note = f"truncated {fmt} (allowed)"
                            ImageFile.LOAD_TRUNCATED_IMAGES = True
                            with _open_checked(path, max_pixels) as again:
                                again.load()
                    else:
                        im.load()
        except ImageDecodeError as exc:
            return Verdict("corrupt", str(exc), format=fmt)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
            return Verdict("corrupt", _describe(exc, fmt), format=fmt)
    return Verdict("ok", truncated_allowed_note, width, height, fmt)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, correctly for each.

    - transparency (RGBA, LA, PA, palette or L/RGB with a transparency key) is composited onto white
      rather than dropped (dropping alpha exposes whatever colour the transparent pixels hold);
    - 16/32-bit integer images (``I;16``, ``I``) are scaled to 8 bits, not clipped at 255;
    - float images (``F``) in [0, 1] are scaled, others clipped to [0, 255];
    - CMYK, YCbCr, LAB, bilevel and grayscale go through Pillow's own conversions.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if np.nanmax(arr, initial=0.0) <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(np.clip(arr + 0.5, 0, 255)).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(
    path: str | os.PathLike,
    *,
    min_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode ``path`` to an RGB image with EXIF orientation applied.

    ``min_size``: the smallest side length the caller will resize to. JPEGs are then decoded in draft
    mode at the largest DCT reduction (1/2, 1/4, 1/8) that keeps both sides >= ``min_size``, which is
    several times faster for large pins and changes the result only by the resampling filter.
    Animated images give their first frame. Raises ``ImageDecodeError`` with a reason.
    """
    fmt = None
    try:
        with _pillow_limits(False):
            with _open_checked(path, max_pixels) as im:
                fmt = im.format
                if min_size and fmt == "JPEG":
                    im.draft(None, (min_size, min_size))
                im.seek(0)
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except Exception as exc:
        raise _decode_error(exc, fmt) from None


def draft_scale(size: tuple[int, int], min_size: int | None) -> int:
    """The DCT reduction (1, 2, 4 or 8) Pillow's ``JpegImageFile.draft(None, (m, m))`` picks for a JPEG of
    ``size``: the largest one that keeps both sides >= ``min_size``."""
    if not min_size:
        return 1
    ratio = min(size[0] // min_size, size[1] // min_size)
    return next(s for s in (8, 4, 2, 1) if ratio >= s or s == 1)


def load_rgb_variants(
    path: str | os.PathLike,
    min_sizes: list[int | None],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Image.Image]:
    """``load_rgb`` for several ``min_size`` values at once (one per backbone), decoding the file only
    once per distinct JPEG draft reduction among them — usually once. Each returned image is exactly the
    one ``load_rgb(path, min_size=m)`` gives, so a backbone sees the same pixels as in a run of its own."""
    if len(set(min_sizes)) <= 1:
        image = load_rgb(path, min_size=min_sizes[0] if min_sizes else None, max_pixels=max_pixels)
        return [image] * len(min_sizes)
    try:
        with _pillow_limits(False), _open_checked(path, max_pixels) as im:
            jpeg, size = im.format == "JPEG" and len(im.tile) == 1, im.size
    except Exception as exc:
        raise _decode_error(exc, None) from None
    keys = [draft_scale(size, m) if jpeg else 1 for m in min_sizes]
    decoded: dict[int, Image.Image] = {}
    for key, m in zip(keys, min_sizes):
        if key not in decoded:
            decoded[key] = load_rgb(path, min_size=m if jpeg else None, max_pixels=max_pixels)
    return [decoded[key] for key in keys]
