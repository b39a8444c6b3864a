"""End to end: image files -> the backbone that made a store's features -> a train run's classifier ->
categories with scores, one row per image, a failed image failing only its own row."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from pinterest_cls.core.errors import UserError
from pinterest_cls.data.layouts import IMAGE_EXTENSIONS
from pinterest_cls.data.metadata import StoreMeta
from pinterest_cls.embed.embedder import Embedder, backbone_from_meta
from pinterest_cls.learn.estimators import class_scores
from pinterest_cls.serving.model_io import load_run


class EndToEnd:
    """Image paths -> predictions, with a fitted classifier pipeline and the meta of the store it was
    trained on (``load_pipeline`` loads both from a train run).

    >>> model = load_pipeline("<run id>", "sqlite:///work/mlflow.db")
    >>> model.predict_paths(["a.jpg"])[["prediction", "score", "status"]]
    """

    def __init__(self, classifier, store_meta: StoreMeta, top_k: int = 3, batch_size: int = 32,
                 workers: int | None = 0, device: str = "auto", max_pixels: int | None = None,
                 int8_dir: Path | None = None):
        self.classifier = classifier
        self.meta = store_meta
        self.top_k = top_k
        self.batch_size = batch_size
        self.workers = workers
        self.device = device
        self.backbone = backbone_from_meta(store_meta)
        # built once, its runtime compiled once; ``max_pixels``: a lower pixel limit than the store's (a server's);
        # ``int8_dir``: the store's int8 model, for embeddings of extract.amp=int8 (``model_io.load_run``)
        self.embedder = Embedder.for_store(self.backbone, store_meta, device, max_pixels=max_pixels,
                                           int8_dir=int8_dir)

    @property
    def columns(self) -> list[str]:
        """The columns of :meth:`predict_paths`'s answer, ``path`` aside."""
        k = min(self.top_k, len(self.classifier.classes_))
        return ["prediction", "score", *(f"top{i}_{c}" for i in range(1, k + 1) for c in ("category", "score")),
                "status", "reason"]

    def class_scores_of(self, paths: list[str], progress: bool = False) -> tuple[np.ndarray | None, list[str]]:
        """(each image's class scores, columns in the order of ``classifier.classes_``, NaN where the image
        failed; None where the classifier has no scores), and each image's failure reason ("" where none)."""
        feats, reasons = self.embedder(paths, batch_size=self.batch_size, workers=self.workers, progress=progress)
        ok = np.array([not r for r in reasons], dtype=bool)
        out = np.full((len(paths), len(self.classifier.classes_)), np.nan)
        if ok.any():
            scores = class_scores(self.classifier, feats[ok])
            if scores is None:
                return None, reasons
            out[ok] = scores
        return out, reasons

    def predict_paths(self, paths: list[str], progress: bool = False) -> pd.DataFrame:
        feats, reasons = self.embedder(paths, batch_size=self.batch_size, workers=self.workers, progress=progress)
        ok = np.array([not r for r in reasons], dtype=bool)
        frame = pd.DataFrame({"path": list(map(str, paths)), "prediction": None, "score": np.nan})
        classes = np.asarray(self.classifier.classes_)
        k = min(self.top_k, len(classes))
        for i in range(1, k + 1):
            frame[f"top{i}_category"], frame[f"top{i}_score"] = None, np.nan
        if ok.any():
            X = feats[ok]
            pred = self.classifier.predict(X)
            scores = class_scores(self.classifier, X)
            frame.loc[ok, "prediction"] = pred
            if scores is not None:
                order = np.argsort(-scores, axis=1)[:, :k]
                top = scores[np.arange(len(scores))[:, None], order]
                frame.loc[ok, "score"] = top[:, 0]
                for i in range(k):
                    frame.loc[ok, f"top{i + 1}_category"] = classes[order[:, i]]
                    frame.loc[ok, f"top{i + 1}_score"] = top[:, i]
        frame["status"] = np.where(ok, "ok", "failed")
        frame["reason"] = reasons
        return frame


def store_board_scores(classifier, store) -> tuple[pd.DataFrame, np.ndarray]:
    """(the pins of a store: user, board, pin, path; the classifier's class scores of each, NaN where the pin
    failed to embed) for labelling its boards."""
    pins = store.pins[["user", "board", "pin", "path"]].reset_index(drop=True)
    ok = store.pins["embedded"].to_numpy(dtype=bool)
    probs = np.full((len(pins), len(classifier.classes_)), np.nan)
    if ok.any():
        scores = class_scores(classifier, np.asarray(store.vectors[ok], dtype=np.float32))
        if scores is None:
            raise UserError(f"{type(classifier[-1]).__name__} gives no class scores to label boards with")
        probs[ok] = scores
    return pins, probs


def folder_board_scores(model: EndToEnd, folder: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """(the images of ``folder``, found recursively, as the pins of one board named after it; their class scores
    by ``model``, NaN where an image failed)."""
    paths = collect_inputs(str(folder))
    if not paths:
        raise UserError(f"inputs={folder} holds no images")
    probs, _ = model.class_scores_of(paths, progress=True)
    if probs is None:
        raise UserError(f"{type(model.classifier[-1]).__name__} gives no class scores to label boards with")
    pins = pd.DataFrame({"user": "", "board": Path(folder).resolve().name, "path": paths,
                         "pin": [str(Path(x).relative_to(folder)) for x in paths]})
    return pins, probs


def collect_inputs(spec: str, image_name: str = "pin_closeup_image.jpg") -> list[str]:
    """Paths from a folder (images found recursively; a Pinterest export's pins), a text file listing paths
    (one per line, relative to the file's folder), or a single image."""
    p = Path(os.path.expanduser(spec))
    if not p.exists():
        raise UserError(f"inputs={spec} does not exist; give a folder, a .txt list of paths, or an image")
    if p.is_file() and p.suffix.lower() in (".txt", ".lst"):
        lines = [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
        return [str(Path(x) if Path(x).is_absolute() else p.parent / x) for x in lines]
    if p.is_file():
        return [str(p)]
    if any((d / "per_board").is_dir() for d in p.iterdir() if d.is_dir()):
        return sorted(str(f) for f in p.glob(f"*/per_board/*/*/{image_name}"))
    return sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in f.relative_to(p).parts))


def load_pipeline(run_id: str, tracking_uri: str = "sqlite:///work/mlflow.db", **settings) -> EndToEnd:
    """The end-to-end model of the train run ``run_id`` in the MLflow store ``tracking_uri`` (``settings``: those
    of ``EndToEnd``: ``top_k``, ``batch_size``, ``workers``, ``device``)."""
    classifier, meta, int8_dir = load_run(tracking_uri, run_id)
    return EndToEnd(classifier, meta, int8_dir=int8_dir, **settings)
