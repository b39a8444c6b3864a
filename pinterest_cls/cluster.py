"""``python -m pinterest_cls.cluster backbone=NAME``: faiss k-means on stored embeddings, scored against the
categories, with a 2-D projection, a cluster x category composition table and saved centroids."""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pinterest_cls.analysis.outputs import projection_plots, save_clustering
from pinterest_cls.core import config
from pinterest_cls.core.cli import verb_main
from pinterest_cls.core.errors import UserError
from pinterest_cls.data.store import store_for
from pinterest_cls.learn.estimators import FaissKMeans
from pinterest_cls.learn.metrics import clustering_metrics
from pinterest_cls.track.tracking import mlflow_run

log = logging.getLogger(__name__)


def cluster(cfg: DictConfig) -> dict:
    """k-means of the store of ``backbone``; returns {"metrics", "composition", "model_dir", "output_dir",
    "run_id", "elapsed_s"}."""
    c = cfg.cluster
    t0 = time.perf_counter()
    store = store_for(cfg)
    rows = store.embedded()
    seed = int(c.seed)
    if c.max_rows and len(rows) > int(c.max_rows):
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), int(c.max_rows), replace=False))
        rows = rows.iloc[keep].reset_index(drop=True)
    X = store.vectors_of(rows)
    if c.l2:
        from sklearn.preprocessing import normalize

        X = normalize(X).astype(np.float32)
    categories = rows["category"].astype(str).to_numpy()
    labelled = len(set(categories) - {""}) >= 2
    k = int(c.k) if c.k else len(set(categories))
    if not 2 <= k <= len(X):
        raise UserError(f"cluster.k={k} must be between 2 and the number of embedded pins ({len(X)})")
    with mlflow_run(cfg, f"{cfg.backbone.name}-kmeans{k}", "cluster", {"backbone": str(cfg.backbone.name)},
                    embeddings=(store.folder, store.meta.fingerprint, "cluster")) as run:
        t_fit = time.perf_counter()
        km = FaissKMeans(n_clusters=k, n_init=int(c.restarts), max_iter=int(c.iterations), spherical=bool(c.spherical),
                         random_state=seed).fit(X)
        fit_s = time.perf_counter() - t_fit
        scores = clustering_metrics(X, km.labels_, categories if labelled else None, np.random.default_rng(seed),
                                    int(c.silhouette_sample), bool(c.l2), seed)
        metrics = {"objective": km.objective_, "fit_time_s": fit_s, **scores}
        out = config.job_output_dir()
        composition = pd.crosstab(pd.Series(km.labels_, name="cluster"), pd.Series(categories, name="category"))
        composition.to_csv(out / "composition.csv")
        projection_plots(out, X, km.labels_, categories, str(c.projection), int(c.projection_sample),
                         str(cfg.backbone.name), seed)
        model_dir = save_clustering(store.folder / "clusters" / f"k{k}", km, rows, metrics)
        log.info(f"cluster {cfg.backbone.name}: k={k}, {len(X)} pins, " +
                 ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
        for cl, row in composition.iterrows():
            parts = [f"{n} {cat}" for cat, n in row.sort_values(ascending=False).items() if n > 0]
            log.info(f"  cluster {cl}: " + ", ".join(parts))
        log.info(f"  centroids and model in {model_dir}; plots in {out}")
        params = {"backbone": str(cfg.backbone.name), "k": k, "restarts": int(c.restarts),
                  "iterations": int(c.iterations), "spherical": bool(c.spherical), "l2": bool(c.l2), "n": len(X),
                  "projection": str(c.projection), "embeddings": str(store.folder), "seed": seed}
        run.log(params=params, metrics=metrics, artifacts={
            out / "composition.csv": "", out / "projection_by_cluster.png": "plots",
            out / "projection_by_category.png": "plots", model_dir / "centroids.npy": "",
            model_dir / "kmeans.joblib": ""})
    return {"metrics": metrics, "composition": composition, "model_dir": model_dir, "output_dir": out,
            "run_id": run.run_id, "elapsed_s": time.perf_counter() - t0}


@verb_main("cluster")
def main(cfg: DictConfig) -> None:
    cluster(cfg)


if __name__ == "__main__":
    main()
