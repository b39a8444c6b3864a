"""``python -m pinterest_cls.cluster backbone=NAME``: faiss k-means on stored embeddings, scored against the
categories, with a 2-D projection, a cluster x category composition table and saved centroids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.utils.validation import check_array, check_is_fitted

from . import config
from .errors import UserError, user_errors_exit


class FaissKMeans(ClusterMixin, BaseEstimator):
    """k-means with faiss: ``n_init`` restarts (the best objective is kept), optionally spherical (centroids
    renormalised, for L2-normalised features). A scikit-learn estimator: fit / predict / transform, and it
    pickles (joblib), so new embeddings can be assigned to the clusters later."""

    def __init__(self, n_clusters: int = 8, n_init: int = 5, max_iter: int = 50, spherical: bool = True,
                 random_state: int = 0):
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.max_iter = max_iter
        self.spherical = spherical
        self.random_state = random_state

    def fit(self, X, y=None):
        import faiss

        X = np.ascontiguousarray(check_array(X, dtype=np.float32))
        if not 1 <= self.n_clusters <= len(X):
            raise ValueError(f"n_clusters={self.n_clusters} must be between 1 and the number of samples ({len(X)})")
        km = faiss.Kmeans(X.shape[1], int(self.n_clusters), niter=int(self.max_iter), nredo=int(self.n_init),
                          spherical=bool(self.spherical), seed=int(self.random_state), verbose=False,
                          max_points_per_centroid=max(256, -(-len(X) // int(self.n_clusters))))
        km.train(X)
        self.cluster_centers_ = np.asarray(km.centroids, dtype=np.float32)
        self.objective_ = float(km.obj[-1]) if len(km.obj) else float("nan")
        self.labels_ = self.predict(X)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        """Squared Euclidean distances to every centroid."""
        check_is_fitted(self, "cluster_centers_")
        X = check_array(X, dtype=np.float32)
        c = self.cluster_centers_
        return (X * X).sum(1, keepdims=True) - 2 * X @ c.T + (c * c).sum(1)[None, :]

    def predict(self, X):
        import faiss

        check_is_fitted(self, "cluster_centers_")
        X = np.ascontiguousarray(check_array(X, dtype=np.float32))
        index = faiss.IndexFlatL2(self.cluster_centers_.shape[1])
        index.add(self.cluster_centers_)
        return index.search(X, 1)[1][:, 0].astype(np.int64)


def purity(labels_true, labels_pred) -> float:
    table = pd.crosstab(labels_pred, labels_true)
    return float(table.max(axis=1).sum() / table.to_numpy().sum())


def projection(X: np.ndarray, method: str, seed: int) -> np.ndarray:
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(X)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(X) - 1) / 3)))
        return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(X)
    raise UserError(f"cluster.projection={method!r} must be tsne or pca")


def scatter_plot(xy: np.ndarray, labels, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels).astype(str)
    names = sorted(set(labels), key=lambda v: (len(v), v))
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for i, name in enumerate(names):
        m = labels == name
        ax.scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.75, color=cmap(i % cmap.N), label=name)
    if len(names) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cluster(cfg: DictConfig) -> dict:
    import joblib
    from sklearn import metrics as skm
    from sklearn.preprocessing import normalize

    from .train import open_store

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
    km = FaissKMeans(n_clusters=k, n_init=int(c.restarts), max_iter=int(c.iterations), spherical=bool(c.spherical),
                     random_state=seed).fit(X)
    assign = km.labels_
    metrics = {"objective": km.objective_}
    if labelled:
        metrics.update({
            "nmi": skm.normalized_mutual_info_score(categories, assign),
            "ari": skm.adjusted_rand_score(categories, assign),
            "homogeneity": skm.homogeneity_score(categories, assign),
            "completeness": skm.completeness_score(categories, assign),
            "purity": purity(categories, assign),
        })
    rng = np.random.default_rng(seed)
    sil = rng.choice(len(X), min(len(X), int(c.silhouette_sample)), replace=False)
    if len(set(assign[sil])) >= 2:
        metric = "cosine" if c.l2 else "euclidean"
        metrics["silhouette"] = float(skm.silhouette_score(X[sil], assign[sil], metric=metric, random_state=seed))
    metrics = {m: float(v) for m, v in metrics.items()}

    out = config.job_output_dir()
    composition = pd.crosstab(pd.Series(assign, name="cluster"), pd.Series(categories, name="category"))
    composition.to_csv(out / "composition.csv")
    proj_idx = np.sort(rng.choice(len(X), min(len(X), int(c.projection_sample)), replace=False))
    xy = projection(X[proj_idx], str(c.projection), seed)
    title = f"{cfg.backbone.name}: k-means k={k}, {c.projection} of {len(proj_idx)} pins"
    scatter_plot(xy, [f"cluster {a}" for a in assign[proj_idx]], out / "projection_by_cluster.png", title)
    scatter_plot(xy, categories[proj_idx], out / "projection_by_category.png", title)
    model_dir = folder / "clusters" / f"k{k}"
    model_dir.mkdir(parents=True, exist_ok=True)
    np.save(model_dir / "centroids.npy", km.cluster_centers_)
    joblib.dump(km, model_dir / "kmeans.joblib")
    pd.DataFrame({"row": rows["row"], "cluster": assign}).to_parquet(model_dir / "assignments.parquet", index=False)
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))

    print(f"cluster {cfg.backbone.name}: k={k}, {len(X)} pins, " +
          ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()), flush=True)
    for cl, row in composition.iterrows():
        parts = [f"{n} {cat}" for cat, n in row.sort_values(ascending=False).items() if n > 0]
        print(f"  cluster {cl}: " + ", ".join(parts))
    print(f"  centroids and model in {model_dir}; plots in {out}", flush=True)

    params = {"backbone": str(cfg.backbone.name), "k": k, "restarts": int(c.restarts), "iterations": int(c.iterations),
              "spherical": bool(c.spherical), "l2": bool(c.l2), "n": len(X), "projection": str(c.projection),
              "embeddings": str(folder), "seed": seed}
    from .tracking import mlflow_run

    tags = {"verb": "cluster", "backbone": str(cfg.backbone.name)}
    with mlflow_run(cfg, f"{cfg.backbone.name}-kmeans{k}", tags=tags) as run:
        if run is not None:
            import mlflow

            mlflow.log_params(params)
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(out / "composition.csv"))
            mlflow.log_artifact(str(out / "projection_by_cluster.png"), "plots")
            mlflow.log_artifact(str(out / "projection_by_category.png"), "plots")
            mlflow.log_artifact(str(model_dir / "centroids.npy"))
            mlflow.log_artifact(str(model_dir / "kmeans.joblib"))
    return {"metrics": metrics, "composition": composition, "model_dir": model_dir, "output_dir": out,
            "run_id": run.info.run_id if run is not None else None, "elapsed_s": time.perf_counter() - t0}


@hydra.main(config_path=config.CONF_DIR, config_name="cluster", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    cluster(cfg)


if __name__ == "__main__":
    main()
