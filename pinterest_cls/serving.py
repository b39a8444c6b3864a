"""Serving: a trained classifier with the backbone that made its features, as one MLflow pyfunc model that
takes image paths; loading train runs back for predict."""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from .catalog import IMAGE_EXTENSIONS
from .embedding import Embedder, backbone_from_meta
from .errors import UserError
from .estimators import class_scores
from .tracking import _prepare_uri

PIPELINE = "pipeline"  # the pyfunc model's name in a train run
EMBEDDINGS_META = "embeddings_meta.json"  # the store's meta.json, logged with each train run


class EndToEnd:
    """Image paths -> predictions, with a fitted classifier pipeline and the meta of the store it was
    trained on."""

    def __init__(self, classifier, store_meta: dict, top_k: int = 3, batch_size: int = 32,
                 workers: int | None = 0, device: str = "auto"):
        self.classifier = classifier
        self.meta = store_meta
        self.top_k = top_k
        self.batch_size = batch_size
        self.workers = workers
        self.device = device
        self.backbone = backbone_from_meta(store_meta)
        self.embedder = Embedder.for_store(self.backbone, store_meta, device)  # its runtime compiled once

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


def _client(cfg: DictConfig):
    import mlflow

    mlflow.set_tracking_uri(_prepare_uri(str(cfg.mlflow.tracking_uri)))
    return mlflow.MlflowClient()


def load_run(cfg: DictConfig, run_id: str):
    """(sklearn pipeline, store meta) of a train run, with clear errors."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"run_id={run_id} is not a run in the MLflow store {cfg.mlflow.tracking_uri}; "
                        "see `mlflow ui` or python -m pinterest_cls.report for run ids") from None
    if run.data.tags.get("verb") != "train":
        raise UserError(f"run {run_id} is not a train run (verb={run.data.tags.get('verb')}) and has no classifier")
    try:
        model = mlflow.sklearn.load_model(f"runs:/{run_id}/model")
    except Exception as exc:
        raise UserError(f"run {run_id} has no loadable model ({str(exc).splitlines()[0][:200]}); "
                        "re-run its train job") from None
    try:
        meta = json.loads(Path(client.download_artifacts(run_id, EMBEDDINGS_META, tempfile.mkdtemp())).read_text())
    except Exception:
        raise UserError(f"run {run_id} has no {EMBEDDINGS_META}: it was logged before predict existed; "
                        "re-run its train job") from None
    return model, meta


#: The classes of this package that a saved classifier may hold, trusted when skops loads it (beside what skops
#: trusts by default); scikit-learn's tree structure, which skops does not trust by default, for random forests.
TRUSTED_TYPES = ["pinterest_cls.estimators.FaissKNN", "pinterest_cls.estimators.TorchMLP", "sklearn.tree._tree.Tree"]
#: The file (models from code) that MLflow runs to build the served model.
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def skops_bytes(classifier) -> bytes:
    """The fitted classifier in skops' format (no arbitrary code runs when it is loaded), refusing a type
    outside :data:`TRUSTED_TYPES` that skops would not load."""
    import skops.io

    data = skops.io.dumps(classifier)
    untrusted = sorted(set(skops.io.get_untrusted_types(data=data)) - set(TRUSTED_TYPES))
    if untrusted:
        raise TypeError(f"the classifier holds types that skops does not trust: {', '.join(untrusted)}; "
                        "add them to serving.TRUSTED_TYPES if they are safe")
    return data


def load_classifier(path: str | Path):
    import skops.io

    return skops.io.load(path, trusted=TRUSTED_TYPES)


class PinterestPyfuncModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame with column ``path`` (image paths) or ``image`` (bytes, or base64 text) ->
    DataFrame(prediction, score, top-k categories and scores, status, reason)."""

    def load_context(self, context):
        classifier = load_classifier(context.artifacts["classifier"])
        meta = json.loads(Path(context.artifacts["embeddings_meta"]).read_text())
        self.model = EndToEnd(classifier, meta)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        if "path" in frame.columns:
            return self.model.predict_paths(frame["path"].astype(str).tolist()).drop(columns=["path"])
        if "image" not in frame.columns:
            raise ValueError("input needs a column 'path' (image paths) or 'image' (bytes or base64 text)")
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, value in enumerate(frame["image"]):
                data = value if isinstance(value, (bytes, bytearray)) else base64.b64decode(str(value))
                p = os.path.join(tmp, f"{i:06d}")
                with open(p, "wb") as f:
                    f.write(data)
                paths.append(p)
            return self.model.predict_paths(paths).drop(columns=["path"])


def log_pipeline(classifier, store_meta_path: Path, workdir: Path, example_image: str) -> None:
    """Log the end-to-end pyfunc model into the active MLflow run. MLflow checks it at once by serving
    ``example_image`` (a pin of the training data, sent as base64 bytes) through it."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    # the served model embeds with the runtime that made the training embeddings
    runtime = json.loads(Path(store_meta_path).read_text()).get("extract", {}).get("runtime", "torch")
    clf_path = workdir / "classifier.skops"
    clf_path.write_bytes(skops_bytes(classifier))
    # the input the model takes, stated, so that MLflow checks requests against it (and infers nothing):
    # a column of image paths, or of base64-encoded image bytes
    signature = ModelSignature(inputs=Schema([ColSpec("string", "path", required=False),
                                              ColSpec("string", "image", required=False)]))
    example = pd.DataFrame({"image": [base64.b64encode(Path(example_image).read_bytes()).decode("ascii")]})
    mlflow.pyfunc.log_model(name=PIPELINE, python_model=str(PYFUNC_CODE), signature=signature, input_example=example,
                            artifacts={"classifier": str(clf_path), "embeddings_meta": str(store_meta_path)},
                            pip_requirements=["mlflow", "torch", "timm", "scikit-learn", "skops", "faiss-cpu",
                                              "pillow", *(["openvino"] if runtime == "openvino" else [])])


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


def log_model(model) -> None:
    """The fitted pipeline via mlflow.sklearn in skops' format (loads back with mlflow.sklearn.load_model,
    trusting only :data:`TRUSTED_TYPES`)."""
    import mlflow.sklearn
    import sklearn

    skops_bytes(model)  # refuses a type that loading would not trust
    reqs = [f"scikit-learn=={sklearn.__version__}", f"numpy=={np.__version__}", "skops", "faiss-cpu", "torch"]
    mlflow.sklearn.log_model(model, name="model", pip_requirements=reqs,
                             serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
                             skops_trusted_types=TRUSTED_TYPES)
