"""The pixel check on its development set: the scores of copies of every kind and of distinct pictures, and the
time a decision takes (``pinterest_cls.data.pixel_match``).

    python experiments/repins/pixel_scores.py [--idx /usr/share/datasets/fashion-mnist] [--n 400]

The set its parameters were chosen on (``bench.py`` measures on other photos, from the 10,000th on):

- the first --n Fashion-MNIST training photos, upscaled to 112 px JPEGs at quality 90, and 20 crops (30-60 % of
  the width) of scikit-learn's two sample photographs resized to 240 x 320: one synthetic copy of each kind of
  each (``pinterest_cls.data.copies``, seed 0);
- distinct pairs: 150 random pairs of the Fashion photos, and each Fashion photo with its nearest other photo by
  the pixels (16 x 16 grey, cosine): the hardest distinct pairs;
- different pictures of one generated scene: 15 demo pictures of each category (``demo._draw``), every pair;
- not for choosing, but to show what the set lacked: Fashion-MNIST's own look-alikes among 10,000 other photos
  (20,000-29,999, apart from bench.py's): each photo's nearest other by the pixels, the --lookalikes closest pairs.

Prints each set's lowest, 1st percentile and median score, how many copies fall below ``repins.min_pixel_score``
and how many distinct pairs reach it, and milliseconds per decision (in this process; images decoded beforehand).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from pinterest_cls.core.config import compose
from pinterest_cls.data import demo
from pinterest_cls.data import pixel_match as pm
from pinterest_cls.data.copies import KINDS, synthetic_copy
from pinterest_cls.finetuning.sources import read_idx


def jpeg(image: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def grey(image: Image.Image) -> Image.Image:
    """As the pixel check reads a file (``grey_thumbnail``)."""
    image = image.convert("L")
    image.thumbnail((pm.THUMB, pm.THUMB))
    return image


def row(name: str, scores: list[float], floor: float, copies: bool, ms: float) -> str:
    s = np.asarray(scores)
    decided = f"{int((s < floor).sum())} below" if copies else f"{int((s >= floor).sum())} reach it"
    return (f"| {name} | {len(s)} | {s.min():.3f} | {np.percentile(s, 1):.3f} | {np.median(s):.3f} | "
            f"{s.max():.3f} | {decided} | {ms:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idx", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--lookalikes", type=int, default=150, help="closest distinct pairs of photos 20,000-29,999")
    args = ap.parse_args()
    floor = float(compose("train", []).repins.min_pixel_score)
    rng = np.random.default_rng(0)
    images = read_idx(Path(args.idx) / "train-images-idx3-ubyte.gz")[:args.n]
    fashion = [jpeg(Image.fromarray(x).resize((112, 112), Image.BICUBIC)) for x in images]
    photos = []
    for array in load_sample_images().images:
        picture = Image.fromarray(array)
        w, h = picture.size
        for _ in range(10):
            s = rng.uniform(0.3, 0.6)
            cw, ch = int(w * s), min(int(h * s * 1.3), h - 1)
            x0, y0 = rng.integers(0, w - cw), rng.integers(0, h - ch)
            photos.append(jpeg(picture.crop((x0, y0, x0 + cw, y0 + ch)).resize((240, 320))))

    def timed(pairs):
        """(exact scores, decisions' milliseconds per pair)."""
        exact = [pm.copy_score(a, b) for a, b in pairs]
        t0 = time.perf_counter()
        for a, b in pairs:
            pm.copy_score(a, b, floor)
        return exact, (time.perf_counter() - t0) / len(pairs) * 1000

    print(f"repins.min_pixel_score = {floor}\n")
    print("| pairs | n | min | 1 % | median | max | at the floor | ms per decision |")
    print("|---|---|---|---|---|---|---|---|")
    for name, pool in (("Fashion-MNIST", fashion), ("photos", photos)):
        for kind in KINDS:
            pairs = [(grey(im), grey(Image.open(io.BytesIO(synthetic_copy(im, kind, rng))))) for im in pool]
            scores, ms = timed(pairs)
            print(row(f"{name}: {kind} copy", scores, floor, True, ms), flush=True)
    pairs = [(grey(fashion[i]), grey(fashion[j])) for i, j in rng.integers(0, len(fashion), (150, 2)) if i != j]
    scores, ms = timed(pairs)
    print(row("Fashion-MNIST: random distinct pairs", scores, floor, False, ms))
    x = np.stack([np.asarray(grey(im).resize((16, 16)), dtype=np.float32).ravel() for im in fashion])
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    scores, ms = timed([(grey(fashion[i]), grey(fashion[j])) for i, j in enumerate(sims.argmax(1))])
    print(row("Fashion-MNIST: each photo and its nearest distinct photo", scores, floor, False, ms))
    r = np.random.default_rng(1)
    for category in ("night_sky", "ocean", "forest", "desert"):  # the demo's four categories
        scene = [grey(demo._draw(category, r)) for _ in range(15)]
        scores, ms = timed([(scene[i], scene[j]) for i in range(15) for j in range(i + 1, 15)])
        print(row(f"demo {category}: two pictures of the scene", scores, floor, False, ms), flush=True)
    # Fashion-MNIST's own look-alikes, among 10,000 photos apart from this set and from bench.py's (20,000 on):
    # each photo's nearest other by the pixels, the --lookalikes closest pairs (a pair counted once)
    others = read_idx(Path(args.idx) / "train-images-idx3-ubyte.gz")[20000:30000]
    x = np.stack([np.asarray(Image.fromarray(a).resize((16, 16)), dtype=np.float32).ravel() for a in others])
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    nearest, best = np.zeros(len(x), dtype=np.int64), np.zeros(len(x))
    for lo in range(0, len(x), 2000):
        sims = x[lo:lo + 2000] @ x.T
        sims[np.arange(len(sims)), np.arange(lo, lo + len(sims))] = -1
        nearest[lo:lo + 2000], best[lo:lo + 2000] = sims.argmax(1), sims.max(1)
    pairs = sorted({tuple(sorted((int(i), int(nearest[i])))) for i in range(len(x))}, key=lambda p: -best[p[0]])
    pairs = pairs[:args.lookalikes]
    big = [grey(jpeg(Image.fromarray(a).resize((112, 112), Image.BICUBIC))) for a in others]
    scores, ms = timed([(big[i], big[j]) for i, j in pairs])
    print(row(f"Fashion-MNIST photos 20,000-29,999: the {len(pairs)} closest look-alike pairs", scores, floor, False,
              ms))
    diff = [float(np.abs(others[i].astype(np.float32) - others[j]).mean()) for i, j in pairs]
    reach = [d for d, s in zip(diff, scores) if s >= floor]
    if reach:
        print(f"\n{len(reach)} of those pairs reach the floor; their 28-px originals differ by a mean of "
              f"{min(reach):.1f}-{max(reach):.1f} grey levels (of 255)\n")


if __name__ == "__main__":
    main()
