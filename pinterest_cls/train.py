"""``python -m pinterest_cls.train backbone=NAME classifier=NAME``: a classifier on stored embeddings, with
grid search, held-out (or k-fold) evaluation and everything logged to MLflow."""

from __future__ import annotations

import logging
import shutil
import time

from omegaconf import DictConfig

from pinterest_cls.analysis.exclusions import apply_exclusions
from pinterest_cls.analysis.outputs import BOARD_FILES, TRAIN_FILES, write_board_outputs, write_train_outputs
from pinterest_cls.core import config
from pinterest_cls.core.cli import verb_main
from pinterest_cls.core.errors import UserError
from pinterest_cls.data.metadata import META
from pinterest_cls.data.store import store_for
from pinterest_cls.learn.fitting import board_results, fit_and_test, run_params
from pinterest_cls.learn.metrics import bootstrap_metrics, summary
from pinterest_cls.learn.splits import board_keys, has_boards, sample_rows, split_for_run, split_table
from pinterest_cls.serving.model_io import EMBEDDINGS_INT8, EMBEDDINGS_META, copy_int8_model, log_model
from pinterest_cls.serving.pyfunc import log_pipeline
from pinterest_cls.track.tracking import mlflow_run

log = logging.getLogger(__name__)


def train(cfg: DictConfig, progress: bool = True) -> dict:
    """Run one training job; returns {"metrics", "params", "run_id", "output_dir"}."""
    t0 = time.perf_counter()
    store = store_for(cfg)
    frame = sample_rows(store.pins, cfg.sampling.max_per_category, int(cfg.sampling.seed))
    categories = sorted(frame["category"].unique())
    if len(categories) < 2:
        raise UserError(f"only {len(categories)} category left after filtering ({', '.join(categories) or 'none'}); "
                        "a classifier needs at least two: check data.reject_categories and the scan report")
    X = store.vectors_of(frame)
    y = frame["category"].to_numpy().astype(str)
    splits, groups, extra = split_for_run(cfg, frame, X, y, store, progress)
    splits, excluded = apply_exclusions(cfg, frame, splits, store.meta.rows_sha256)
    out = config.job_output_dir()
    split_table(frame, splits, groups).to_csv(out / "split.csv", index=False)
    name = f"{cfg.backbone.name}-{cfg.classifier.name}"
    log.info(f"train {name}: {len(frame)} pins, {len(categories)} categories, {X.shape[1]}-d, split={splits.name}")
    tags = {"backbone": str(cfg.backbone.name), "classifier": str(cfg.classifier.name), "split": splits.name}
    with mlflow_run(cfg, name, "train", tags, embeddings=(store.folder, store.meta.fingerprint, "train")) as run:
        fitted = fit_and_test(cfg, X, y, frame, splits, groups)
        metrics = fitted.metrics()
        by_board = splits.grouped or has_boards(cfg)
        intervals, ci_desc = bootstrap_metrics(fitted.predictions, board_keys(fitted.predictions) if by_board
                                               else None, int(config.select(cfg, "train.bootstrap") or 0),
                                               int(cfg.seed))
        metrics.update(intervals)
        boards = board_results(cfg, fitted, X, y, frame, splits) if has_boards(cfg) else None
        if boards is not None:
            metrics.update(boards.metrics)
            write_board_outputs(out, boards, name)
            extra = {**extra, **boards.params()}
        write_train_outputs(out, fitted, categories, f"{name}, split={splits.name}", metrics)
        params = run_params(cfg, store, frame, splits, fitted, {**extra, **excluded, "ci": ci_desc})
        shutil.copyfile(store.folder / META, out / EMBEDDINGS_META)  # what predict needs to rebuild the backbone
        int8 = copy_int8_model(store, out / EMBEDDINGS_INT8)  # and the int8 model, on int8 embeddings
        model = fitted.search.best_estimator_

        def log_models() -> None:
            log_model(model)
            if cfg.train.log_pipeline:
                log_pipeline(model, out / EMBEDDINGS_META, out, str(frame["path"].iloc[0]))

        run.log(params=params, metrics=metrics, tags={"leaky_inner_cv": "true"} if fitted.leaky else {},
                artifacts={**{out / f: "" for f in (*TRAIN_FILES, *(BOARD_FILES if boards else ()),
                                                    EMBEDDINGS_META)},
                           **{f: EMBEDDINGS_INT8 for f in int8},
                           out / "confusion_matrix.png": "plots",
                           **({out / "board_curve.png": "plots"} if boards is not None else {})}, then=log_models)
    shown = ("test_accuracy", "test_f1_macro", "test_balanced_accuracy", "test_board_vote_accuracy",
             "test_board_mean_prob_accuracy", "test_board_mean_embedding_accuracy", f"cv_{cfg.train.scoring}")
    log.info(f"{name}: best {fitted.best_params}; {summary(metrics, shown)} ({time.perf_counter() - t0:.1f} s)")
    log.info(f"  artifacts in {out}" + (f"; MLflow run {run.run_id}" if run.run_id else ""))
    return {"metrics": metrics, "params": params, "run_id": run.run_id, "output_dir": out}


@verb_main("train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
