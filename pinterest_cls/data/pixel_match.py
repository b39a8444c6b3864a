"""Whether two image files show the same picture: a check on the pixels of a candidate pair of copies, which
embeddings alone cannot make (two photos of one scene embed alike).

Both images are made grey thumbnails and compared in two frequency bands (differences of Gaussian blurs, sigma
0.8 - 2.5 and 2.5 - 8 pixels: fine detail and coarse layout) at ``SIZE`` x ``SIZE`` pixels, each squeezed to a
square, so that a resized copy, or one of another aspect ratio, lines up with its original. The score is the lower
of the two bands' normalised cross-correlations (1: the same pixels up to brightness and contrast).

Where the aligned score is below ``ALIGNED``, a crop is looked for, in both directions:

1. each image in turn is resized so that a window of ``s`` of each of its sides covers ``SIZE`` pixels (``s`` in
   ``SCALE_STEPS`` steps from ``MIN_SCALE`` to 1), and the other's coarse band (its rim of ``TEMPLATE_MARGIN``
   pixels left out) is matched at every position by FFT correlation;
2. unless the best window's coarse score (an upper bound of the score) is more than ``REFINE_MARGIN`` below what
   the decision needs (``floor``), or its score on both bands more than ``INITIAL_MARGIN`` below, the window's
   four edges are refined by a coordinate search down to an eighth of a pixel, scoring both bands, so that a crop
   of 75-100 % of each side, of any aspect ratio, scores near 1.

The two bands are normalised, so a pair of look-alikes (two garments of one cut, photographed alike) can agree in
both and differ only where one has a pocket or a longer sleeve. A third term sees that: the mean absolute residual
(in grey levels) between the two images' low-pass (Gaussian blur of sigma 2.5 pixels, rim of ``TEMPLATE_MARGIN``
left out) once the second is fitted to the first in brightness and contrast (least squares). Coding and
resampling leave a copy within about a grey level of its original there, a different picture several;
``1 - residual / RESIDUAL_SCALE`` enters the minimum, so that at the floor 0.97 a copy may differ by
``0.03 * RESIDUAL_SCALE`` = 1.92 grey levels.

Two different pictures of one scene, whose shared smooth background the bands leave out, score low. Measured on
the development set (``experiments/repins/pixel_scores.py``): copies of every kind score >= 0.94 (99 % of them >=
0.976), a Fashion-MNIST photo and its nearest distinct photo <= 0.942, different pictures of one demo scene
<= 0.76; so ``repins.min_pixel_score`` is 0.97. Deciding a pair against 0.97 takes under 1 ms when the images
line up, about 15 ms for a crop and 18 ms for a photo and its nearest distinct photo (images decoded);
``ScoreCache`` keeps the scores by the files' content digests, so that a sweep verifies each pair once.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pinterest_cls.core.fileio import available_cpus, process_pool
from pinterest_cls.data.images import ImageDecodeError, load_rgb

#: The side of the compared images, and the largest side of the thumbnails they are made from.
SIZE, THUMB = 64, 256
#: The band edges (Gaussian sigmas, in pixels of the compared images).
SIGMAS = (0.8, 2.5, 8.0)
#: The rim (pixels) of a template left out of the search for a crop.
TEMPLATE_MARGIN = 8
#: An aligned score at least this needs no search for a crop.
ALIGNED = 0.95
#: The smallest window side searched for a crop, the scales tried, and the refining steps (halvings of a pixel) of
#: the best window's edges (not taken where the best is more than ``REFINE_MARGIN`` below what a decision needs).
MIN_SCALE, SCALE_STEPS, REFINE_STEPS, REFINE_MARGIN = 0.75, 6, 3, 0.15
#: How far below the floor the best window's score on both bands may be before any refining (a crop of the
#: development set scores >= 0.55 there, 99 % of them >= 0.71; the nearest distinct photos' median is 0.52), and
#: after each level of refining (steps of 1, 1/2, 1/4, 1/8 pixel).
INITIAL_MARGIN, LEVEL_MARGINS = 0.5, (0.08, 0.04, 0.02)
#: The low-pass the residual term compares (Gaussian sigma, pixels of the compared images), and the residual (mean
#: absolute grey levels, brightness and contrast fitted) that lowers the score by 1.
RESIDUAL_SIGMA, RESIDUAL_SCALE = 2.5, 64.0


@functools.lru_cache(maxsize=1024)
def grey_thumbnail(path: str) -> Image.Image | None:
    """The file as a grey image of at most ``THUMB`` pixels a side (None where it cannot be decoded)."""
    try:
        image = load_rgb(path, min_size=THUMB).convert("L")
    except ImageDecodeError:
        return None
    image.thumbnail((THUMB, THUMB))
    return image


class _Picture:
    """A grey image and its bands at each side compared so far (an image meets several partners)."""

    def __init__(self, image: Image.Image):
        self.image = image
        self._bands: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._low: np.ndarray | None = None

    def low_pass(self) -> np.ndarray:
        """The image squeezed to ``SIZE`` x ``SIZE`` and blurred by ``RESIDUAL_SIGMA`` (grey levels)."""
        if self._low is None:
            self._low = _low_pass(self.image.resize((SIZE, SIZE), Image.BILINEAR))
        return self._low

    def bands(self, side: int) -> tuple[np.ndarray, np.ndarray]:
        """(fine, coarse) bands of the image squeezed to ``side`` x ``side``."""
        if side not in self._bands:
            self._bands[side] = _bands(self.image.resize((side, side), Image.BILINEAR))
        return self._bands[side]


@functools.lru_cache(maxsize=1024)
def _picture(path: str) -> _Picture | None:
    image = grey_thumbnail(path)
    return None if image is None else _Picture(image)


@functools.lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """The Gaussian blur of ``n`` samples (scipy's, mirrored at the edges) as a matrix: ``M @ x`` blurs ``x``, so
    that an image's blur is two small matrix products rather than a filter pass per row and column."""
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(np.eye(n), sigma, axis=0, mode="reflect").astype(np.float32)


def _bands(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(image, dtype=np.float32)
    h, w = a.shape
    fine, mid, coarse = (_blur_matrix(h, s) @ a @ _blur_matrix(w, s).T for s in SIGMAS)
    return fine - mid, mid - coarse


def _low_pass(image: Image.Image) -> np.ndarray:
    a = np.asarray(image, dtype=np.float32)
    h, w = a.shape
    return _blur_matrix(h, RESIDUAL_SIGMA) @ a @ _blur_matrix(w, RESIDUAL_SIGMA).T


def residual_term(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - residual / RESIDUAL_SCALE``: the residual is the mean absolute difference (grey levels) of the low-pass
    images ``a`` and ``b`` (``SIZE`` x ``SIZE``), their rim of ``TEMPLATE_MARGIN`` pixels left out, once ``b`` is
    fitted to ``a`` in brightness and contrast by least squares."""
    m = TEMPLATE_MARGIN
    x, y = a[m:-m, m:-m].astype(np.float64).ravel(), b[m:-m, m:-m].astype(np.float64).ravel()
    yc = y - y.mean()
    gain = float((x - x.mean()) @ yc / (yc @ yc)) if float(yc @ yc) > 0 else 0.0
    residual = float(np.abs(x - x.mean() - gain * yc).mean())
    return 1.0 - residual / RESIDUAL_SCALE


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else 0.0


def _ncc_map(image: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of ``template`` at every position where it fits inside ``image``."""
    from scipy.signal import fftconvolve

    t = template - template.mean()
    tn = float(np.sqrt((t * t).sum()))
    h, w = t.shape
    num = fftconvolve(image, t[::-1, ::-1], mode="valid")
    c1 = np.pad(image, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    c2 = np.pad(image * image, ((1, 0), (1, 0))).cumsum(0).cumsum(1)

    def window_sum(c):
        return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]

    var = window_sum(c2) - window_sum(c1) ** 2 / (h * w)
    return np.where(var > 1e-6, num / np.sqrt(np.maximum(var, 1e-6)) / max(tn, 1e-12), 0.0)


def _crop_map(a: _Picture, b_bands, scale: float) -> tuple[float, tuple[int, int]]:
    """(best score of the coarse band, its position) of ``b`` (its bands) against every window of ``scale`` of each
    side of ``a`` squeezed to a square. The coarse band only: the fine band needs the window placed to a fraction
    of a pixel, which ``_refine_box`` does."""
    m = TEMPLATE_MARGIN  # the template's rim is left out: its blur saw a border, the window's saw the image
    coarse = _ncc_map(a.bands(int(round(SIZE / scale)))[1], b_bands[1][m:-m, m:-m])
    dy, dx = np.unravel_index(int(coarse.argmax()), coarse.shape)
    return float(coarse.max()), (int(dy) - m, int(dx) - m)


def _box_score(a: Image.Image, box, b_bands) -> float:
    """The score of ``b`` against the window ``box`` (x0, y0, x1, y1, in pixels of ``a``, fractions allowed)."""
    w, h = a.size
    x0, y0, x1, y1 = max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3])
    if x1 - x0 < 4 or y1 - y0 < 4:
        return -1.0
    fine, coarse = _bands(a.resize((SIZE, SIZE), Image.BILINEAR, box=(x0, y0, x1, y1)))
    return min(_ncc(fine, b_bands[0]), _ncc(coarse, b_bands[1]))


def _refine_box(a: Image.Image, box: list[float], b_bands, best: float, step: float, floor: float | None
                ) -> tuple[float, list[float]]:
    """A coordinate search over the window's four edges, from ``step`` pixels of ``a`` down to an eighth of it,
    given up at a level whose best is still more than ``LEVEL_MARGINS`` below ``floor`` (no copy gains that much
    from a finer step). A window that reaches ``floor`` is refined to the end all the same: the residual term is
    taken on it, and a window off by a pixel leaves a residual that its copy would not. Returns (the best score,
    its window)."""
    for level in range(REFINE_STEPS + 1):
        moved = True
        while moved:
            moved = False
            for i in range(4):
                for d in (-step, step):
                    trial = list(box)
                    trial[i] += d
                    value = _box_score(a, trial, b_bands)
                    if value > best:
                        best, box, moved = value, trial, True
        if floor is not None and best < floor - LEVEL_MARGINS[min(level, len(LEVEL_MARGINS) - 1)]:
            return best, box
        step /= 2
    return best, box


def _crop_window(a: _Picture, b_bands) -> tuple[float, list[float], float]:
    """(the coarse band's best score, that window of ``a`` as a box, a pixel of the search in ``a``'s pixels) among
    the windows of ``MIN_SCALE``-100 % of each side, by an FFT search at each scale."""
    scales = np.linspace(MIN_SCALE, 1.0, SCALE_STEPS)
    found = [_crop_map(a, b_bands, s) for s in scales]
    i = int(np.argmax([f[0] for f in found]))
    bound, (dy, dx) = found[i]
    w, h = a.image.size
    side = int(round(SIZE / scales[i]))
    fx, fy = w / side, h / side
    return bound, [dx * fx, dy * fy, (dx + SIZE) * fx, (dy + SIZE) * fy], max(fx, fy)


def _window_residual(image: Image.Image, box, other: _Picture) -> float:
    """``residual_term`` of the window ``box`` of ``image`` against ``other``."""
    w, h = image.size
    box = (max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3]))
    return residual_term(_low_pass(image.resize((SIZE, SIZE), Image.BILINEAR, box=box)), other.low_pass())


