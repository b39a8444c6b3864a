"""``python -m pinterest_cls.train backbone=NAME classifier=NAME``: a classifier on stored embeddings, with
grid search, held-out (or k-fold) evaluation and everything logged to MLflow."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from . import config
from .errors import UserError, user_errors_exit
from .estimators import fit_grid
from .fileio import file_sha256
from .serving import log_model
from .splits import apply_repins, board_keys, find_repins, has_boards, make_splits, sample_rows, split_table
from .store import META, load_xy, open_store

log = logging.getLogger(__name__)

# --- inputs --------------------------------------------------------------------------------------------------


# --- splits --------------------------------------------------------------------------------------------------


# --- model ---------------------------------------------------------------------------------------------------


# --- one job -------------------------------------------------------------------------------------------------


def sweep_tags() -> dict:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return {"sweep": str(Path(hc.sweep.dir).resolve()), "sweep_job": str(hc.job.num)}
    except Exception:
        pass
    return {}


def train(cfg: DictConfig, progress: bool = True) -> dict:
    """Run one training job; returns {"metrics", "params", "run_id", "output_dir"}."""
    from sklearn.metrics import classification_report

    from .estimators import class_scores
    from .evaluation import (
        board_accuracy,
        classification_metrics,
        protocol,
        protocol_settings,
        repins_settings,
    )
    from .plots import confusion_plot

    t0 = time.perf_counter()
    emb, index, meta, folder = open_store(cfg)
    frame = sample_rows(index, cfg.sampling.max_per_category, int(cfg.sampling.seed))
    categories = sorted(frame["category"].unique())
    if len(categories) < 2:
        raise UserError(f"only {len(categories)} category left after filtering ({', '.join(categories) or 'none'}); "
                        "a classifier needs at least two: check data.reject_categories and the scan report")
    X = load_xy(emb, frame)
    y = frame["category"].to_numpy().astype(str)
    groups, repin_info = None, {"repins_mode": "off"}
    if str(cfg.repins.mode) != "off":
        if str(cfg.repins.mode) not in ("drop", "link"):
            raise UserError(f"repins.mode={cfg.repins.mode!r} must be drop, link or off")
    elif bool(cfg.repins.keep_one):
        raise UserError("repins.keep_one=true needs the duplicate groups: set repins.mode=drop or link")
    if str(cfg.repins.mode) != "off":
        groups, repin_info = find_repins(cfg, frame, X)
        splits, more = apply_repins(cfg, frame, y, groups)
        repin_info.update(more)
        log.info(f"repins: {repin_info['pins_with_copies']} pins in {repin_info['duplicate_groups']} duplicate groups; "
              f"{repin_info['test_pins_with_train_copy_before']} test pins had a copy in training; "
              + (f"{repin_info['boards_linked']} boards linked" if repin_info["repins_mode"] == "link"
                 else f"{repin_info['pins_dropped']} training pins dropped")
              + (f"; {repin_info['pins_deduplicated']} further copies dropped to keep one per group and side"
                 if "pins_deduplicated" in repin_info else ""))
    else:
        splits = make_splits(cfg, frame, y)
    out = config.job_output_dir()
    split_table(frame, splits, groups).to_csv(out / "split.csv", index=False)
    name = f"{cfg.backbone.name}-{cfg.classifier.name}"
    log.info(f"train {name}: {len(frame)} pins, {len(categories)} categories, {X.shape[1]}-d, split={splits.name}")

    fold_metrics, predictions, search, cv_desc, leaky = [], [], None, "", False
    for f, (tr, te) in enumerate(splits.folds):
        inner = frame.iloc[tr].reset_index(drop=True)
        if groups is not None and splits.grouped and "linked" not in inner.columns:
            # the inner folds keep copies on one side too: boards sharing copies form one group
            from .duplicates import link_boards

            inner["linked"] = link_boards(board_keys(inner), groups[tr])
        search, cv_desc, leaky = fit_grid(cfg, X[tr], y[tr], inner, splits.grouped)
        model = search.best_estimator_
        pred = model.predict(X[te])
        scores = class_scores(model, X[te])
        m = classification_metrics(y[te], pred, scores, model.classes_)
        m["cv_" + str(cfg.train.scoring)] = float(search.best_score_)
        part = frame.iloc[te][["row", "user", "board", "pin", "path"]].copy()
        part["truth"], part["prediction"] = y[te], pred
        part["score"] = scores.max(axis=1) if scores is not None else np.nan
        if str(cfg.data.layout) == "pinterest":
            m["board_accuracy"] = board_accuracy(part)
        if len(splits.folds) > 1:
            part["fold"] = f
            log.info(f"  fold {f + 1}/{len(splits.folds)}: accuracy {m['accuracy']:.4f}, "
                  f"macro F1 {m['f1_macro']:.4f}")
        fold_metrics.append(m)
        predictions.append(part)
    best_params = {k.removeprefix("clf__"): v for k, v in search.best_params_.items()}
    if len(splits.folds) > 1:  # k-fold: the logged model is refit on every sampled row
        everything = frame
        if groups is not None and splits.grouped and "linked" not in frame.columns:
            from .duplicates import link_boards

            everything = frame.assign(linked=link_boards(board_keys(frame), groups))
        search, cv_desc, leaky = fit_grid(cfg, X, y, everything, splits.grouped)
        best_params = {k.removeprefix("clf__"): v for k, v in search.best_params_.items()}

    keys = sorted(set().union(*fold_metrics))
    metrics = {}
    for k in keys:
        vals = [m[k] for m in fold_metrics if k in m]
        prefix = "" if k.startswith("cv_") else "test_"
        metrics[prefix + k] = float(np.mean(vals))
        if len(splits.folds) > 1:
            metrics[prefix + k + "_std"] = float(np.std(vals))
    preds = pd.concat(predictions, ignore_index=True)
    preds.to_csv(out / "predictions.csv", index=False)
    n_boot = int(OmegaConf.select(cfg, "train.bootstrap", default=1000) or 0)
    ci_desc = "off"
    if n_boot:
        from .evaluation import bootstrap_ci

        by_board = splits.grouped or has_boards(cfg)
        ci = bootstrap_ci(preds["truth"], preds["prediction"], board_keys(preds) if by_board else None,
                          n_boot=n_boot, seed=int(cfg.seed))
        for key, (low, high) in ci.items():
            metrics[f"test_{key}_ci_low"], metrics[f"test_{key}_ci_high"] = low, high
        ci_desc = f"95% percentile bootstrap, {n_boot} resamples of the test {'boards' if by_board else 'pins'}"
    report_txt = classification_report(preds["truth"], preds["prediction"], zero_division=0, digits=4)
    (out / "classification_report.txt").write_text(report_txt)
    pd.DataFrame(search.cv_results_).drop(columns=["params"]).to_csv(out / "cv_results.csv", index=False)
    confusion_plot(preds["truth"], preds["prediction"], categories, out / "confusion_matrix.png",
                   title=f"{name}, split={splits.name}: accuracy {metrics['test_accuracy']:.3f}, "
                         f"macro F1 {metrics['test_f1_macro']:.3f}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    test_sizes = [len(te) for _, te in splits.folds]
    split_cfg = OmegaConf.merge(cfg.split, {"name": splits.name})
    inner_kind = "by board" if "by board" in cv_desc else ("by pin, leaky" if leaky else "by pin")
    run_protocol = protocol(protocol_settings(split_cfg, cfg.sampling.max_per_category, int(cfg.sampling.seed),
                                              inner_kind, repins_settings(str(cfg.repins.mode), cfg.repins.threshold,
                                                                              bool(cfg.repins.keep_one))),
                            meta.get("fingerprint", {}).get("rows_sha256", ""))
    params = {
        "backbone": str(cfg.backbone.name), "classifier": str(cfg.classifier.name), "split": splits.name,
        "split_seed": int(cfg.split.seed), "test_size": cfg.split.get("test_size"), "folds": len(splits.folds),
        "inner_cv": cv_desc, "protocol": run_protocol, "scoring": str(cfg.train.scoring), "ci": ci_desc,
        "sampling_max_per_category": cfg.sampling.max_per_category, "sampling_seed": int(cfg.sampling.seed),
        "preprocess": "+".join(f"pca{cfg.preprocess.pca_components}" if s == "pca" else str(s)
                               for s in cfg.preprocess.steps) or "none",
        "n_samples": len(frame), "n_test": int(np.sum(test_sizes)), "n_classes": len(categories),
        "embeddings": str(folder), "embeddings_meta_sha256": file_sha256(folder / META),
        "timm_id": meta.get("timm_id"), "seed": int(cfg.seed), "repins_keep_one": bool(cfg.repins.keep_one),
        **repin_info,
        **{k: v for k, v in best_params.items()},
    }
    if splits.info.get("single_board_categories"):
        params["single_board_categories"] = ",".join(splits.info["single_board_categories"])
    shutil.copyfile(folder / META, out / "embeddings_meta.json")
    run_id = _log_run(cfg, name, params, metrics, out, search.best_estimator_, out / "embeddings_meta.json",
                      {"leaky_inner_cv": "true"} if leaky else {})
    elapsed = time.perf_counter() - t0
    summary = ", ".join(f"{k} {metrics[k]:.4f}" + (f" [{metrics[k + '_ci_low']:.4f}, {metrics[k + '_ci_high']:.4f}]"
                                                   if k + "_ci_low" in metrics else "")
                        for k in ("test_accuracy", "test_f1_macro", "test_balanced_accuracy", "test_board_accuracy",
                                  f"cv_{cfg.train.scoring}") if k in metrics)
    log.info(f"{name}: best {best_params}; {summary} ({elapsed:.1f} s)")
    log.info(f"  artifacts in {out}" + (f"; MLflow run {run_id}" if run_id else ""))
    return {"metrics": metrics, "params": params, "run_id": run_id, "output_dir": out}


def _log_run(cfg, name, params, metrics, out: Path, model, store_meta: Path, extra_tags: dict) -> str | None:
    from .tracking import mlflow_run

    tags = {"verb": "train", "backbone": params["backbone"], "classifier": params["classifier"],
            "data": str(cfg.data.name), **sweep_tags(), **extra_tags}
    with mlflow_run(cfg, name, tags=tags) as run:
        if run is None:
            return None
        import mlflow

        mlflow.log_params({k: ("null" if v is None else v) for k, v in params.items()})
        mlflow.log_metrics(metrics)
        for f in ("predictions.csv", "classification_report.txt", "cv_results.csv", "metrics.json", "split.csv"):
            mlflow.log_artifact(str(out / f))
        mlflow.log_artifact(str(out / "confusion_matrix.png"), "plots")
        mlflow.log_artifact(str(store_meta))  # what predict needs to rebuild the backbone
        log_model(model)
        if cfg.train.log_pipeline:
            from .serving import log_pipeline

            log_pipeline(model, store_meta, out)
        return run.info.run_id


@hydra.main(config_path=config.CONF_DIR, config_name="train", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
