"""``python -m pinterest_cls.extract backbone=NAME``: stream the manifest's ok pins through a backbone into
``${paths.work}/${data.name}/embeddings/${backbone.name}/`` (resumable, shardable, corrupt-safe, AMP)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time

from omegaconf import DictConfig, OmegaConf

from .cli import verb_main
from .errors import UserError
from .extraction import ShardDone, Stopped, backbone_configs, extract_many
from .plots import batch_timings_plot
from .tracking import JobRun, mlflow_run

log = logging.getLogger(__name__)

#: Fault injection for the crash-safety tests: kill -9 this process right after writing the Nth batch's rows,
#: before they are committed.
KILL_ENV = "PINTEREST_CLS_KILL_AFTER_BATCH"
#: For the SLURM tests: sleep this many seconds after each batch, so that a job is still running when it is
#: requeued or reaches its time limit.
DELAY_ENV = "PINTEREST_CLS_BATCH_DELAY_S"
#: For the stop tests: "N:SIG" sends signal SIG right after the Nth batch's rows are written, to this process's
#: whole process group (DataLoader workers included, as Ctrl-C or SLURM would) when it leads the group.
SIGNAL_ENV = "PINTEREST_CLS_SIGNAL_AFTER_BATCH"


def kill_hook():
    """The ``on_batch`` callback that :data:`KILL_ENV`, :data:`DELAY_ENV` and :data:`SIGNAL_ENV` ask for, or
    None."""
    n = int(os.environ.get(KILL_ENV, "0") or 0)
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    at, _, sig = (os.environ.get(SIGNAL_ENV) or "0:0").partition(":")
    if not n and not delay and not int(at):
        return None

    def on_batch(batch: int) -> None:
        if batch == n:
            os.kill(os.getpid(), signal.SIGKILL)
        if batch == int(at):
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpgrp(), int(sig))
            else:
                os.kill(os.getpid(), int(sig))
        time.sleep(delay)

    return on_batch


def extract(cfg: DictConfig, progress: bool = True) -> dict:
    """Run (or resume) this job's shard of the extraction of ``backbone``; returns the store's meta.
    With ``backbones=[...]`` set, every listed backbone is extracted from one decode of each pin and the
    result is ``{backbone name: meta}``."""
    with contextlib.ExitStack() as stack:
        runs: dict[str, JobRun] = {}

        def open_runs(names: list[str]) -> None:  # one MLflow run per backbone, open while it is extracted
            for name in names:
                runs[name] = stack.enter_context(mlflow_run(cfg, f"extract-{name}", "extract", {"backbone": name}))

        metas = extract_many(cfg, backbone_configs(cfg), progress=progress, on_start=open_runs,
                             on_done=lambda done: report(cfg, done, runs.get(done.backbone.name)),
                             on_batch=kill_hook())
    if OmegaConf.select(cfg, "backbones", default=None):
        return metas
    return next(iter(metas.values()))


def report(cfg: DictConfig, done: ShardDone, run: JobRun | None) -> None:
    """A backbone's shard is done: its per-batch timings as CSV and plot beside the store, a summary in the
    log, and an MLflow run (``verb=extract``)."""
    backbone, stats, meta = done.backbone, done.stats, done.meta
    timing_csv = done.folder / "timings" / f"{done.tag}.csv"
    timing_csv.parent.mkdir(exist_ok=True)
    with open(timing_csv, "w") as f:
        f.write("batch,images,wait_s,compute_s\n")
        f.writelines(f"{b},{n},{w:.6f},{c:.6f}\n" for b, n, w, c in done.timings)
    png = batch_timings_plot(done.timings, timing_csv.with_suffix(".png"),
                             title=f"{backbone.name} on {stats['device']}, {done.shard_name}")
    log.info(f"{backbone.name}: {done.shard_name}: {stats['rows']} images in {stats['elapsed_s']:.1f} s "
          f"({stats['images_per_s']:.1f} images/s; waiting for data {stats['wait_s']:.1f} s, "
          f"computing {stats['compute_s']:.1f} s), {stats['failed']} failed")
    state = "complete" if meta["complete"] else f"{meta['rows_done']}/{meta['rows']} rows done"
    log.info(f"store {done.folder}: {state}, {meta['rows_failed']} failed rows")
    params = {"backbone": backbone.name, "timm_id": backbone.info.get("timm_id"),
              "weights_sha256": backbone.info.get("weights_sha256"), "weights": backbone.info.get("weights"),
              "image_size": backbone.info.get("input_size"), "pool": backbone.info.get("pool"),
              "batch_size": int(cfg.extract.batch_size), "workers": stats["workers"], "amp": stats["amp"],
              "runtime": stats["runtime"],
              "device": stats["device"], "shard": done.shard_name, "dtype": meta["dtype"]}
    if run is None:
        return
    run.add_embeddings(done.folder, meta, "output")
    with run.logging() as active:
        if not active:
            return
        import mlflow

        mlflow.log_params(params)
        mlflow.log_metrics({"images_per_s": stats["images_per_s"], "failed": stats["failed"],
                            "elapsed_s": stats["elapsed_s"], "wait_s": stats["wait_s"],
                            "compute_s": stats["compute_s"]})
        mlflow.log_artifact(str(png), "plots")
        mlflow.log_artifact(str(timing_csv), "timings")
        mlflow.log_text(json.dumps(meta, indent=2), "meta.json")


@verb_main("extract")
def main(cfg: DictConfig) -> None:
    _check_sweep(cfg)
    try:
        extract(cfg)
    except Stopped as exc:  # SIGTERM, SIGUSR2 or Ctrl-C: what was written is committed (logged above)
        sys.exit(128 + exc.signum)  # no result, so that a requeued SLURM job runs again and resumes


def _check_sweep(cfg: DictConfig) -> None:
    """A multirun job that sweeps ``backbone`` while ``backbones`` is also set (e.g. by an experiment config)
    would extract every listed backbone in every job: refuse it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not OmegaConf.select(cfg, "backbones", default=None) or not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    swept = [o for o in hc.overrides.task if o.split("=", 1)[0] in ("backbone", "+backbone")]
    if hc.mode == RunMode.MULTIRUN and swept:
        raise UserError(f"this multirun job has {swept[0]} but backbones={list(cfg.backbones)} is set too, so "
                        "every job would extract every listed backbone; add backbones=null for one backbone "
                        "per job, or run without -m to extract them all in one process")


if __name__ == "__main__":
    main()
