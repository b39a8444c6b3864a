"""Cheaper data paths for CPU extraction: each candidate's core-ms per pin on one core, its pixels against today's,
and its features against today's with efficientnet_lite0's real weights.

    python experiments/throughput/data_path.py [--n 300] [--fashion 2000] [--dir /tmp/data_path_bench]

Today's path (a DataLoader worker of ``extract``): Pillow decodes the JPEG in draft mode (libjpeg's DCT scaling
to the largest 1/2, 1/4, 1/8 that keeps the shorter side >= the resize size), torchvision resizes the shorter
side to 256 with Pillow's bicubic filter and crops the centre 224 x 224. The candidates end at the same 224 x
224 crop of the same geometry:

- ``pillow_box``: the same decode; Pillow resizes only the crop's box of the image (no resize of what the crop
  throws away), bicubic;
- ``pillow_box_gap2``, ``pillow_box_gap3``: the same with ``reducing_gap`` 2.0 / 3.0 (an integer box reduction
  first, then bicubic on what is left);
- ``cv2_area``, ``cv2_cubic``: OpenCV decodes at the same DCT scale (``IMREAD_REDUCED_COLOR_k``) and
  ``cv2.resize``s with ``INTER_AREA`` / ``INTER_CUBIC``, then crops;
- ``simplejpeg_area``, ``simplejpeg_cubic``: simplejpeg (libjpeg-turbo) decodes at the nearest M/8 scale that
  keeps the resize size, then ``cv2.resize`` as above;
- ``pillow_torch_bicubic``: today's decode; torchvision's antialiased bicubic resize of the uint8 tensor (its own
  kernels, not Pillow's);
- ``simplejpeg_pillow_box``, ``simplejpeg_torch_bicubic``: simplejpeg's M/8 decode, then Pillow's bicubic on the
  crop's box, or torchvision's antialiased bicubic;
- ``pyvips_thumbnail``: pyvips' ``thumbnail_buffer`` (shrink-on-load, then its lanczos3 reduction), then crops;
  ``pyvips_cubic``: shrink-on-load then ``resize`` with the cubic kernel.

(1) Per pin, on one core (every library held to one thread), from the file's bytes to the uint8 crop, on --n
generated 736 x 1100 JPEGs (``data.demo.synthetic_export``, the throughput bench's pins): the median of 3 passes.
(2) Pixels: mean and max absolute difference to today's crop (0-255). (3) Features: the row cosine of lite0's
(real ImageNet weights, fp32) features of each candidate's crops against today's, on the same pins and on --fashion
Fashion-MNIST photos made 736 x 1100 pins (upscaled, bicubic, JPEG quality 90); and logistic-regression test
accuracy on those Fashion-MNIST pins (boards of 20 pins, a board-wise split: 20 % of the boards tested, seed 0,
C=10 on L2-normalised features), with today's 95 % bootstrap interval over test boards. Prints the tables of
``experiments/throughput/README.md`` and writes ``results/data_path.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("VIPS_CONCURRENCY", "1")  # before pyvips is imported: one thread, as a worker has

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pinterest_cls.data.demo import synthetic_export  # noqa: E402
from pinterest_cls.data.images import load_rgb  # noqa: E402
from pinterest_cls.embed.backbones import build_backbone  # noqa: E402
from pinterest_cls.embed.runner import make_runner  # noqa: E402

IMAGE_NAME = "pin_closeup_image.jpg"


def geometry(w: int, h: int, resize: int, size: int):
    """Today's geometry: the shorter side resized to ``resize``, then the centre ``size`` crop (torchvision's
    rounding): (resized width, resized height, left, top)."""
    ow, oh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    return ow, oh, int(round((ow - size) / 2.0)), int(round((oh - size) / 2.0))


def draft_scale(w: int, h: int, resize: int) -> int:
    ratio = min(w // resize, h // resize)
    return next(s for s in (8, 4, 2, 1) if ratio >= s or s == 1)


class Paths:
    """The data paths: each a function from a JPEG's bytes to a (size, size, 3) uint8 array."""

    def __init__(self, backbone):
        import cv2

        cv2.setNumThreads(1)
        self.cv2 = cv2
        self.backbone, self.size, self.resize = backbone, int(backbone.info["input_size"]), backbone.resize_size

    def today(self, data: bytes) -> np.ndarray:
        im = load_rgb(io.BytesIO(data), min_size=self.resize)
        return self.backbone.transform(im).permute(1, 2, 0).numpy()

    def _box(self, data: bytes, gap: float | None) -> np.ndarray:
        im = load_rgb(io.BytesIO(data), min_size=self.resize)
        w, h = im.size
        ow, oh, left, top = geometry(w, h, self.resize, self.size)
        sx, sy = w / ow, h / oh
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        return np.asarray(im.resize((self.size, self.size), Image.BICUBIC, box=box, reducing_gap=gap))

    def pillow_box(self, data):
        return self._box(data, None)

    def pillow_box_gap2(self, data):
        return self._box(data, 2.0)

    def pillow_box_gap3(self, data):
        return self._box(data, 3.0)

    def _crop(self, a: np.ndarray, interp) -> np.ndarray:
        h, w = a.shape[:2]
        ow, oh, left, top = geometry(w, h, self.resize, self.size)
        r = self.cv2.resize(a, (ow, oh), interpolation=interp)
        return r[top:top + self.size, left:left + self.size]

    def _cv2_decode(self, data: bytes) -> np.ndarray:
        cv2 = self.cv2
        header = Image.open(io.BytesIO(data))  # the size only: no pixels are decoded
        k = draft_scale(*header.size, self.resize)
        flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}[k]
        a = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        return cv2.cvtColor(a, cv2.COLOR_BGR2RGB)

    def cv2_area(self, data):
        return self._crop(self._cv2_decode(data), self.cv2.INTER_AREA)

    def cv2_cubic(self, data):
        return self._crop(self._cv2_decode(data), self.cv2.INTER_CUBIC)

    def _simplejpeg(self, data: bytes) -> np.ndarray:
        import simplejpeg

        w, h = simplejpeg.decode_jpeg_header(data)[:2]
        short = min(w, h)  # the smallest M/8 scale whose shorter side still covers the resize size
        m = next(m for m in range(1, 9) if short * m / 8 >= self.resize)
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=int(np.ceil(w * m / 8)) - 1,
                                      min_height=int(np.ceil(h * m / 8)) - 1)

    def simplejpeg_area(self, data):
        return self._crop(self._simplejpeg(data), self.cv2.INTER_AREA)

    def simplejpeg_cubic(self, data):
        return self._crop(self._simplejpeg(data), self.cv2.INTER_CUBIC)

    def _torch_resize(self, a: np.ndarray) -> np.ndarray:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        h, w = a.shape[:2]
        ow, oh, left, top = geometry(w, h, self.resize, self.size)
        x = F.resize(torch.from_numpy(a).permute(2, 0, 1), [oh, ow], InterpolationMode.BICUBIC, antialias=True)
        return x[:, top:top + self.size, left:left + self.size].permute(1, 2, 0).numpy()

    def pillow_torch_bicubic(self, data):
        return self._torch_resize(np.asarray(load_rgb(io.BytesIO(data), min_size=self.resize)))

    def simplejpeg_torch_bicubic(self, data):
        return self._torch_resize(self._simplejpeg(data))

    def simplejpeg_pillow_box(self, data):
        a = self._simplejpeg(data)
        im = Image.fromarray(a)
        w, h = im.size
        ow, oh, left, top = geometry(w, h, self.resize, self.size)
        sx, sy = w / ow, h / oh
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        return np.asarray(im.resize((self.size, self.size), Image.BICUBIC, box=box))

    def _vips_crop(self, im) -> np.ndarray:
        ow, oh, left, top = geometry(im.width, im.height, self.resize, self.size)
        a = np.ndarray(buffer=im.write_to_memory(), dtype=np.uint8, shape=(im.height, im.width, im.bands))
        return a[top:top + self.size, left:left + self.size, :3]

    def pyvips_thumbnail(self, data):
        import pyvips

        header = pyvips.Image.new_from_buffer(data, "", access="sequential")
        w, h = header.width, header.height
        big = 10 ** 6
        im = pyvips.Image.thumbnail_buffer(data, self.resize if w <= h else big,
                                           height=big if w <= h else self.resize, size="down")
        return self._vips_crop(im)

    def pyvips_cubic(self, data):
        import pyvips

        header = pyvips.Image.new_from_buffer(data, "", access="sequential")
        w, h = header.width, header.height
        k = draft_scale(w, h, self.resize)
        im = pyvips.Image.new_from_buffer(data, "", shrink=k, access="sequential")
        ow, oh, _, _ = geometry(w, h, self.resize, self.size)
        im = im.resize(ow / im.width, vscale=oh / im.height, kernel="cubic")
        return self._vips_crop(im)


