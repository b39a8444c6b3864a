"""``python -m pinterest_cls.cluster backbone=NAME``: faiss k-means on stored embeddings, scored against the
categories, with a 2-D projection, a cluster x category composition table and saved centroids."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from . import config
from .cli import verb_main
from .errors import UserError
from .estimators import FaissKMeans, projection
from .evaluation import clustering_metrics
from .plots import scatter_plot
from .store import open_store
from .tracking import mlflow_run

log = logging.getLogger(__name__)


def cluster(cfg: DictConfig) -> dict:
    from sklearn.preprocessing import normalize

    c = cfg.cluster
    t0 = time.perf_counter()
    emb, index, meta, folder = open_store(cfg)
    rows = index[index["embedded"]].reset_index(drop=True)
    seed = int(c.seed)
    if c.max_rows and len(rows) > int(c.max_rows):
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), int(c.max_rows), replace=False))
        rows = rows.iloc[keep].reset_index(drop=True)
    X = np.asarray(emb[rows["row"].to_numpy()], dtype=np.float32)
    if c.l2:
        X = normalize(X).astype(np.float32)
    categories = rows["category"].astype(str).to_numpy()
    labelled = len(set(categories) - {""}) >= 2
    k = int(c.k) if c.k else len(set(categories))
    if not 2 <= k <= len(X):
        raise UserError(f"cluster.k={k} must be between 2 and the number of embedded pins ({len(X)})")
    with mlflow_run(cfg, f"{cfg.backbone.name}-kmeans{k}", "cluster", {"backbone": str(cfg.backbone.name)},
                    embeddings=(folder, meta, "cluster")) as run:
        t_fit = time.perf_counter()
        km = FaissKMeans(n_clusters=k, n_init=int(c.restarts), max_iter=int(c.iterations), spherical=bool(c.spherical),
                         random_state=seed).fit(X)
        fit_s = time.perf_counter() - t_fit
        assign = km.labels_
        rng = np.random.default_rng(seed)
        scores = clustering_metrics(X, assign, categories if labelled else None, rng, int(c.silhouette_sample),
                                    bool(c.l2), seed)
        metrics = {"objective": km.objective_, "fit_time_s": fit_s, **scores}

        out = config.job_output_dir()
        composition = pd.crosstab(pd.Series(assign, name="cluster"), pd.Series(categories, name="category"))
        composition.to_csv(out / "composition.csv")
        _plots(cfg, out, X, assign, categories, rng, k)
        model_dir = _save_model(folder / "clusters" / f"k{k}", km, rows, metrics)

        log.info(f"cluster {cfg.backbone.name}: k={k}, {len(X)} pins, " +
                 ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
        for cl, row in composition.iterrows():
            parts = [f"{n} {cat}" for cat, n in row.sort_values(ascending=False).items() if n > 0]
            log.info(f"  cluster {cl}: " + ", ".join(parts))
        log.info(f"  centroids and model in {model_dir}; plots in {out}")

        params = {"backbone": str(cfg.backbone.name), "k": k, "restarts": int(c.restarts),
                  "iterations": int(c.iterations), "spherical": bool(c.spherical), "l2": bool(c.l2), "n": len(X),
                  "projection": str(c.projection),
                  "embeddings": str(folder), "seed": seed}
        _log_run(run, params, metrics, out, model_dir)
    return {"metrics": metrics, "composition": composition, "model_dir": model_dir, "output_dir": out,
            "run_id": run.run_id, "elapsed_s": time.perf_counter() - t0}


def _plots(cfg: DictConfig, out: Path, X: np.ndarray, assign: np.ndarray, categories: np.ndarray, rng, k: int):
    """The projection of a sample, coloured by cluster and by category."""
    c, seed = cfg.cluster, int(cfg.cluster.seed)
    proj_idx = np.sort(rng.choice(len(X), min(len(X), int(c.projection_sample)), replace=False))
    xy = projection(X[proj_idx], str(c.projection), seed)
    title = f"{cfg.backbone.name}: {c.projection} of {len(proj_idx)} pins, coloured by"
    scatter_plot(xy, [f"cluster {a}" for a in assign[proj_idx]], out / "projection_by_cluster.png",
                 f"{title} k-means cluster (k={k})", palette="Dark2" if k <= 8 else "tab20b", legend_title="cluster")
    scatter_plot(xy, categories[proj_idx], out / "projection_by_category.png", f"{title} category",
                 legend_title="category")


def _save_model(model_dir: Path, km, rows: pd.DataFrame, metrics: dict) -> Path:
    """Centroids, the fitted estimator, the assignments and the metrics, beside the store."""
    import joblib

    model_dir.mkdir(parents=True, exist_ok=True)
    np.save(model_dir / "centroids.npy", km.cluster_centers_)
    joblib.dump(km, model_dir / "kmeans.joblib")
    pd.DataFrame({"row": rows["row"], "cluster": km.labels_}).to_parquet(model_dir / "assignments.parquet",
                                                                         index=False)
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return model_dir


def _log_run(run, params: dict, metrics: dict, out, model_dir) -> None:
    with run.logging() as active:
        if not active:
            return
        import mlflow

        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(out / "composition.csv"))
        mlflow.log_artifact(str(out / "projection_by_cluster.png"), "plots")
        mlflow.log_artifact(str(out / "projection_by_category.png"), "plots")
        mlflow.log_artifact(str(model_dir / "centroids.npy"))
        mlflow.log_artifact(str(model_dir / "kmeans.joblib"))


@verb_main("cluster")
def main(cfg: DictConfig) -> None:
    cluster(cfg)


if __name__ == "__main__":
    main()
