"""``python -m pinterest_cls.train backbone=NAME classifier=NAME``: a classifier on stored embeddings, with
grid search, held-out (or k-fold) evaluation and everything logged to MLflow."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from . import config
from .auditing import apply_exclusions, exclusion_settings
from .cli import verb_main
from .errors import UserError
from .estimators import estimator_params, fit_and_test
from .evaluation import bootstrap_metrics, fold_mean, protocol, protocol_settings, repins_settings
from .fileio import file_sha256
from .plots import confusion_plot
from .serving import log_model, log_pipeline
from .splits import board_keys, has_boards, sample_rows, split_for_run, split_table
from .store import META, load_xy, open_store
from .tracking import mlflow_run

log = logging.getLogger(__name__)


def train(cfg: DictConfig, progress: bool = True) -> dict:
    """Run one training job; returns {"metrics", "params", "run_id", "output_dir"}."""
    t0 = time.perf_counter()
    emb, index, meta, folder = open_store(cfg)
    frame = sample_rows(index, cfg.sampling.max_per_category, int(cfg.sampling.seed))
    categories = sorted(frame["category"].unique())
    if len(categories) < 2:
        raise UserError(f"only {len(categories)} category left after filtering ({', '.join(categories) or 'none'}); "
                        "a classifier needs at least two: check data.reject_categories and the scan report")
    X = load_xy(emb, frame)
    y = frame["category"].to_numpy().astype(str)
    splits, groups, repin_info = split_for_run(cfg, frame, X, y)
    splits, excluded = apply_exclusions(cfg, frame, splits, meta.get("fingerprint", {}).get("rows_sha256", ""))
    repin_info.update(excluded)
    out = config.job_output_dir()
    split_table(frame, splits, groups).to_csv(out / "split.csv", index=False)
    name = f"{cfg.backbone.name}-{cfg.classifier.name}"
    log.info(f"train {name}: {len(frame)} pins, {len(categories)} categories, {X.shape[1]}-d, split={splits.name}")
    tags = {"backbone": str(cfg.backbone.name), "classifier": str(cfg.classifier.name), "split": splits.name}
    with mlflow_run(cfg, name, "train", tags, embeddings=(folder, meta, "train")) as run:
        fitted = fit_and_test(cfg, X, y, frame, splits, groups)
        metrics = fold_mean([{k: v for k, v in m.items() if not k.startswith("cv_")} for m in fitted.fold_metrics],
                            "test_")
        metrics.update(fold_mean([{k: v for k, v in m.items() if k.startswith("cv_")} for m in fitted.fold_metrics],
                                 ""))
        metrics.update(fit_time_s=fitted.fit_s, predict_time_s=fitted.predict_s)
        preds = fitted.predictions
        preds.to_csv(out / "predictions.csv", index=False)
        n_boot = int(config.select(cfg, "train.bootstrap") or 0)
        by_board = splits.grouped or has_boards(cfg)
        intervals, ci_desc = bootstrap_metrics(preds, board_keys(preds) if by_board else None, n_boot,
                                               int(cfg.seed))
        metrics.update(intervals)
        _write_outputs(out, fitted, categories, f"{name}, split={splits.name}", metrics)
        params = _params(cfg, splits, fitted, meta, folder, frame, categories, repin_info, ci_desc)
        shutil.copyfile(folder / META, out / "embeddings_meta.json")
        _log_run(run, cfg, params, metrics, out, fitted.search.best_estimator_, out / "embeddings_meta.json",
                 {"leaky_inner_cv": "true"} if fitted.leaky else {}, str(frame["path"].iloc[0]))
    run_id = run.run_id
    elapsed = time.perf_counter() - t0
    summary = ", ".join(f"{k} {metrics[k]:.4f}" + (f" [{metrics[k + '_ci_low']:.4f}, {metrics[k + '_ci_high']:.4f}]"
                                                   if k + "_ci_low" in metrics else "")
                        for k in ("test_accuracy", "test_f1_macro", "test_balanced_accuracy", "test_board_accuracy",
                                  f"cv_{cfg.train.scoring}") if k in metrics)
    log.info(f"{name}: best {fitted.best_params}; {summary} ({elapsed:.1f} s)")
    log.info(f"  artifacts in {out}" + (f"; MLflow run {run_id}" if run_id else ""))
    return {"metrics": metrics, "params": params, "run_id": run_id, "output_dir": out}


def _write_outputs(out: Path, fitted, categories: list[str], title: str, metrics: dict) -> None:
    from sklearn.metrics import classification_report

    preds = fitted.predictions
    report_txt = classification_report(preds["truth"], preds["prediction"], zero_division=0, digits=4)
    (out / "classification_report.txt").write_text(report_txt)
    pd.DataFrame(fitted.search.cv_results_).drop(columns=["params"]).to_csv(out / "cv_results.csv", index=False)
    confusion_plot(preds["truth"], preds["prediction"], categories, out / "confusion_matrix.png",
                   title=f"{title}: accuracy {metrics['test_accuracy']:.3f}, macro F1 {metrics['test_f1_macro']:.3f}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


def _params(cfg, splits, fitted, meta, folder, frame, categories, repin_info, ci_desc) -> dict:
    """The run's MLflow params: what was trained on, how it was split and chosen, and its protocol."""
    split_cfg = OmegaConf.merge(cfg.split, {"name": splits.name})
    inner_kind = "by board" if "by board" in fitted.cv_desc else ("by pin, leaky" if fitted.leaky else "by pin")
    repins = repins_settings(str(cfg.repins.mode), cfg.repins.threshold, bool(cfg.repins.keep_one))
    exclusion = exclusion_settings(config.select(cfg, "audit.exclude"), str(config.select(cfg, "audit.exclude_from")))
    run_protocol = protocol(protocol_settings(split_cfg, cfg.sampling.max_per_category, int(cfg.sampling.seed),
                                              inner_kind, repins, exclusion),
                            meta.get("fingerprint", {}).get("rows_sha256", ""))
    params = {
        "backbone": str(cfg.backbone.name), "classifier": str(cfg.classifier.name), "split": splits.name,
        "split_seed": int(cfg.split.seed), "test_size": cfg.split.get("test_size"), "folds": len(splits.folds),
        "inner_cv": fitted.cv_desc, "protocol": run_protocol, "scoring": str(cfg.train.scoring), "ci": ci_desc,
        "sampling_max_per_category": cfg.sampling.max_per_category, "sampling_seed": int(cfg.sampling.seed),
        "preprocess": "+".join(f"pca{cfg.preprocess.pca_components}" if s == "pca" else str(s)
                               for s in cfg.preprocess.steps) or "none",
        "n_samples": len(frame), "n_test": int(sum(len(te) for _, te in splits.folds)), "n_classes": len(categories),
        "embeddings": str(folder), "embeddings_meta_sha256": file_sha256(folder / META),
        "timm_id": meta.get("timm_id"), "seed": int(cfg.seed),
        # how the features were computed: extract.runtime and the precision used
        "extract_runtime": meta.get("extract", {}).get("runtime", "torch"),
        "extract_amp": meta.get("extract", {}).get("amp"), "repins_keep_one": bool(cfg.repins.keep_one),
        **repin_info,
        **estimator_params(fitted.search.best_estimator_),  # every setting of the model, searched or not
        **fitted.best_params,
    }
    if splits.info.get("single_board_categories"):
        params["single_board_categories"] = ",".join(splits.info["single_board_categories"])
    return params


def _log_run(run, cfg, params, metrics, out: Path, model, store_meta: Path, extra_tags: dict,
             example_image: str) -> None:
    with run.logging() as active:
        if not active:
            return
        import mlflow

        mlflow.set_tags(extra_tags)
        mlflow.log_params({k: ("null" if v is None else v) for k, v in params.items()})
        mlflow.log_metrics(metrics)
        for f in ("predictions.csv", "classification_report.txt", "cv_results.csv", "metrics.json", "split.csv"):
            mlflow.log_artifact(str(out / f))
        mlflow.log_artifact(str(out / "confusion_matrix.png"), "plots")
        mlflow.log_artifact(str(store_meta))  # what predict needs to rebuild the backbone
        log_model(model)
        if cfg.train.log_pipeline:
            log_pipeline(model, store_meta, out, example_image)


@verb_main("train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
