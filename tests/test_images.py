"""Decoding for extraction: every mode to correct RGB, EXIF orientation, draft mode, load-time failures."""

import io

import numpy as np
import pytest
from PIL import Image

from pinterest_cls.data.images import ImageDecodeError, load_rgb

from .helpers import write_image


def saved(tmp_path, im, fmt, name, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return write_image(tmp_path / name, buf.getvalue())


def px(im, xy):
    assert im.mode == "RGB"
    return np.array(im.getpixel(xy), dtype=int)


def test_cmyk_jpeg(tmp_path):
    im = Image.new("RGB", (32, 32), (200, 30, 60)).convert("CMYK")
    out = load_rgb(saved(tmp_path, im, "JPEG", "cmyk.jpg", quality=95))
    assert np.abs(px(out, (16, 16)) - [200, 30, 60]).max() <= 6


def test_16bit_gray_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 40000, dtype=np.uint16)
    arr[:, 4:] = 10000
    path = saved(tmp_path, Image.fromarray(arr), "PNG", "g16.png")
    assert Image.open(path).mode.startswith("I")
    out = load_rgb(path)
    assert list(px(out, (1, 1))) == [156] * 3  # 40000 / 65535 * 255
    assert list(px(out, (6, 1))) == [39] * 3


def test_palette_with_transparency_on_white(tmp_path):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (4, 0, 8, 8))
    path = saved(tmp_path, im, "PNG", "p.png", transparency=0)
    out = load_rgb(path)
    assert list(px(out, (1, 1))) == [255, 255, 255]  # transparent red -> white background, not red
    assert list(px(out, (6, 1))) == [0, 0, 255]


def test_la_and_rgba_composited_on_white(tmp_path):
    la = Image.new("LA", (8, 8), (0, 0))
    la.paste((0, 255), (4, 0, 8, 8))
    out = load_rgb(saved(tmp_path, la, "PNG", "la.png"))
    assert list(px(out, (1, 1))) == [255, 255, 255] and list(px(out, (6, 1))) == [0, 0, 0]
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 128))
    out = load_rgb(saved(tmp_path, rgba, "PNG", "rgba.png"))
    assert np.abs(px(out, (1, 1)) - [132, 137, 142]).max() <= 1  # half-way to white


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    path = saved(tmp_path, frames[0], "GIF", "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(path).n_frames == 2
    assert list(px(load_rgb(path), (4, 4))) == [255, 0, 0]


def test_bilevel_and_grayscale(tmp_path):
    out = load_rgb(saved(tmp_path, Image.new("1", (8, 8), 1), "PNG", "b.png"))
    assert list(px(out, (0, 0))) == [255, 255, 255]
    out = load_rgb(saved(tmp_path, Image.new("L", (8, 8), 77), "PNG", "l.png"))
    assert list(px(out, (0, 0))) == [77, 77, 77]


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    out = load_rgb(saved(tmp_path, im, "JPEG", "rot.jpg", exif=exif, quality=95))
    assert out.size == (20, 40)
    assert px(out, (10, 5))[0] > 200 and px(out, (10, 35))[2] > 200  # red on top, blue below


def test_jpeg_draft_mode_downscales_at_decode(tmp_path):
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (1200, 800, 3), dtype=np.uint8))
    path = saved(tmp_path, im, "JPEG", "big.jpg")
    assert load_rgb(path).size == (800, 1200)
    small = load_rgb(path, min_size=180)
    assert small.size == (200, 300)  # 1/4 scale keeps both sides >= 180
    assert load_rgb(path, min_size=500).size == (800, 1200)


@pytest.mark.parametrize("data,reason", [(b"garbage" * 10, "cannot identify image file"), (b"", "empty")])
def test_load_failures_raise_with_reason(tmp_path, data, reason):
    path = write_image(tmp_path / "bad.jpg", data)
    with pytest.raises(ImageDecodeError, match=reason if reason != "empty" else "cannot identify"):
        load_rgb(path)
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_rgb(tmp_path / "gone.jpg")
