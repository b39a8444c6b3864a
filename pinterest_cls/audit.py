"""``python -m pinterest_cls.audit backbone=NAME``: what is wrong with the data, from a finished embedding store:
copies of a pin (``duplicates.csv``), likely mislabeled pins (``label_issues.csv``), off-topic boards
(``boards.csv``), pins far from everything (``outliers.csv``) and a page of thumbnails (``audit.html``), in
``${paths.audit}/<backbone>/``, logged to MLflow. ``train audit.exclude=[...]`` then trains without them."""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig, OmegaConf

from pinterest_cls.analysis.findings import FILES, INFO, audited_pins, run_audit, write_findings
from pinterest_cls.analysis.pages import write_audit_page
from pinterest_cls.core import config
from pinterest_cls.core.cli import verb_main
from pinterest_cls.core.errors import UserError
from pinterest_cls.core.progress import bar_factory
from pinterest_cls.data.manifest import pin_digests
from pinterest_cls.data.store import store_for
from pinterest_cls.learn.splits import has_boards
from pinterest_cls.neighbors.duplicates import NOT_CALIBRATED, calibration_note, copy_policy
from pinterest_cls.track.tracking import mlflow_run

log = logging.getLogger(__name__)


def audit(cfg: DictConfig, progress: bool = True) -> dict:
    """Audit the store of ``backbone.name``; returns {"counts", "info", "folder", "page", "run_id"}."""
    t0 = time.perf_counter()
    if config.select(cfg, "audit.near_threshold") is not None:
        raise UserError("audit.near_threshold is now repins.threshold, one setting for train and audit (auto: the "
                        "store's calibration; a cosine such as 0.95; off)")
    store = store_for(cfg)
    frame = audited_pins(store.pins)
    log.info(f"audit {cfg.backbone.name}: {len(frame)} pins, {frame['category'].nunique()} categories, "
             f"{store.meta.dim}-d, from {store.folder}")
    with mlflow_run(cfg, f"{cfg.backbone.name}-audit", "audit", {"backbone": str(cfg.backbone.name)},
                    embeddings=(store.folder, store.meta.fingerprint, "audit")) as run:
        policy = copy_policy(cfg.repins, store.folder, store.meta)
        if policy.source == NOT_CALIBRATED:
            log.warning(calibration_note(store.folder, store.meta, str(cfg.backbone.name)))
        findings = run_audit(cfg, store.vectors, frame, pin_digests(cfg, frame), has_boards(cfg), policy,
                             bar_factory(progress))
        folder = config.audit_dir(cfg)
        info = write_findings(folder, findings, store.meta, OmegaConf.to_container(cfg.audit, resolve=True))
        page = write_audit_page(folder, findings, f"Audit of {cfg.data.name} with {cfg.backbone.name}",
                                int(cfg.audit.page_top))
        counts = info["counts"]
        elapsed = time.perf_counter() - t0
        log.info(f"  {counts['duplicate_groups']} duplicate groups of {info['copies']} "
                 f"({counts['pins_in_duplicate_groups']} pins; "
                 f"{counts['duplicate_groups_across_boards']} across boards, {counts['duplicate_groups_across_users']} "
                 f"across users, {counts['duplicate_groups_across_categories']} across categories; "
                 f"{info['near_candidates']} near candidates, {info['near_candidates_rejected']} refused by their "
                 "pixels)")
        log.info(f"  {counts['label_issues']} likely mislabeled pins (out-of-fold accuracy "
                 f"{info['oof_accuracy']:.3f}, {info['folds']} folds by {info['folds_by']})")
        log.info(f"  {counts['off_topic_boards']} of {counts['boards']} boards off-topic; "
                 f"{counts['outliers']} outliers")
        log.info(f"  findings in {folder}; page {page} ({elapsed:.1f} s)")
        a = cfg.audit
        params = {"folds": info["folds"], "folds_by": info["folds_by"], "k": info["k"],
                  "copies": info["copies"], **info["repins"], "neighbour_index": info["neighbour_index"],
                  "C": float(a.C), "max_fit_per_category": str(a.max_fit_per_category),
                  "off_topic_agreement": float(a.off_topic_agreement), "outlier_fraction": float(a.outlier_fraction)}
        thumbs = {folder / "thumbs": "page/thumbs"} if (folder / "thumbs").is_dir() else {}
        run.log(params=params, metrics={**counts, "oof_accuracy": info["oof_accuracy"], "audit_s": elapsed,
                                        "near_candidates": info["near_candidates"],
                                        "near_candidates_rejected": info["near_candidates_rejected"]},
                artifacts={**{folder / f: "" for f in [*FILES.values(), INFO]}, page: "page", **thumbs})
    return {"counts": counts, "info": info, "folder": folder, "page": page, "run_id": run.run_id}


@verb_main("audit")
def main(cfg: DictConfig) -> None:
    audit(cfg)


if __name__ == "__main__":
    main()
