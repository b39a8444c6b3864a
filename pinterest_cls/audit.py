"""``python -m pinterest_cls.audit backbone=NAME``: what is wrong with the data, from a finished embedding store:
copies of a pin (``duplicates.csv``), likely mislabeled pins (``label_issues.csv``), off-topic boards
(``boards.csv``), pins far from everything (``outliers.csv``) and a page of thumbnails (``audit.html``), in
``${paths.audit}/<backbone>/``, logged to MLflow. ``train audit.exclude=[...]`` then trains without them."""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig, OmegaConf

from . import config
from .auditing import FILES, INFO, audited_pins, run_audit, write_findings, write_page
from .cli import verb_main
from .splits import has_boards, pin_digests
from .store import open_store
from .tracking import mlflow_run

log = logging.getLogger(__name__)


def _bar(progress: bool):
    from tqdm.auto import tqdm

    def factory(total: int, desc: str, unit: str):
        return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False)

    return factory


def audit(cfg: DictConfig, progress: bool = True) -> dict:
    """Audit the store of ``backbone.name``; returns {"counts", "info", "folder", "page", "run_id"}."""
    t0 = time.perf_counter()
    emb, index, meta, store = open_store(cfg)
    frame = audited_pins(index)
    log.info(f"audit {cfg.backbone.name}: {len(frame)} pins, {frame['category'].nunique()} categories, "
             f"{emb.shape[1]}-d, from {store}")
    with mlflow_run(cfg, f"{cfg.backbone.name}-audit", "audit", {"backbone": str(cfg.backbone.name)},
                    embeddings=(store, meta, "audit")) as run:
        findings = run_audit(cfg, emb, frame, pin_digests(cfg, frame), has_boards(cfg), _bar(progress))
        folder = config.audit_dir(cfg)
        settings = OmegaConf.to_container(cfg.audit, resolve=True)
        info = write_findings(folder, findings, meta, settings)
        page = write_page(folder, findings, f"Audit of {cfg.data.name} with {cfg.backbone.name}",
                          int(cfg.audit.page_top))
        counts = info["counts"]
        elapsed = time.perf_counter() - t0
        log.info(f"  {counts['duplicate_groups']} duplicate groups ({counts['pins_in_duplicate_groups']} pins; "
                 f"{counts['duplicate_groups_across_boards']} across boards, {counts['duplicate_groups_across_users']} "
                 f"across users, {counts['duplicate_groups_across_categories']} across categories)")
        log.info(f"  {counts['label_issues']} likely mislabeled pins (out-of-fold accuracy "
                 f"{info['oof_accuracy']:.3f}, {info['folds']} folds by {info['folds_by']})")
        log.info(f"  {counts['off_topic_boards']} of {counts['boards']} boards off-topic; "
                 f"{counts['outliers']} outliers")
        log.info(f"  findings in {folder}; page {page} ({elapsed:.1f} s)")
        _log_run(run, cfg, counts, info, folder, page, elapsed)
    return {"counts": counts, "info": info, "folder": folder, "page": page, "run_id": run.run_id}


def _log_run(run, cfg: DictConfig, counts: dict, info: dict, folder, page, elapsed: float) -> None:
    with run.logging() as active:
        if not active:
            return
        import mlflow

        mlflow.log_params({"folds": info["folds"], "folds_by": info["folds_by"], "k": info["k"],
                           "near_threshold": str(info["near_threshold"]), "neighbour_index": info["neighbour_index"],
                           "C": float(cfg.audit.C), "max_fit_per_category": str(cfg.audit.max_fit_per_category),
                           "off_topic_agreement": float(cfg.audit.off_topic_agreement),
                           "outlier_fraction": float(cfg.audit.outlier_fraction)})
        mlflow.log_metrics({**counts, "oof_accuracy": info["oof_accuracy"], "audit_s": elapsed})
        for file in [*FILES.values(), INFO]:
            mlflow.log_artifact(str(folder / file))
        mlflow.log_artifact(str(page), "page")
        if (folder / "thumbs").is_dir():
            mlflow.log_artifacts(str(folder / "thumbs"), "page/thumbs")


@verb_main("audit")
def main(cfg: DictConfig) -> None:
    audit(cfg)


if __name__ == "__main__":
    main()