def _best_crop(a: _Picture, b: _Picture, floor: float | None) -> float:
    """The score of the window of either image (``MIN_SCALE``-100 % of each side, any position) that best matches
    the other: the coarse band's best window in each direction (an upper bound of the score), then, unless it is
    more than ``REFINE_MARGIN`` below ``floor`` (or its score on both bands more than ``INITIAL_MARGIN``), its four
    edges refined to a fraction of a pixel on both bands (a crop of any aspect ratio), the more promising direction
    first; the refined window's score is the lower of its bands' and its residual term."""
    a_bands, b_bands = a.bands(SIZE), b.bands(SIZE)
    tries = sorted([(*_crop_window(a, b_bands), a, b_bands, b), (*_crop_window(b, a_bands), b, a_bands, a)],
                   key=lambda t: -t[0])
    if floor is not None and tries[0][0] < floor - REFINE_MARGIN:  # not near a copy: no refining
        return tries[0][0]
    best = -1.0
    for bound, box, step, pic, template, other in tries:
        if floor is not None and (bound < floor - REFINE_MARGIN or best >= floor):
            break
        first = _box_score(pic.image, box, template)
        if floor is not None and first < floor - INITIAL_MARGIN:  # the window is no crop of the other: not refined
            best = max(best, first)
            continue
        score, box = _refine_box(pic.image, box, template, first, step, floor)
        if floor is None or score >= floor:  # the residual can only lower a score: needed where it could pass
            score = min(score, _window_residual(pic.image, box, other))
        best = max(best, score)
    return best


