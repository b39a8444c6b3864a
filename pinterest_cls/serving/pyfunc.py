"""The served model: a train run's classifier with the backbone that made its features, as one MLflow pyfunc model
(``pipeline``) built from code (``PYFUNC_CODE``), so that ``mlflow models serve`` classifies images."""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from pinterest_cls.data.store import StoreMeta
from pinterest_cls.serving.end_to_end import EndToEnd
from pinterest_cls.serving.model_io import PIPELINE, load_classifier, skops_bytes

#: The file (models from code) that MLflow runs to build the served model.
PYFUNC_CODE = Path(__file__).with_name("served_model.py")


class PinterestPyfuncModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame with column ``path`` (image paths) or ``image`` (bytes, or base64 text) ->
    DataFrame(prediction, score, top-k categories and scores, status, reason)."""

    def load_context(self, context):
        classifier = load_classifier(context.artifacts["classifier"])
        meta = json.loads(Path(context.artifacts["embeddings_meta"]).read_text())
        self.model = EndToEnd(classifier, StoreMeta.from_dict(meta, "embeddings_meta.json"))

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
    runtime = StoreMeta.from_dict(json.loads(Path(store_meta_path).read_text())).extract.runtime
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
