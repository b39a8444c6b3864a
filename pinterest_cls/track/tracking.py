"""MLflow helpers: one store per work folder, one experiment per dataset, artifacts beside the database.

Parallel jobs (Hydra's joblib or SLURM launchers) may share one SQLite store. SQLite allows one writer at a
time and MLflow's first connection creates and migrates the schema, both of which fail under concurrency
("database is locked", "table ... already exists"). Every write of this package to a ``sqlite:///`` store
therefore holds an exclusive lock on ``<database>.lock`` beside it: the store's creation, the experiment's
creation, the run's creation, and the logging at its end, so jobs wait on each other for seconds, not for their
computation. An ``http(s)://`` tracking server needs no lock.

A job's run is opened before its work (``mlflow_run``), so the UI shows it running and its Duration is the
work; what the job logs is written at the end (``JobRun.logging``). Every run carries the same tags
(``RUN_TAGS`` where they apply), the command line as its description, the embeddings it read as an MLflow
dataset input, and, in a Hydra sweep, the sweep's name and a parent run that groups the sweep's jobs.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import getpass
import json
import logging
import os
import threading
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pinterest_cls.core import config
from pinterest_cls.core.cli import command
from pinterest_cls.core.provenance import provenance
from pinterest_cls.data.metadata import fingerprint_digest

_held = threading.local()


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).expanduser().resolve()
    return None


def prepare_uri(uri: str) -> str:
    path = _sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return uri


def use_store(uri: str):
    """Point MLflow at the tracking store ``uri`` (its folder made for a new SQLite file) and return the ``mlflow``
    module, with this package's defaults for its runs, unless the user chose otherwise: MLflow's own loggers at
    warnings (it narrates database migrations and artifact downloads at INFO), and no progress bar for each
    artifact copied while a model is logged."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(prepare_uri(uri))
    return mlflow


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
    uri = tracking_uri(cfg)
    with store_lock(uri):
        mlflow = use_store(uri)
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


#: The tags every run has where they apply: the verb, the data, and the backbone, classifier and split used.
RUN_TAGS = ("verb", "data", "backbone", "classifier", "split")
#: In a sweep folder: the MLflow run that groups the sweep's jobs (written by ``SweepRuns``).
PARENT_FILE = ".mlflow_parent_run"


def _hydra():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except Exception:  # not inside a Hydra app (library use, tests)
        return None


def command_line(verb: str) -> str | None:
    """The command that runs this job again, with the job's own overrides (one value each in a sweep); None
    outside a Hydra app (library use)."""
    hc = _hydra()
    return None if hc is None else command(verb, list(hc.overrides.task))


def sweep_name(sweep_dir: str | Path) -> str:
    """A sweep's readable name: its folder's last two parts, ``train-multirun/2026-11-23_13-10-00``."""
    path = Path(str(sweep_dir))
    return f"{path.parent.name}/{path.name}"


def sweep_tags() -> dict:
    """``sweep`` (readable), ``sweep_job`` and ``sweep_dir`` for a job of a Hydra multirun, else nothing."""
    hc = _hydra()
    if hc is None:
        return {}
    from hydra.types import RunMode

    if hc.mode != RunMode.MULTIRUN:
        return {}
    return {"sweep": sweep_name(hc.sweep.dir), "sweep_job": str(hc.job.num),
            "sweep_dir": str(Path(hc.sweep.dir).resolve())}


