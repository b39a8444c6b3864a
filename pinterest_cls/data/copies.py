"""Synthetic repins: the copies of a pin that users make when they repin it, made on purpose to measure what finds
them. Each kind is what a repin undergoes on the way to another board, and every copy is re-encoded as a JPEG:

- ``reencoded``: JPEG quality 50-90;
- ``downscaled``: 0.3-0.7 of its size;
- ``cropped``: a window of 80-95 % of each side, at a random place, then 0.5-1.0 of that size;
- ``stretched``: the width changed by 0.85-1.15 (a small change of aspect ratio).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: The kinds of synthetic copy, in the order a calibration makes them.
KINDS = ("reencoded", "downscaled", "cropped", "stretched")


def _jpeg(image: Image.Image, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=int(rng.integers(50, 91)))
    return buf.getvalue()


def _scaled(image: Image.Image, fx: float, fy: float) -> Image.Image:
    return image.resize((max(8, round(image.width * fx)), max(8, round(image.height * fy))), Image.BICUBIC)


def synthetic_copy(image: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """A copy of ``image`` of ``kind`` (one of ``KINDS``), as JPEG bytes; ``rng`` draws its parameters."""
    if kind == "reencoded":
        return _jpeg(image, rng)
    if kind == "downscaled":
        f = rng.uniform(0.3, 0.7)
        return _jpeg(_scaled(image, f, f), rng)
    if kind == "cropped":
        s = rng.uniform(0.8, 0.95)
        w, h = image.size
        x0, y0 = rng.uniform(0, w * (1 - s)), rng.uniform(0, h * (1 - s))
        window = image.crop((round(x0), round(y0), round(x0 + w * s), round(y0 + h * s)))
        f = rng.uniform(0.5, 1.0)
        return _jpeg(_scaled(window, f, f), rng)
    if kind == "stretched":
        return _jpeg(_scaled(image, rng.uniform(0.85, 1.15), 1.0), rng)
    raise ValueError(f"kind={kind!r} must be one of {KINDS}")
