"""Where finetune's images come from: IDX files, .npz arrays or a scanned export (``data.kind`` -> ``SOURCES``)."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pinterest_cls.core import config
from pinterest_cls.core.errors import UserError
from pinterest_cls.data.manifest import ok_rows


@dataclass
class Source:
    """Images as uint8 arrays (N, H, W, C) or file paths, with targets, and the data's own test part if any."""

    images: np.ndarray | list[str]
    targets: np.ndarray  # int class indices, or float values for regression
    classes: list[str] | None
    test_images: np.ndarray | list[str] | None = None
    test_targets: np.ndarray | None = None
    pins: pd.DataFrame | None = None  # an export's ok pins (user, board, pin, category, path, digest), images' order


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): ubyte images (N, H, W) or labels (N,)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 4:
            raise ValueError(f"bad IDX header (magic {data[:4].hex()}; expected unsigned bytes)")
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if body.size != int(np.prod(shape)):
            raise ValueError(f"holds {body.size} values, its header says {int(np.prod(shape))}")
        return body.reshape(shape)
    except FileNotFoundError:
        raise UserError(f"IDX file {path} not found (data.root={path.parent}); for Fashion-MNIST run "
                        "`apt-get install dataset-fashion-mnist`, or point data.root at the *-ubyte.gz files") from None
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise UserError(f"IDX file {path} cannot be read: {exc}") from None


def write_idx_export(dcfg: DictConfig, out: Path, limits: dict[str, int] | None = None) -> Path:
    """The IDX data that ``dcfg`` (``conf/data/fashion_mnist.yaml``) describes, written as an export that scan,
    extract and train read with ``data.layout=csv``: ``images/<split>/<i>.png`` and ``<data.name>.csv`` with
    columns path, label (the class name) and split (train | test, the data's own split). ``limits``: the first
    N images of a split (``{"train": 3000, "test": 1000}``). Existing PNGs are kept."""
    from PIL import Image

    root, rows = Path(str(dcfg.root)).expanduser(), []
    parts = (("train", dcfg.train_images, dcfg.train_labels), ("test", dcfg.test_images, dcfg.test_labels))
    for split, images_file, labels_file in parts:
        n = (limits or {}).get(split)
        images, labels = read_idx(root / images_file)[:n], read_idx(root / labels_file)[:n]
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for i, (im, y) in enumerate(zip(images, labels)):
            name = f"images/{split}/{i:05d}.png"
            if not (out / name).exists():
                Image.fromarray(im, "L").save(out / name)
            rows.append((name, str(dcfg.classes[int(y)]), split))
    table = out / f"{dcfg.name}.csv"
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(table, index=False)
    return table


def load_idx(dcfg) -> Source:
    root = Path(str(dcfg.root)).expanduser()
    x = read_idx(root / dcfg.train_images)
    y = read_idx(root / dcfg.train_labels)
    xt = read_idx(root / dcfg.test_images)
    yt = read_idx(root / dcfg.test_labels)
    for imgs, labels, name in ((x, y, dcfg.train_labels), (xt, yt, dcfg.test_labels)):
        if len(imgs) != len(labels):
            raise UserError(f"{root / name} has {len(labels)} labels for {len(imgs)} images")
    classes = list(dcfg.classes) if dcfg.get("classes") else [str(i) for i in range(int(max(y.max(), yt.max())) + 1)]
    return Source(x[..., None], y.astype(np.int64), classes, xt[..., None], yt.astype(np.int64))


def _npz_targets(z, key_labels, key_targets, file, task):
    if task == "regression":
        if key_targets not in z:
            raise UserError(f"{file} has no array '{key_targets}' (data.targets_key) with regression targets; "
                            f"it has: {', '.join(z.files)}")
        return np.asarray(z[key_targets], dtype=np.float32), None
    if key_labels not in z:
        raise UserError(f"{file} has no array '{key_labels}' (data.labels_key) with labels; it has: "
                        f"{', '.join(z.files)}")
    classes, idx = np.unique(np.asarray(z[key_labels]), return_inverse=True)
    return idx.astype(np.int64), [str(c) for c in classes]


def load_npz(dcfg, task: str) -> Source:
    file = Path(str(dcfg.root)).expanduser()
    if not file.is_file():
        raise UserError(f"data.root={file} is not a .npz file")
    try:
        z = np.load(file, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"{file} cannot be read as .npz: {exc}") from None
    if dcfg.images_key not in z:
        raise UserError(f"{file} has no array '{dcfg.images_key}' (data.images_key); it has: {', '.join(z.files)}")
    images = np.asarray(z[dcfg.images_key])
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise UserError(f"{file}: '{dcfg.images_key}' must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    if images.dtype != np.uint8:  # floats in [0, 1] (or any range): scaled to bytes per array
        lo, hi = float(images.min()), float(images.max())
        images = np.round((images - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
    targets, classes = _npz_targets(z, dcfg.labels_key, dcfg.targets_key, file, task)
    if len(targets) != len(images):
        raise UserError(f"{file}: {len(targets)} labels/targets for {len(images)} images")
    return Source(images, targets, classes)


def load_manifest_source(cfg: DictConfig) -> Source:
    _, ok = ok_rows(cfg)
    classes, idx = np.unique(ok["category"].astype(str).to_numpy(), return_inverse=True)
    return Source(ok["path"].tolist(), idx.astype(np.int64), [str(c) for c in classes], pins=ok)


#: ``data.kind`` -> the loader of that data source.
SOURCES = {
    "export": load_manifest_source,  # a scanned export: the manifest's ok pins
    "idx": lambda cfg: load_idx(cfg.data),
    "npz": lambda cfg: load_npz(cfg.data, str(cfg.task)),
}


def load_source(cfg: DictConfig) -> Source:
    kind = str(config.select(cfg, "data.kind"))
    task = str(cfg.task)
    if kind not in SOURCES:
        raise UserError(f"data.kind={kind!r} must be export (a scanned export), idx or npz")
    src = SOURCES[kind](cfg)
    if task == "regression" and src.classes is not None and kind != "npz":
        raise UserError(f"task=regression needs numeric targets (data=npz with data.targets_key); data.kind={kind} "
                        "has class labels")
    return src