def _parent_run(uri: str) -> str | None:
    """The run of the sweep this job belongs to (written by ``SweepRuns``), if any, in this store."""
    hc = _hydra()
    if not sweep_tags():
        return None
    try:
        record = json.loads((Path(hc.sweep.dir) / PARENT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record.get("run_id") if record.get("tracking_uri") == uri else None


def embeddings_dataset(folder: Path, fingerprint: dict, name: str):
    """The embedding store as an MLflow dataset: its folder as source, its fingerprint (backbone, weights,
    preprocessing, precision and the rows embedded) as digest."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.meta_dataset import MetaDataset

    digest = fingerprint_digest(fingerprint)
    # a local folder, stated (resolving the URI would find two equal local sources and warn)
    source = get_dataset_source_from_json(json.dumps({"uri": Path(folder).resolve().as_uri()}), source_type="local")
    return MetaDataset(source, name=name, digest=digest)


def log_input(mlflow, dataset, context: str, attempts: int = 4) -> None:
    """``mlflow.log_input``, retried when a tracking server's database refuses the dataset as a duplicate: runs
    of a parallel sweep register the same store at once (a server's store is not under ``store_lock``), and the
    loser of that race finds the winner's row on its next attempt."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as e:
            if "unique constraint" not in str(e).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


class JobRun:
    """A job's MLflow run, created when the job starts; ``logging`` writes into it at the end."""

    def __init__(self, cfg: DictConfig | None, run_id: str | None = None, inputs: list | None = None):
        self.cfg, self.run_id, self.inputs, self.ended = cfg, run_id, list(inputs or []), False

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def add_embeddings(self, folder: Path, fingerprint: dict, context: str) -> None:
        """Log the embedding store at ``folder`` (whose fingerprint is ``fingerprint``) as a dataset input of the
        run (``context``: how it was used)."""
        if self.enabled:
            data = OmegaConf.select(self.cfg, "data.name", default=None)
            self.inputs.append((embeddings_dataset(folder, fingerprint, f"{data}/{Path(folder).name}"), context))

    @contextlib.contextmanager
    def logging(self):
        """The run, active for MLflow's logging functions (``mlflow.log_params`` and so on), with the store
        locked; it ends, FINISHED, when the block ends. Yields False (and logs nothing) when MLflow is off."""
        if not self.enabled:
            yield False
            return
        uri = tracking_uri(self.cfg)
        with store_lock(uri):
            mlflow = use_store(uri)
            with mlflow.start_run(run_id=self.run_id):
                for dataset, context in self.inputs:
                    log_input(mlflow, dataset, context)
                yield True
            self.ended = True

    def log(self, params: dict | None = None, metrics: dict | None = None, artifacts: dict | None = None,
            texts: dict | None = None, tags: dict | None = None, then=None) -> bool:
        """Write what the job produced into its run and end it FINISHED, in one locked write: ``params`` (None
        values as ``null``), ``metrics``, ``artifacts`` ({local file or folder: artifact folder, "" for the run's
        root}), ``texts`` ({artifact file: text}), ``tags``; ``then()`` runs last with the run active (models are
        logged there). False, and nothing logged, when MLflow is off."""
        with self.logging() as active:
            if not active:
                return False
            import mlflow

            if tags:
                mlflow.set_tags(tags)
            if params:
                mlflow.log_params({k: ("null" if v is None else v) for k, v in params.items()})
            if metrics:
                mlflow.log_metrics(metrics)
            for path, folder in (artifacts or {}).items():
                if Path(path).is_dir():
                    mlflow.log_artifacts(str(path), folder or None)
                else:
                    mlflow.log_artifact(str(path), folder or None)
            for name, text in (texts or {}).items():
                mlflow.log_text(text, name)
            if then is not None:
                then()
        return True

    def end(self, status: str) -> None:
        if not self.enabled or self.ended:
            return
        uri = tracking_uri(self.cfg)
        with store_lock(uri):
            use_store(uri).MlflowClient().set_terminated(self.run_id, status)
        self.ended = True


@contextlib.contextmanager
def mlflow_run(cfg: DictConfig, run_name: str, verb: str, tags: dict | None = None,
               embeddings: tuple[Path, dict, str] | None = None):
    """Open this job's MLflow run now (status RUNNING) and yield a ``JobRun``; log into it at the end with
    ``with run.logging():``. The run gets ``RUN_TAGS`` (``verb``, ``data`` from the config, the rest from
    ``tags``), the sweep's tags and parent, the command line as description and the resolved config; with
    ``embeddings=(folder, fingerprint, context)`` the store it read as a dataset input. If the block raises, the run
    ends FAILED (KILLED on Ctrl-C). With ``mlflow.enabled=false`` nothing is logged and ``run.enabled`` is
    False."""
    if not bool(config.select(cfg, "mlflow.enabled")):
        yield JobRun(None)
        return
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

    uri = tracking_uri(cfg)
    data = OmegaConf.select(cfg, "data.name", default=None)
    all_tags = {"verb": verb, **({"data": str(data)} if data is not None else {}),
                **{k: str(v) for k, v in (tags or {}).items() if v is not None}, **sweep_tags()}
    if command_line(verb):
        all_tags[MLFLOW_RUN_NOTE] = command_line(verb)
    all_tags.update(provenance_tags(verb))
    with store_lock(uri):
        exp = experiment_id(cfg)
        parent = _parent_run(uri)
        if parent:  # a job of a sweep: nested under the sweep's run
            all_tags[MLFLOW_PARENT_RUN_ID] = parent
        client = mlflow.MlflowClient()
        run_id = client.create_run(exp, run_name=run_name, tags=all_tags).info.run_id
        client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    run = JobRun(cfg, run_id)
    if embeddings is not None:
        run.add_embeddings(*embeddings)
    try:
        yield run
    except BaseException as exc:
        # Ctrl-C, or a job stopped on a signal (SLURM's cancel, requeue, time limit): killed, not failed
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) or hasattr(exc, "signum") else "FAILED"
        run.end(status)
        if parent:  # the sweep stops here (Hydra does not end it): so does its run
            JobRun(cfg, parent).end(status)
        raise
    run.end("FINISHED")


def provenance_tags(verb: str) -> dict[str, str]:
    """What made a run, as its tags: MLflow's own source, user and git commit (the UI's Source and User columns),
    the package's version, whether the checkout had uncommitted changes (``git_dirty``), and each library's version
    (``version.<library>``)."""
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE, MLFLOW_USER

    found = provenance()
    tags = {MLFLOW_SOURCE_NAME: f"pinterest_cls.{verb}", MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
            "pinterest_cls_version": found.pop("pinterest_cls"),
            **{f"version.{k}": v for k, v in found.items() if not k.startswith("git_")}}
    with contextlib.suppress(Exception):  # no user name in some containers
        tags[MLFLOW_USER] = getpass.getuser()
    if "git_commit" in found:
        tags[MLFLOW_GIT_COMMIT], tags["git_dirty"] = found["git_commit"], found["git_dirty"]
    return tags


def log_curves(histories: list[list[dict]]) -> None:
    """Per-epoch rows (``{"epoch": n, name: value, ...}``) into the active run as metric histories, each fold's
    prefixed ``foldN_`` when there are several."""
    import mlflow

    for f, rows in enumerate(histories):
        prefix = f"fold{f + 1}_" if len(histories) > 1 else ""
        for r in rows:
            mlflow.log_metrics({prefix + k: v for k, v in r.items() if k != "epoch"}, step=r["epoch"])


class SweepRuns(Callback):
    """Hydra callback (conf/hydra/default.yaml): a multirun opens one MLflow parent run, named after the sweep,
    that the UI nests the sweep's job runs under; it ends when the sweep does."""

    def __init__(self):
        self.run_id: str | None = None
        self.cfg: DictConfig | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not OmegaConf.select(config, "mlflow.enabled", default=False):
            return
        import mlflow
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        job = str(OmegaConf.select(config, "hydra.job.name"))
        self.cfg, uri = config, tracking_uri(config)
        tags = {"verb": "sweep", "sweep_of": job, "sweep": sweep_name(sweep_dir), "sweep_dir": str(sweep_dir.resolve()),
                "data": str(OmegaConf.select(config, "data.name")),
                MLFLOW_RUN_NOTE: command(job, ["-m", *config.hydra.overrides.task]), **provenance_tags(job)}
        with store_lock(uri):
            exp = experiment_id(config)
            self.run_id = mlflow.MlflowClient().create_run(exp, run_name=f"{job} sweep {sweep_dir.name}",
                                                           tags=tags).info.run_id
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(json.dumps({"run_id": self.run_id, "tracking_uri": uri}))
        atexit.register(self._close, "FAILED")  # a sweep that stops with an error does not reach on_multirun_end

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        atexit.unregister(self._close)
        self._close("FINISHED")

    def _close(self, status: str) -> None:
        """End the sweep's run; a failed sweep none of whose jobs opened a run leaves no run behind."""
        if self.run_id is None:
            return

        run = JobRun(self.cfg, self.run_id)
        if status != "FINISHED":
            uri = tracking_uri(self.cfg)
            with store_lock(uri):
                client = use_store(uri).MlflowClient()
                exp = client.get_run(self.run_id).info.experiment_id
                jobs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{self.run_id}'", max_results=1)
                if not jobs:
                    client.delete_run(self.run_id)
                    run.ended = True
        run.end(status)
        self.run_id = None
