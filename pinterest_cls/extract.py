"""``python -m pinterest_cls.extract backbone=NAME``: stream the manifest's ok pins through a backbone into
``${paths.work}/${data.name}/embeddings/${backbone.name}/`` (resumable, shardable, corrupt-safe, AMP)."""

from __future__ import annotations

import contextlib
import sys

from omegaconf import DictConfig, OmegaConf

from pinterest_cls.core.cli import verb_main
from pinterest_cls.core.errors import UserError
from pinterest_cls.core.stopping import Stopped
from pinterest_cls.embed.registry import backbone_configs
from pinterest_cls.embed.streaming import extract_many, extract_uncategorised
from pinterest_cls.track.timings import report_shard
from pinterest_cls.track.tracking import JobRun, mlflow_run


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
                             on_done=lambda done: report_shard(done, int(cfg.extract.batch_size),
                                                               runs.get(done.backbone.name)))
    if bool(OmegaConf.select(cfg, "extract.uncategorised", default=False)):
        extract_uncategorised(cfg, backbone_configs(cfg), progress=progress,
                              on_done=lambda done: report_shard(done, int(cfg.extract.batch_size), None))
    if OmegaConf.select(cfg, "backbones", default=None):
        return metas
    return next(iter(metas.values()))


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
