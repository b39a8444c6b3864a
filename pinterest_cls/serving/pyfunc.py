"""The served model: a train run's classifier with the backbone that made its features, as one MLflow pyfunc model
(``pipeline``) built from code (``PYFUNC_CODE``), so that ``mlflow models serve`` classifies images."""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from pinterest_cls.data.metadata import StoreMeta
from pinterest_cls.serving.end_to_end import EndToEnd
from pinterest_cls.serving.http_guard import RequestRefused, install_request_guard
from pinterest_cls.serving.limits import ServeLimits
from pinterest_cls.serving.model_io import EMBEDDINGS_INT8, PIPELINE, load_classifier, skops_bytes

#: The file (models from code) that MLflow runs to build the served model.
PYFUNC_CODE = Path(__file__).with_name("served_model.py")


class PinterestPyfuncModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame with the column ``image`` (base64 text, or bytes) or, where the server allows it,
    ``path`` (files inside ``PINTEREST_CLS_SERVE_ROOT``) -> one row per input row: prediction, score, top-k
    categories and scores, ``status`` (ok | failed) and ``reason``. A bad row fails alone; the values are strict
    JSON (null, never NaN). The server's limits: ``serving.limits``."""

    def load_context(self, context):
        classifier = load_classifier(context.artifacts["classifier"])
        meta = StoreMeta.from_dict(json.loads(Path(context.artifacts["embeddings_meta"]).read_text()),
                                   "embeddings_meta.json")
        self.limits = ServeLimits.from_environment(meta.extract.max_pixels)
        int8_dir = context.artifacts.get("embeddings_int8")  # a store of extract.amp=int8: its int8 model
        self.model = EndToEnd(classifier, meta, max_pixels=self.limits.max_pixels,
                              int8_dir=Path(int8_dir) if int8_dir else None)
        install_request_guard(self.limits)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        if not {"image", "path"} & set(frame.columns):
            raise RequestRefused(400, "the input needs the column image (base64 image bytes), or path where the "
                                      "server allows it")
        if len(frame) == 0:
            raise RequestRefused(400, "the request holds no rows")
        if len(frame) > self.limits.max_rows:
            raise RequestRefused(413, f"{len(frame)} rows, more than the {self.limits.max_rows} a request may hold "
                                      "(PINTEREST_CLS_SERVE_MAX_ROWS)")
        with tempfile.TemporaryDirectory() as tmp:
            inputs = [self._input(i, row, tmp) for i, row in enumerate(frame.to_dict("records"))]
            good = [p for p, _ in inputs if p is not None]
            found = self.model.predict_paths(good).drop(columns=["path"]) if good else None
            rows, k = [], 0
            for path, reason in inputs:
                if path is None:
                    rows.append({"status": "failed", "reason": reason})
                else:
                    row = found.iloc[k].to_dict()
                    row["reason"] = str(row["reason"]).replace(tmp, "<image>")
                    rows.append(row)
                    k += 1
        out = pd.DataFrame(rows, columns=self.model.columns)
        return out.astype(object).where(out.notna(), None)  # strict JSON: null, never NaN

    def _input(self, i: int, row: dict, tmp: str) -> tuple[str | None, str]:
        """(a file to embed, "") for one input row, or (None, why it fails)."""
        value = row.get("image")
        if value is not None and not (isinstance(value, float) and value != value):
            data, reason = decode_image(value, self.limits.max_image_bytes)
            if data is None:
                return None, reason
            path = os.path.join(tmp, f"{i:06d}")
            with open(path, "wb") as f:
                f.write(data)
            return path, ""
        given = row.get("path")
        if given is None or (isinstance(given, float) and given != given):
            return None, "no image given (column image, or path)"
        path, reason = self.limits.allowed_file(str(given))
        return (str(path), "") if path is not None else (None, reason)


def decode_image(value, max_bytes: int) -> tuple[bytes | None, str]:
    """(the image bytes of a request row's ``image`` value, "") or (None, why not): base64 text (bytes pass as
    they are), at most ``max_bytes`` once decoded."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        text = str(value).strip()
        if len(text) // 4 * 3 > max_bytes + 3:  # judged before decoding
            return None, f"image is larger than {max_bytes} bytes (PINTEREST_CLS_SERVE_MAX_IMAGE_BYTES)"
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return None, "image is not base64 text"
    if not data:
        return None, "image is empty"
    if len(data) > max_bytes:
        return None, f"image is larger than {max_bytes} bytes (PINTEREST_CLS_SERVE_MAX_IMAGE_BYTES)"
    return data, ""


def log_pipeline(classifier, store_meta_path: Path, workdir: Path, example_image: str) -> None:
    """Log the end-to-end pyfunc model into the active MLflow run. MLflow checks it at once by serving
    ``example_image`` (a pin of the training data, sent as base64 bytes) through it."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    # the served model embeds with the runtime that made the training embeddings
    extract = StoreMeta.from_dict(json.loads(Path(store_meta_path).read_text())).extract
    runtime = extract.runtime
    clf_path = workdir / "classifier.skops"
    clf_path.write_bytes(skops_bytes(classifier))
    # the input the model takes, stated, so that MLflow checks requests against it (and infers nothing):
    # a column of image paths, or of base64-encoded image bytes
    signature = ModelSignature(inputs=Schema([ColSpec("string", "path", required=False),
                                              ColSpec("string", "image", required=False)]))
    example = pd.DataFrame({"image": [base64.b64encode(Path(example_image).read_bytes()).decode("ascii")]})
    mlflow.pyfunc.log_model(name=PIPELINE, python_model=str(PYFUNC_CODE), signature=signature, input_example=example,
                            artifacts={"classifier": str(clf_path), "embeddings_meta": str(store_meta_path),
                                       # the store's int8 model (train copied it beside the meta)
                                       **({"embeddings_int8": str(Path(store_meta_path).parent / EMBEDDINGS_INT8)}
                                          if extract.amp == "int8" else {})},
                            pip_requirements=["mlflow", "torch", "timm", "scikit-learn", "skops", "faiss-cpu",
                                              "pillow", *(["openvino"] if runtime == "openvino" else [])])
