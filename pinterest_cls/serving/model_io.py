"""A train run's models in and out of MLflow: the classifier saved in skops' format (no pickle, only trusted types
load), and a run's classifier and store metadata loaded back for ``predict``."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pinterest_cls.core.errors import UserError
from pinterest_cls.data.metadata import StoreMeta, fingerprint_digest
from pinterest_cls.embed.quantization import INT8_DIR, int8_model
from pinterest_cls.learn.board_rules import BOARDS_FILE
from pinterest_cls.track.tracking import use_store

#: The end-to-end pyfunc model's name in a train run.
PIPELINE = "pipeline"
#: The store's meta.json, logged with each train run: what rebuilds the backbone that made its features.
EMBEDDINGS_META = "embeddings_meta.json"
#: The store's int8 model (``embed.quantization``), logged with a train run on a store of extract.amp=int8.
EMBEDDINGS_INT8 = "embeddings_int8"


def load_run(tracking_uri: str, run_id: str) -> tuple[object, StoreMeta, Path | None]:
    """(the fitted scikit-learn pipeline, the meta of the store it was trained on, the folder of that store's int8
    model or None) of a train run in the MLflow store ``tracking_uri``, with one-line errors."""
    from mlflow.exceptions import MlflowException

    mlflow = use_store(tracking_uri)
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"run_id={run_id} is not a run in the MLflow store {tracking_uri}; python -m "
                        "pinterest_cls.report prints the run behind each cell (and writes them to runs.csv), and "
                        "`mlflow ui` lists every run") from None
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
        raise UserError(f"run {run_id} has no {EMBEDDINGS_META}; re-run its train job") from None
    meta = StoreMeta.from_dict(meta, f"{EMBEDDINGS_META} of run {run_id}")
    int8_dir = None
    if meta.extract.amp == "int8":
        try:
            int8_dir = Path(client.download_artifacts(run_id, EMBEDDINGS_INT8, tempfile.mkdtemp()))
        except Exception:
            raise UserError(f"run {run_id} was trained on int8 embeddings but has no {EMBEDDINGS_INT8} (the int8 "
                            "model); re-run its train job") from None
    return model, meta, int8_dir


def load_boards(tracking_uri: str, run_id: str) -> dict | None:
    """The board record (``boards.json``: the board rules' metrics and the abstention threshold) of a train run;
    None where the run has none (data without boards, or a run made before boards were evaluated). A record that
    is there but cannot be read is a one-line error, not taken for a missing one."""
    mlflow = use_store(tracking_uri)
    client = mlflow.MlflowClient()
    if BOARDS_FILE not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    bad = f"{BOARDS_FILE} of run {run_id} is not a board record"
    try:
        record = json.loads(Path(client.download_artifacts(run_id, BOARDS_FILE, tempfile.mkdtemp())).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{bad} ({str(exc).splitlines()[0][:200]}); re-run its train job") from None
    abstention = record.get("abstention") if isinstance(record, dict) else None
    try:
        if not isinstance(record, dict) or not (abstention is None or np.isfinite(float(abstention["abstain_below"]))) \
                or not float(record.get("temperature", 1.0)) > 0:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{bad} (abstention.abstain_below a number, temperature a positive number); re-run its "
                        "train job") from None
    return record


#: The classes of this package that a saved classifier may hold, trusted when skops loads it (beside what skops
#: trusts by default); scikit-learn's tree structure, which skops does not trust by default, for random forests.
TRUSTED_TYPES = ["pinterest_cls.learn.estimators.FaissKNN", "pinterest_cls.learn.estimators.TorchMLP",
                 "sklearn.tree._tree.Tree"]


def skops_bytes(classifier) -> bytes:
    """The fitted classifier in skops' format (no arbitrary code runs when it is loaded), refusing a type
    outside ``TRUSTED_TYPES`` that skops would not load."""
    import skops.io

    data = skops.io.dumps(classifier)
    untrusted = sorted(set(skops.io.get_untrusted_types(data=data)) - set(TRUSTED_TYPES))
    if untrusted:
        raise TypeError(f"the classifier holds types that skops does not trust: {', '.join(untrusted)}; "
                        "add them to pinterest_cls.serving.model_io.TRUSTED_TYPES if they are safe")
    return data


def load_classifier(path: str | Path):
    import skops.io

    return skops.io.load(path, trusted=TRUSTED_TYPES)


def log_model(model) -> None:
    """The fitted pipeline via mlflow.sklearn in skops' format (loads back with mlflow.sklearn.load_model,
    trusting only ``TRUSTED_TYPES``)."""
    import mlflow.sklearn
    import sklearn

    skops_bytes(model)  # refuses a type that loading would not trust
    reqs = [f"scikit-learn=={sklearn.__version__}", f"numpy=={np.__version__}", "skops", "faiss-cpu", "torch"]
    mlflow.sklearn.log_model(model, name="model", pip_requirements=reqs,
                             serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
                             skops_trusted_types=TRUSTED_TYPES)


def copy_int8_model(store, dest: Path) -> list[Path]:
    """The store's int8 model (``embed.quantization``), checked, copied into ``dest`` for a train run to log:
    the files copied, none when the store's embeddings are not int8."""
    if store.meta.extract.amp != "int8":
        return []
    xml = int8_model(store.folder / INT8_DIR, fingerprint_digest(store.meta.fingerprint), str(store.folder))
    dest.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(f, dest / f.name)) for f in sorted(xml.parent.iterdir()) if f.is_file()]
