"""The files a run leaves in its job folder for people to look at: a train run's report, CV table and confusion
matrix; a clustering's projection plots, composition and saved model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pinterest_cls.learn.board_rules import BOARD_CURVE, BOARDS_FILE
from pinterest_cls.learn.estimators import projection
from pinterest_cls.learn.fitting import BoardResults, FoldResults
from pinterest_cls.track.plots import board_curve_plot, confusion_plot, scatter_plot

#: What a train run writes into its job folder (and logs to MLflow), beside the plots.
TRAIN_FILES = ("predictions.csv", "classification_report.txt", "cv_results.csv", "metrics.json", "split.csv")


def write_train_outputs(out: Path, fitted: FoldResults, categories: list[str], title: str, metrics: dict) -> None:
    """``predictions.csv``, ``classification_report.txt``, ``cv_results.csv``, ``metrics.json`` and
    ``confusion_matrix.png`` (titled ``title``) in ``out``."""
    from sklearn.metrics import classification_report

    preds = fitted.predictions
    preds.to_csv(out / "predictions.csv", index=False)
    report_txt = classification_report(preds["truth"], preds["prediction"], zero_division=0, digits=4)
    (out / "classification_report.txt").write_text(report_txt)
    pd.DataFrame(fitted.search.cv_results_).drop(columns=["params"]).to_csv(out / "cv_results.csv", index=False)
    confusion_plot(preds["truth"], preds["prediction"], categories, out / "confusion_matrix.png",
                   title=f"{title}: accuracy {metrics['test_accuracy']:.3f}, macro F1 {metrics['test_f1_macro']:.3f}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


#: What a train run on data with boards adds: each test board's predictions by every rule, the pins-per-board
#: curve and the abstention threshold (plus ``board_curve.png``).
TEST_BOARDS = "test_boards.csv"
BOARD_FILES = (TEST_BOARDS, BOARD_CURVE, BOARDS_FILE)


def write_board_outputs(out: Path, boards: BoardResults, title: str) -> None:
    """``test_boards.csv``, ``board_curve.csv`` with ``board_curve.png``, and ``boards.json`` (the rules'
    metrics and the abstention threshold, which ``predict`` reads) in ``out``."""
    boards.table.to_csv(out / TEST_BOARDS, index=False)
    boards.curve.to_csv(out / BOARD_CURVE, index=False)
    board_curve_plot(boards.curve, out / "board_curve.png",
                     f"{title}: {len(boards.table)} test boards, {int(boards.curve['draws'].max())} draws per point")
    record = {"metrics": boards.metrics, "temperature": boards.temperature,
              "abstention": boards.abstention.as_dict() if boards.abstention is not None else None}
    (out / BOARDS_FILE).write_text(json.dumps(record, indent=2))


def projection_plots(out: Path, X: np.ndarray, assign: np.ndarray, categories: np.ndarray, method: str,
                     sample: int, title: str, seed: int) -> None:
    """The ``method`` projection (tsne | pca) of a seeded sample of ``sample`` rows of ``X``, coloured by cluster
    (``projection_by_cluster.png``) and by category (``projection_by_category.png``)."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(X), min(len(X), sample), replace=False))
    xy = projection(X[pick], method, seed)
    k = len(np.unique(assign))
    title = f"{title}: {method} of {len(pick)} pins, coloured by"
    scatter_plot(xy, [f"cluster {a}" for a in assign[pick]], out / "projection_by_cluster.png",
                 f"{title} k-means cluster (k={k})", palette="Dark2" if k <= 8 else "tab20b", legend_title="cluster")
    scatter_plot(xy, categories[pick], out / "projection_by_category.png", f"{title} category",
                 legend_title="category")


def save_clustering(model_dir: Path, km, rows: pd.DataFrame, metrics: dict) -> Path:
    """Centroids, the fitted estimator, the assignments (store row -> cluster) and the metrics, in
    ``model_dir``."""
    import joblib

    model_dir.mkdir(parents=True, exist_ok=True)
    np.save(model_dir / "centroids.npy", km.cluster_centers_)
    joblib.dump(km, model_dir / "kmeans.joblib")
    pd.DataFrame({"row": rows["row"], "cluster": km.labels_}).to_parquet(model_dir / "assignments.parquet",
                                                                         index=False)
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return model_dir
