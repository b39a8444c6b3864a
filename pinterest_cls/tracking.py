"""MLflow helpers: one store per work folder, one experiment per dataset, artifacts beside the database."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import config


def _prepare_uri(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    return uri


def experiment_id(cfg: DictConfig) -> str:
    """Point MLflow at ``mlflow.tracking_uri`` and return the id of experiment ``mlflow.experiment``
    (created with its artifacts under ``mlflow.artifact_root`` when new)."""
    import mlflow

    mlflow.set_tracking_uri(_prepare_uri(str(config.select(cfg, "mlflow.tracking_uri"))))
    name = str(config.select(cfg, "mlflow.experiment"))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = Path(os.path.expanduser(str(config.select(cfg, "mlflow.artifact_root")))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        return client.create_experiment(name, artifact_location=(root / name).as_uri())
    except Exception:  # created meanwhile by a parallel job
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def mlflow_run(cfg: DictConfig, run_name: str, tags: dict | None = None):
    """An MLflow run for this job, or ``None`` when ``mlflow.enabled=false``. The resolved config is logged."""
    if not bool(OmegaConf.select(cfg, "mlflow.enabled", default=True)):
        yield None
        return
    import mlflow

    exp = experiment_id(cfg)
    with mlflow.start_run(experiment_id=exp, run_name=run_name, tags=tags or {}) as run:
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        yield run