def copy_score(a: Image.Image, b: Image.Image, floor: float | None = None) -> float:
    """How surely ``a`` and ``b`` (grey images) show the same picture: 1 for copies, low for different pictures.
    ``floor``: the score a decision needs; the search then stops once it is reached, or once it cannot be (the
    value is then a bound, found faster). None: the score itself."""
    return _score(_Picture(a), _Picture(b), floor)


def _score(a: _Picture, b: _Picture, floor: float | None) -> float:
    a_bands, b_bands = a.bands(SIZE), b.bands(SIZE)
    aligned = min(_ncc(x, y) for x, y in zip(a_bands, b_bands))
    if aligned >= ALIGNED:  # the images line up (a re-encoded, resized or stretched copy): no crop to look for
        if floor is None or aligned >= floor:  # the residual can only lower a score: needed where it could pass
            aligned = min(aligned, residual_term(a.low_pass(), b.low_pass()))
        return aligned
    return max(aligned, _best_crop(a, b, floor))


def _pair_score(pair: tuple[str, str, float | None]) -> float:
    a, b = _picture(pair[0]), _picture(pair[1])
    return float("nan") if a is None or b is None else _score(a, b, pair[2])


def verify_pairs(paths_a, paths_b, floor: float | None = None, workers: int | None = None, progress=None
                 ) -> np.ndarray:
    """``copy_score`` of each pair of files (NaN where either cannot be read; with ``floor``, decided against it),
    in a process pool of ``workers`` (default: this process's CPUs) when there are many. Only these files are
    read."""
    pairs = [(str(a), str(b), floor) for a, b in zip(paths_a, paths_b)]
    workers = workers or available_cpus()
    if workers <= 1 or len(pairs) < 32:
        scores = []
        for pair in pairs:
            scores.append(_pair_score(pair))
            if progress is not None:
                progress.update(1)
        return np.asarray(scores, dtype=np.float64)
    # pairs sorted by their first file, so that a worker's thumbnail cache serves a file's several pairs
    order = sorted(range(len(pairs)), key=lambda i: pairs[i])
    scores = np.full(len(pairs), np.nan)
    chunk = max(1, min(64, len(pairs) // (workers * 8)))
    with process_pool(workers) as pool:
        for i, value in zip(order, pool.map(_pair_score, [pairs[i] for i in order], chunksize=chunk)):
            scores[i] = value
            if progress is not None:
                progress.update(1)
    return scores


#: The folder of a data set's ``ScoreCache`` (beside its manifest).
PIXEL_SCORES = "pixel_scores"
#: The version of the score that ``ScoreCache`` parts record: parts of another version (an earlier method) are not
#: read, so that a changed check never serves a score it would not give.
METHOD = 2


class ScoreCache:
    """Pixel scores already computed, keyed by the two files' content digests (sorted) and the ``floor`` they were
    computed for: a sweep's runs over one export verify each candidate pair once. Kept in ``folder`` as parquet
    parts, one per run that added any (written whole, then renamed), so that parallel runs never write one file;
    parts written by another ``METHOD`` of the check are left unread."""

    def __init__(self, folder: Path | None):
        self.folder = None if folder is None else Path(folder)
        self.known: dict[tuple[str, str, float], float] = {}
        if self.folder is not None and self.folder.is_dir():
            for part in sorted(self.folder.glob("*.parquet")):
                try:
                    t = pd.read_parquet(part)
                except (OSError, ValueError):  # a part cut short: its pairs are verified again
                    continue
                if "method" not in t.columns or not (t["method"] == METHOD).all():  # another method's scores
                    continue
                self.known.update(zip(zip(t["a"], t["b"], t["floor"]), t["score"]))

    @staticmethod
    def key(da, db, floor: float) -> tuple[str, str, float] | None:
        if not isinstance(da, str) or not isinstance(db, str) or not da or not db:
            return None
        return (da, db, float(floor)) if da <= db else (db, da, float(floor))

    def scores(self, paths_a, paths_b, digests_a, digests_b, floor: float, progress=None) -> np.ndarray:
        """``verify_pairs`` of the pairs, those known taken from the cache, the others computed and kept."""
        keys = [self.key(a, b, floor) for a, b in zip(digests_a, digests_b)]
        out = np.array([self.known.get(k, np.nan) if k is not None else np.nan for k in keys], dtype=np.float64)
        todo = np.array([k is None or k not in self.known for k in keys], dtype=bool)
        if progress is not None:
            progress.update(int((~todo).sum()))
        if todo.any():
            pa, pb = np.asarray(paths_a, dtype=object)[todo], np.asarray(paths_b, dtype=object)[todo]
            out[todo] = verify_pairs(pa, pb, floor=floor, progress=progress)
            new = [(keys[i], float(out[i])) for i in np.flatnonzero(todo)
                   if keys[i] is not None and np.isfinite(out[i])]
            if new and self.folder is not None:
                self._write(new)
        return out

    def _write(self, new: list) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        t = pd.DataFrame({"a": [k[0] for k, _ in new], "b": [k[1] for k, _ in new],
                          "floor": [k[2] for k, _ in new], "score": [s for _, s in new], "method": METHOD})
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{len(new)}.parquet"
        tmp = self.folder / f".{name}.tmp"
        t.to_parquet(tmp, index=False)
        os.replace(tmp, self.folder / name)
        self.known.update(dict(new))
