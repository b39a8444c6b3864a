"""The embedded demo export: a small, deterministic Pinterest-layout export generated on first use.

Four categories (ocean, forest, desert, night_sky), three boards each spread over three users, 12 pins per
board. It is meant to be hard enough that classifiers differ: every category has a look-alike (ocean and
night_sky, forest and desert), about half the pins are blended with a picture of the look-alike (a night-time
sea, a forest edge in the dunes; the look-alike may even dominate), and one board per category has a style of its
own (darker, paler or tinted), which a split by board must generalise to. Plus one example of every anomaly
``scan`` must catch:

==============================  ==============================================  =====================
where                           what                                            expected verdict
==============================  ==============================================  =====================
alice/ocean_waves/corrupt_pin   random bytes named .jpg                         corrupt (cannot identify)
bruno/woodland/truncated_pin    a JPEG cut in half                              corrupt (truncated JPEG)
chen/dunes/bomb_pin             a PNG header claiming 100000 x 100000 pixels    corrupt (image larger than)
chen/dunes/no_image_pin         a pin folder with no image                      missing
alice/night_lights/png_as_jpg   a PNG named .jpg                                ok (format PNG)
alice/misc                      board_category.txt says "Other"                 rejected
bruno/unsorted                  no board_category.txt                           rejected
chen/drafts                     an empty board_category.txt                     rejected
dana/                           a user without per_board                        skipped
alice/per_board/notes.txt       a stray file beside boards                      ignored
==============================  ==============================================  =====================

and two repins across boards of one category (``REPINS``), which ``audit`` finds and ``train`` keeps off the
training side of their copy: an exact copy (the same bytes) and a near copy (downscaled to 60 %, re-encoded at
JPEG quality 60).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pinterest_cls.core.fileio import locked, process_pool

log = logging.getLogger(__name__)

VERSION = 3  # 2: look-alike categories, blended pins and board styles; 3: two repins
MARKER = ".pinterest_cls_demo.json"
IMAGE_NAME = "pin_closeup_image.jpg"
SIZE = (192, 256)  # width x height: a portrait pin, as on Pinterest
PINS_PER_BOARD = 12
# (user, board, category) — each category has three boards, one per user.
BOARDS = [
    ("alice", "ocean_waves", "ocean"),
    ("bruno", "sea_trip", "ocean"),
    ("chen", "blue_water", "ocean"),
    ("alice", "hiking", "forest"),
    ("bruno", "woodland", "forest"),
    ("chen", "pines", "forest"),
    ("alice", "sahara", "desert"),
    ("bruno", "sand", "desert"),
    ("chen", "dunes", "desert"),
    ("alice", "night_lights", "night_sky"),
    ("bruno", "stars", "night_sky"),
    ("chen", "moonlight", "night_sky"),
]


#: Each category's look-alike: about half its pins are blended with one of the look-alike's pictures.
LOOK_ALIKE = {"ocean": "night_sky", "night_sky": "ocean", "forest": "desert", "desert": "forest"}
BLENDED_SHARE = 0.5
BLEND_WEIGHT = (0.15, 0.65)  # the look-alike's weight in a blended pin: above 0.5 it dominates
#: Boards with a style of their own: (brightness factor, added RGB tint), applied to every pin of the board.
BOARD_STYLES = {"blue_water": (0.55, (0, 0, 20)), "pines": (1.0, (40, 25, 0)), "dunes": (1.15, (0, 20, 0)),
                "moonlight": (1.6, (10, 10, 0))}


#: Repins: (kind, (user, board, pin) of the original, (user, board, pin) of its copy on another board).
REPINS = [
    ("exact", ("alice", "ocean_waves", "pin_003"), ("chen", "blue_water", "repin_003")),
    ("near", ("alice", "hiking", "pin_005"), ("chen", "pines", "repin_005")),
]
NEAR_COPY = {"scale": 0.6, "quality": 60}

REJECTED_BOARDS = [
    ("alice", "misc", "Other\n"),  # category 'other'
    ("bruno", "unsorted", None),  # no board_category.txt
    ("chen", "drafts", "   \n"),  # empty category
]


def _gradient(h: int, w: int, top, bottom) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    img = (1 - t) * np.array(top, float) + t * np.array(bottom, float)
    return np.broadcast_to(img, (h, w, 3)).copy()


def _draw(category: str, rng: np.random.Generator) -> Image.Image:
    w, h = SIZE
    jitter = rng.integers(-20, 21, size=3)
    if category == "ocean":
        arr = _gradient(h, w, (150, 200, 245) + jitter, (10, 50, 140))
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for k in range(int(rng.integers(5, 9))):
            y0 = h * 0.35 + k * h * 0.08 + rng.uniform(-5, 5)
            amp, freq, phase = rng.uniform(3, 8), rng.uniform(0.03, 0.08), rng.uniform(0, 6.3)
            pts = [(x, y0 + amp * np.sin(freq * x + phase)) for x in range(0, w + 1, 4)]
            d.line(pts, fill=(230, 240, 255), width=int(rng.integers(2, 4)))
    elif category == "forest":
        arr = _gradient(h, w, (170, 210, 160) + jitter, (30, 70, 25))
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(6, 12))):
            x, base = rng.uniform(0, w), rng.uniform(h * 0.5, h)
            tw, th = rng.uniform(20, 45), rng.uniform(60, 140)
            d.rectangle([x - 3, base - 10, x + 3, base + 15], fill=(90, 60, 30))
            g = int(rng.integers(60, 110))
            d.polygon([(x - tw / 2, base), (x + tw / 2, base), (x, base - th)], fill=(10, g, 20))
    elif category == "desert":
        arr = _gradient(h, w, (250, 225, 170) + jitter, (215, 160, 80))
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        cx, cy, r = rng.uniform(30, w - 30), rng.uniform(20, 70), rng.uniform(14, 26)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(255, 250, 200))
        for k in range(3):
            y0 = h * (0.45 + 0.17 * k)
            amp, freq, phase = rng.uniform(10, 25), rng.uniform(0.01, 0.03), rng.uniform(0, 6.3)
            pts = [(x, y0 + amp * np.sin(freq * x + phase)) for x in range(0, w + 1, 4)]
            shade = (200 - 25 * k, 140 - 20 * k, 60 - 10 * k)
            d.polygon(pts + [(w, h), (0, h)], fill=shade)
    elif category == "night_sky":
        arr = _gradient(h, w, (5, 5, 25), (25, 25, 70) + jitter)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(40, 90))):
            x, y, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.5, 2.0)
            d.ellipse([x - s, y - s, x + s, y + s], fill=(255, 255, 230))
        cx, cy, r = rng.uniform(40, w - 40), rng.uniform(30, 110), rng.uniform(12, 22)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(235, 235, 210))
    else:  # pragma: no cover - only the categories above are generated
        raise ValueError(category)
    noise = rng.normal(0, 4, size=(h, w, 3))
    arr = np.clip(np.asarray(im, dtype=float) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _pin(category: str, board: str, rng: np.random.Generator) -> Image.Image:
    """A demo pin: its category's picture, maybe blended with its look-alike's, in its board's style."""
    im = _draw(category, rng)
    if rng.random() < BLENDED_SHARE:
        im = Image.blend(im, _draw(LOOK_ALIKE[category], rng), float(rng.uniform(*BLEND_WEIGHT)))
    if board in BOARD_STYLES:
        gain, tint = BOARD_STYLES[board]
        arr = np.asarray(im, dtype=float) * gain + np.array(tint, dtype=float)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return im


