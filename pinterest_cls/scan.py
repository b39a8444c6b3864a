"""``python -m pinterest_cls.scan``: catalogue an export into ``${paths.work}/${data.name}/manifest.parquet``."""

from __future__ import annotations

from omegaconf import DictConfig

from pinterest_cls.core import config
from pinterest_cls.core.cli import verb_main
from pinterest_cls.data.manifest import format_report, scan_export


def scan(cfg: DictConfig, progress: bool = True) -> dict:
    """Run the scan described by ``cfg`` (the ``data``, ``paths`` and ``scan`` keys); return its report."""
    report = scan_export(cfg, progress=progress)
    print(format_report(report, config.data_dir(cfg)), flush=True)
    return report


@verb_main("scan")
def main(cfg: DictConfig) -> None:
    scan(cfg)


if __name__ == "__main__":
    main()
