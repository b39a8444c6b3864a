"""``python -m pinterest_cls.scan``: catalogue an export into ``${paths.work}/${data.name}/manifest.parquet``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from . import config
from .catalog import ScanSettings, format_report, run_scan
from .errors import UserError, user_errors_exit


def settings_from(cfg: DictConfig) -> ScanSettings:
    verify = config.select(cfg, "scan.verify")
    if verify not in ("full", "header"):
        raise UserError(f"scan.verify={verify!r} must be 'full' (decode every pixel) or 'header'")
    return ScanSettings(
        full=verify == "full",
        allow_truncated=bool(config.select(cfg, "scan.allow_truncated")),
        max_pixels=int(config.select(cfg, "scan.max_pixels")),
        workers=config.select(cfg, "scan.workers"),
    )


def scan(cfg: DictConfig, progress: bool = True) -> dict:
    """Run the scan described by ``cfg`` (the ``data``, ``paths`` and ``scan`` keys); return its report."""
    settings = settings_from(cfg)
    root = config.data_root(cfg)
    out_dir = config.data_dir(cfg)
    report = run_scan(
        root, out_dir, str(config.select(cfg, "data.layout")),
        list(config.select(cfg, "data.reject_categories")), cfg.data, settings,
        incremental=bool(config.select(cfg, "scan.incremental")), progress=progress,
    )
    print(format_report(report, out_dir), flush=True)
    return report


@hydra.main(config_path=config.CONF_DIR, config_name="scan", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    scan(cfg)


if __name__ == "__main__":
    main()