def _jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~100-byte PNG whose header claims ``width x height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def generate_demo_export(root: Path) -> Path:
    """Write the demo export into ``root`` (replacing it). Deterministic: same bytes on every call."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    for b, (user, board, category) in enumerate(BOARDS):
        bdir = root / user / "per_board" / board
        bdir.mkdir(parents=True)
        (bdir / "board_category.txt").write_text(f"{category}\n")
        for p in range(PINS_PER_BOARD):
            rng = np.random.default_rng([VERSION, b, p])
            pdir = bdir / f"pin_{p:03d}"
            pdir.mkdir()
            (pdir / IMAGE_NAME).write_bytes(_jpeg_bytes(_pin(category, board, rng)))
            (pdir / "pin.json").write_text(json.dumps({"pin": f"pin_{p:03d}", "board": board}))
    for kind, (user, board, pin), (to_user, to_board, to_pin) in REPINS:
        data = (root / user / "per_board" / board / pin / IMAGE_NAME).read_bytes()
        if kind == "near":
            im = Image.open(io.BytesIO(data))
            im = im.resize((round(im.width * NEAR_COPY["scale"]), round(im.height * NEAR_COPY["scale"])),
                           Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=NEAR_COPY["quality"])
            data = buf.getvalue()
        pdir = root / to_user / "per_board" / to_board / to_pin
        pdir.mkdir()
        (pdir / IMAGE_NAME).write_bytes(data)
        (pdir / "pin.json").write_text(json.dumps({"pin": to_pin, "board": to_board}))
    for user, board, text in REJECTED_BOARDS:
        bdir = root / user / "per_board" / board
        bdir.mkdir(parents=True)
        if text is not None:
            (bdir / "board_category.txt").write_text(text)
        for p in range(3):
            pdir = bdir / f"pin_{p:03d}"
            pdir.mkdir()
            rng = np.random.default_rng([VERSION, 100 + len(user), p])
            (pdir / IMAGE_NAME).write_bytes(_jpeg_bytes(_draw("forest", rng)))

    def pin_dir(user: str, board: str, pin: str) -> Path:
        d = root / user / "per_board" / board / pin
        d.mkdir()
        return d

    rng = np.random.default_rng([VERSION, 999])
    (pin_dir("alice", "ocean_waves", "corrupt_pin") / IMAGE_NAME).write_bytes(
        rng.integers(0, 256, size=4000, dtype=np.uint8).tobytes()
    )
    whole = _jpeg_bytes(_draw("forest", np.random.default_rng([VERSION, 998])))
    (pin_dir("bruno", "woodland", "truncated_pin") / IMAGE_NAME).write_bytes(whole[: len(whole) // 2])
    (pin_dir("chen", "dunes", "bomb_pin") / IMAGE_NAME).write_bytes(bomb_png())
    pin_dir("chen", "dunes", "no_image_pin")  # a pin folder without its image
    buf = io.BytesIO()
    _draw("night_sky", np.random.default_rng([VERSION, 997])).save(buf, "PNG")
    (pin_dir("alice", "night_lights", "png_as_jpg") / IMAGE_NAME).write_bytes(buf.getvalue())
    (root / "dana").mkdir()
    (root / "dana" / "profile.json").write_text('{"user": "dana"}')
    (root / "alice" / "per_board" / "notes.txt").write_text("stray file beside boards\n")
    (root / MARKER).write_text(json.dumps({"version": VERSION}))
    return root


def ensure_demo_export(root: Path) -> Path:
    """The demo export at ``root``, generated unless a complete one of this version is already there."""
    marker = Path(root) / MARKER
    with locked(Path(root).parent, ".demo.lock"):  # parallel jobs: one generates, the others wait for it
        try:
            if json.loads(marker.read_text()).get("version") == VERSION:
                return Path(root)
        except (OSError, ValueError):
            pass
        log.info(f"Generating the demo export in {root} ...")
        return generate_demo_export(Path(root))


def _synthetic_pin(args) -> None:
    i, path, width, height = args
    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    arr = np.repeat(np.repeat(base, 16, axis=0), 16, axis=1)[:height, :width]
    im = Image.fromarray(np.ascontiguousarray(arr))
    d = ImageDraw.Draw(im)
    for _ in range(20):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        d.ellipse([x, y, x + int(rng.integers(20, 200)), y + int(rng.integers(20, 200))],
                  fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, "JPEG", quality=90)


def synthetic_export(root: Path, n: int, size: tuple[int, int] = (736, 1100), pins_per_board: int = 250,
                     categories: int = 5) -> Path:
    """A pinterest-layout export of ``n`` generated JPEGs of ``size`` (default: a typical Pinterest
    close-up), for benchmarks. Made once; a later call with the same ``n`` and size reuses it."""
    root = Path(root)
    marker = root / f".synthetic_{n}_{size[0]}x{size[1]}"
    if marker.exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    jobs = []
    for i in range(n):
        b = i // pins_per_board
        board = root / f"user{b // 4:03d}" / "per_board" / f"board{b:04d}"
        if i % pins_per_board == 0:
            board.mkdir(parents=True, exist_ok=True)
            (board / "board_category.txt").write_text(f"category{b % categories}\n")
        jobs.append((i, board / f"pin{i:07d}" / IMAGE_NAME, size[0], size[1]))
    with process_pool() as pool:
        list(pool.map(_synthetic_pin, jobs, chunksize=64))
    marker.touch()
    return root