CANDIDATES = ["pillow_box", "pillow_box_gap2", "pillow_box_gap3", "pillow_torch_bicubic", "cv2_area", "cv2_cubic",
              "simplejpeg_area", "simplejpeg_cubic", "simplejpeg_pillow_box", "simplejpeg_torch_bicubic",
              "pyvips_thumbnail", "pyvips_cubic"]


def per_pin_ms(fn, datas: list[bytes], passes: int = 3) -> float:
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for d in datas:
            fn(d)
        times.append((time.perf_counter() - t0) / len(datas) * 1e3)
    return float(np.median(times))


def features(runner, crops: list[np.ndarray], batch: int = 64) -> np.ndarray:
    out = []
    for lo in range(0, len(crops), batch):
        x = torch.from_numpy(np.stack(crops[lo:lo + batch])).permute(0, 3, 1, 2).contiguous()
        out.append(np.asarray(runner(x), dtype=np.float32))
    return np.concatenate(out)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def fashion_pins(idx: Path, root: Path, n: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """``n`` Fashion-MNIST training photos as 736 x 1100 JPEG pins (kept in ``root``); labels and boards of 20."""
    from pinterest_cls.finetuning.sources import read_idx

    labels = read_idx(idx / "train-labels-idx1-ubyte.gz")[:n]
    root.mkdir(parents=True, exist_ok=True)
    datas = []
    images = None
    for i in range(n):
        f = root / f"{i:05d}.jpg"
        if not f.is_file():
            if images is None:
                images = read_idx(idx / "train-images-idx3-ubyte.gz")[:n]
            buf = io.BytesIO()
            Image.fromarray(images[i], "L").resize((736, 1100), Image.BICUBIC).convert("RGB").save(buf, "JPEG",
                                                                                                 quality=90)
            f.write_bytes(buf.getvalue())
        datas.append(f.read_bytes())
    # boards of 20 photos of one class each, in the order the photos come
    boards = np.zeros(n, dtype=int)
    for c in np.unique(labels):
        idxs = np.flatnonzero(labels == c)
        boards[idxs] = int(c) * 10000 + np.arange(len(idxs)) // 20
    return datas, labels, boards


def board_accuracy(X: np.ndarray, y: np.ndarray, boards: np.ndarray, test: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    model = LogisticRegression(C=10.0, max_iter=3000).fit(normalize(X[~test]), y[~test])
    return float((model.predict(normalize(X[test])) == y[test]).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300, help="generated 736 x 1100 pins timed")
    ap.add_argument("--fashion", type=int, default=2000, help="Fashion-MNIST pins for the features (0: none)")
    ap.add_argument("--idx", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--dir", default="/tmp/data_path_bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = Path(args.dir)
    export = synthetic_export(base / f"export{args.n}", args.n, (736, 1100), pins_per_board=50)
    datas = [p.read_bytes() for p in sorted(export.rglob(IMAGE_NAME))][:args.n]
    backbone = build_backbone("efficientnet_lite0")
    paths = Paths(backbone)
    names = ["today", *CANDIDATES]
    out = {"n": len(datas), "size": [736, 1100], "cpu": os.uname().machine, "ms": {}, "pixels": {}, "features": {}}
    for name in names:
        out["ms"][name] = per_pin_ms(getattr(paths, name), datas)
        print(f"{name}: {out['ms'][name]:.2f} core-ms per pin", flush=True)
    crops = {name: [getattr(paths, name)(d) for d in datas] for name in names}
    for name in CANDIDATES:
        diff = np.abs(np.stack(crops[name]).astype(int) - np.stack(crops["today"]).astype(int))
        out["pixels"][name] = {"mean_abs": float(diff.mean()), "max_abs": int(diff.max())}
    torch.set_num_threads(os.cpu_count() or 1)
    runner = make_runner(backbone, torch.device("cpu"), None)
    feats = {name: features(runner, crops[name]) for name in names}
    for name in CANDIDATES:
        c = cosine(feats[name], feats["today"])
        out["features"][name] = {"generated_cos_mean": float(c.mean()), "generated_cos_min": float(c.min())}
    if args.fashion:
        from pinterest_cls.learn.metrics import bootstrap_ci

        fdatas, y, boards = fashion_pins(Path(args.idx), base / "fashion", args.fashion)
        rng = np.random.default_rng(0)
        ub = np.unique(boards)
        test = np.isin(boards, rng.choice(ub, max(1, len(ub) // 5), replace=False))
        ffeats = {name: features(runner, [getattr(paths, name)(d) for d in fdatas]) for name in names}
        base_acc = board_accuracy(ffeats["today"], y, boards, test)
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import normalize

        pred = LogisticRegression(C=10.0, max_iter=3000).fit(normalize(ffeats["today"][~test]), y[~test]).predict(
            normalize(ffeats["today"][test]))
        ci = bootstrap_ci(y[test], pred, boards[test], n_boot=1000, seed=0)["accuracy"]
        out["fashion"] = {"n": args.fashion, "test_pins": int(test.sum()), "test_boards": int(len(np.unique(
            boards[test]))), "today_accuracy": base_acc, "today_ci": ci, "accuracy": {}}
        for name in CANDIDATES:
            c = cosine(ffeats[name], ffeats["today"])
            out["features"][name].update(fashion_cos_mean=float(c.mean()), fashion_cos_min=float(c.min()))
            out["fashion"]["accuracy"][name] = board_accuracy(ffeats[name], y, boards, test)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "data_path.json").write_text(json.dumps(out, indent=2))
    report(out)


def report(out: dict) -> None:
    today = out["ms"]["today"]
    fash = out.get("fashion")
    print(f"\n{out['n']} generated 736x1100 JPEGs, one core; features: efficientnet_lite0 (real weights, fp32)")
    print("\n| path | core-ms per pin | of today's | pixels: mean / max abs diff | row cosine to today's: "
          "generated mean (min) | Fashion-MNIST mean (min) | logreg accuracy |")
    print("|---|---|---|---|---|---|---|")
    acc = f"{fash['today_accuracy']:.4f} [{fash['today_ci'][0]:.4f}, {fash['today_ci'][1]:.4f}]" if fash else "-"
    print(f"| today (Pillow draft + torchvision bicubic) | {today:.2f} | 1.00 | - | - | - | {acc} |")
    for name in CANDIDATES:
        p, f = out["pixels"][name], out["features"][name]
        fc = f"{f['fashion_cos_mean']:.5f} ({f['fashion_cos_min']:.4f})" if "fashion_cos_mean" in f else "-"
        a = f"{fash['accuracy'][name]:.4f}" if fash else "-"
        print(f"| {name} | {out['ms'][name]:.2f} | {out['ms'][name] / today:.2f} | {p['mean_abs']:.2f} / "
              f"{p['max_abs']} | {f['generated_cos_mean']:.5f} ({f['generated_cos_min']:.4f}) | {fc} | {a} |")


if __name__ == "__main__":
    main()
