"""MLflow helpers: one store per work folder, one experiment per dataset, artifacts beside the database.

Parallel jobs (Hydra's joblib or SLURM launchers) may share one SQLite store. SQLite allows one writer at a
time and MLflow's first connection creates and migrates the schema, both of which fail under concurrency
("database is locked", "table ... already exists"). Every write of this package to a ``sqlite:///`` store
therefore holds an exclusive lock on ``<database>.lock`` beside it: the store's creation, the experiment's
creation, and each run, which is only opened once its job's work is done (runs log at the end), so jobs wait
on each other for seconds, not for their computation. An ``http(s)://`` tracking server needs no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import config

_held = threading.local()


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).expanduser().resolve()
    return None


def _prepare_uri(uri: str) -> str:
    path = _sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return uri


def is_local(uri: str) -> bool:
    """Whether the tracking store is a database or folder on this machine (not a tracking server)."""
    return not uri.startswith(("http://", "https://", "databricks"))


@contextlib.contextmanager
def store_lock(uri: str):
    """Exclusive, inter-process lock on a ``sqlite:///`` tracking store (re-entrant within a process);
    a no-op for other stores."""
    path = _sqlite_path(uri)
    if path is None or getattr(_held, "depth", 0):
        _held.depth = getattr(_held, "depth", 0) + 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0
            fcntl.flock(f, fcntl.LOCK_UN)


def tracking_uri(cfg: DictConfig) -> str:
    return str(config.select(cfg, "mlflow.tracking_uri"))


def experiment_id(cfg: DictConfig) -> str:
    """Point MLflow at ``mlflow.tracking_uri`` and return the id of experiment ``mlflow.experiment``
    (created when new: for a local store with its artifacts under ``mlflow.artifact_root``; on a tracking
    server wherever the server keeps artifacts)."""
    import mlflow

    uri = tracking_uri(cfg)
    with store_lock(uri):
        mlflow.set_tracking_uri(_prepare_uri(uri))
        name = str(config.select(cfg, "mlflow.experiment"))
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if is_local(uri):
            root = Path(os.path.expanduser(str(config.select(cfg, "mlflow.artifact_root")))).resolve()
            root.mkdir(parents=True, exist_ok=True)
            location = (root / name).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by a parallel job (on a server; a local store is locked)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


@contextlib.contextmanager
def mlflow_run(cfg: DictConfig, run_name: str, tags: dict | None = None):
    """An MLflow run for this job, or ``None`` when ``mlflow.enabled=false``. The resolved config is logged.
    Open it when the job's results are ready: on a SQLite store it holds the store's lock while open."""
    if not bool(config.select(cfg, "mlflow.enabled")):
        yield None
        return
    import mlflow

    with store_lock(tracking_uri(cfg)):
        exp = experiment_id(cfg)
        with mlflow.start_run(experiment_id=exp, run_name=run_name, tags=tags or {}) as run:
            mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            yield run
