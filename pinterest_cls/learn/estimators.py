"""Every scikit-learn estimator of the package, and the pipeline and grid search built from the config.

``FaissKNN`` and ``TorchMLP`` (classifiers) and ``FaissKMeans`` (a clusterer and transformer) are
scikit-learn estimators. They validate their parameters from ``_parameter_constraints``, check their input
with ``validate_data``, and pass every check of ``sklearn.utils.estimator_checks`` (``tests/test_estimators.py``).
A check that could not apply would be named, with the reason, in the estimator's ``EXPECTED_FAILED_CHECKS``;
none is. So they compose with Pipeline, GridSearchCV, clone and joblib. The configs in ``conf/classifier/``
instantiate them (or scikit-learn's LinearSVC, LogisticRegression, RandomForestClassifier) with ``_target_``.
"""

from __future__ import annotations

import logging
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, ClusterMixin, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pinterest_cls.core.errors import UserError
from pinterest_cls.embed.device import resolve_device

log = logging.getLogger(__name__)
#: Rows per forward pass of ``TorchMLP.predict_proba`` (every pass of this one shape).
PREDICT_BLOCK = 256

VOTES = ("uniform", "distance", "softmax")


class FaissKNN(ClassifierMixin, BaseEstimator):
    """k-nearest-neighbour classifier on faiss exact search.

    ``metric="ip"`` (inner product; cosine similarity on L2-normalised features, the default preprocessing)
    or ``"l2"``. Votes: ``uniform``; ``distance`` (1 / Euclidean distance, as scikit-learn's
    ``weights="distance"``); ``softmax``: exp(similarity / ``temperature``), as in DINO's kNN (T = 0.07).
    scikit-learn's kd_tree degenerates to a slow brute force in 1000+ dimensions; faiss' flat index is a
    BLAS matrix product.
    """

    _parameter_constraints = {
        "k": [Interval(Integral, 1, None, closed="left")],
        "weights": [StrOptions(set(VOTES))],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "metric": [StrOptions({"ip", "l2"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, k: int = 10, weights: str = "uniform", temperature: float = 0.07, metric: str = "ip",
                 batch_size: int = 4096):
        self.k = k
        self.weights = weights
        self.temperature = temperature
        self.metric = metric
        self.batch_size = batch_size

    def fit(self, X, y):
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, self.y_ = np.unique(y, return_inverse=True)
        self.X_ = np.ascontiguousarray(X, dtype=np.float32)
        self._index = self._build_index()
        return self

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_index", None)  # faiss indexes do not pickle: rebuilt when unpickled
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "X_" in state:
            self._index = self._build_index()

    def _build_index(self):
        import faiss

        index = faiss.IndexFlatIP(self.X_.shape[1]) if self.metric == "ip" else faiss.IndexFlatL2(self.X_.shape[1])
        index.add(self.X_)
        return index

    def kneighbors(self, X, k: int | None = None):
        """(similarities or squared distances, indices) of the k nearest training rows, best first."""
        check_is_fitted(self, "X_")
        X = np.ascontiguousarray(validate_data(self, X, dtype=np.float32, reset=False))
        k = min(int(k or self.k), len(self.X_))
        index = self._index
        out_d, out_i = [], []
        for start in range(0, len(X), self.batch_size):
            d, i = index.search(X[start:start + self.batch_size], k)
            out_d.append(d)
            out_i.append(i)
        return np.concatenate(out_d), np.concatenate(out_i)

    def predict_proba(self, X):
        scores, idx = self.kneighbors(X)
        # faiss returns similarities (ip) or squared distances (l2); Euclidean distance on unit vectors for ip
        dist = np.sqrt(np.maximum(2.0 - 2.0 * scores, 0.0) if self.metric == "ip" else np.maximum(scores, 0.0))
        if self.weights == "uniform":
            w = np.ones_like(scores)
        elif self.weights == "distance":
            w = 1.0 / np.maximum(dist, 1e-12)
        else:
            logits = (scores if self.metric == "ip" else -dist) / self.temperature
            w = np.exp(logits - logits.max(axis=1, keepdims=True))
        votes = np.zeros((len(scores), len(self.classes_)), dtype=np.float64)
        np.add.at(votes, (np.repeat(np.arange(len(scores)), idx.shape[1]), self.y_[idx].ravel()), w.ravel())
        return votes / votes.sum(axis=1, keepdims=True)

    def predict(self, X):
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class TorchMLP(ClassifierMixin, BaseEstimator):
    """One-hidden-layer perceptron in PyTorch (hidden ``hidden``, ReLU, Adam), early stopping on a
    stratified validation slice (best epoch kept), on the GPU when there is one. Seeded: the same data and
    ``random_state`` give the same model on CPU."""

    _parameter_constraints = {
        "hidden": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "patience": [Interval(Integral, 1, None, closed="left")],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "device": [str],
        "random_state": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, hidden: int = 200, lr: float = 1e-3, batch_size: int = 64, max_epochs: int = 200,
                 patience: int = 10, validation_fraction: float = 0.1, weight_decay: float = 0.0,
                 device: str = "auto", random_state: int = 0):
        self.hidden = hidden
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.weight_decay = weight_decay
        self.device = device
        self.random_state = random_state

    def _device(self):
        return resolve_device(str(self.device), key="classifier.device")

    def _net(self, n_in: int, n_out: int):
        from torch import nn

        return nn.Sequential(nn.Linear(n_in, self.hidden), nn.ReLU(), nn.Linear(self.hidden, n_out))

    def fit(self, X, y):
        import torch
        from sklearn.model_selection import train_test_split

        self._validate_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        counts = np.bincount(y_idx)
        stratify = y_idx if counts.min() >= 2 and int(len(y) * self.validation_fraction) >= len(counts) else None
        tr, va = train_test_split(np.arange(len(y)), test_size=self.validation_fraction,
                                  random_state=self.random_state, stratify=stratify)
        device = self._device()
        gen = torch.Generator().manual_seed(int(self.random_state))
        torch.manual_seed(int(self.random_state))
        net = self._net(X.shape[1], len(self.classes_)).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        Xt, yt = torch.from_numpy(X[tr]).to(device), torch.from_numpy(y_idx[tr]).long().to(device)
        Xv, yv = torch.from_numpy(X[va]).to(device), torch.from_numpy(y_idx[va]).long().to(device)
        best, best_state, stale = np.inf, None, 0
        self.loss_curve_, self.validation_loss_curve_ = [], []
        for _epoch in range(self.max_epochs):
            net.train()
            order = torch.randperm(len(Xt), generator=gen).to(device)
            total = 0.0
            for start in range(0, len(order), self.batch_size):
                b = order[start:start + self.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(Xt[b]), yt[b])
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b)
            net.eval()
            with torch.no_grad():
                val = float(loss_fn(net(Xv), yv))
            self.loss_curve_.append(total / len(Xt))
            self.validation_loss_curve_.append(val)
            if val < best - 1e-6:
                best, stale = val, 0
                # numpy, not tensors: the fitted model then saves in skops' safe format (serving.log_model)
                best_state = {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}
            else:
                stale += 1
                if stale >= self.patience:
                    break
        self.state_ = best_state
        self.best_validation_loss_ = best
        self.n_epochs_ = len(self.loss_curve_)
        return self

    def predict_proba(self, X):
        import torch

        check_is_fitted(self, "state_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        device = self._device()
        net = self._net(self.n_features_in_, len(self.classes_))
        net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in self.state_.items()})
        net.to(device).eval()
        out = []
        # blocks of one fixed shape, the last one padded: a row's probabilities are then the same whatever rows
        # are predicted with it (a matmul's last bits depend on its shape, e.g. on oneDNN with AMX)
        block = PREDICT_BLOCK
        with torch.no_grad():
            for start in range(0, len(X), block):
                part = X[start:start + block]
                padded = np.zeros((block, X.shape[1]), np.float32)
                padded[:len(part)] = part
                logits = net(torch.from_numpy(padded).to(device))[:len(part)]
                out.append(torch.softmax(logits, dim=1).cpu())
        if not out:
            return np.zeros((0, len(self.classes_)))
        return torch.cat(out).numpy().astype(np.float64)

    def predict(self, X):
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def class_scores(estimator, X) -> np.ndarray | None:
    """(n, n_classes) scores for ranking metrics: probabilities where the estimator has them, else its
    decision function (a binary decision function becomes two columns); None when it has neither."""
    if hasattr(estimator, "predict_proba"):
        try:
            return np.asarray(estimator.predict_proba(X))
        except AttributeError:  # e.g. SVC(probability=False) exposes predict_proba but refuses it
            pass
    if hasattr(estimator, "decision_function"):
        s = np.asarray(estimator.decision_function(X))
        return np.column_stack([-s, s]) if s.ndim == 1 else s
    return None


class FaissKMeans(ClusterMixin, TransformerMixin, BaseEstimator):
    """k-means with faiss: ``n_init`` restarts (the best objective is kept), optionally spherical (centroids
    renormalised, for L2-normalised features). A scikit-learn clusterer (fit / predict / fit_predict) and
    transformer, as scikit-learn's KMeans: ``transform`` gives the squared distances to the centroids. It
    pickles (joblib), so new embeddings can be assigned to the clusters later."""

    _parameter_constraints = {
        "n_clusters": [Interval(Integral, 1, None, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "spherical": ["boolean"],
        "random_state": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, n_clusters: int = 8, n_init: int = 5, max_iter: int = 50, spherical: bool = True,
                 random_state: int = 0):
        self.n_clusters = n_clusters
        self.n_init = n_init
        self.max_iter = max_iter
        self.spherical = spherical
        self.random_state = random_state

    def fit(self, X, y=None):
        import faiss

        self._validate_params()
        X = np.ascontiguousarray(validate_data(self, X, dtype=np.float32))
        if not 1 <= self.n_clusters <= len(X):
            raise ValueError(f"n_clusters={self.n_clusters} must be between 1 and the number of samples ({len(X)})")
        km = faiss.Kmeans(X.shape[1], int(self.n_clusters), niter=int(self.max_iter), nredo=int(self.n_init),
                          spherical=bool(self.spherical), seed=int(self.random_state), verbose=False,
                          max_points_per_centroid=max(256, -(-len(X) // int(self.n_clusters))),
                          min_points_per_centroid=1)  # every point is used: faiss' "provide more points" is moot
        km.train(X)
        self.cluster_centers_ = np.asarray(km.centroids, dtype=np.float32)
        self.objective_ = float(km.obj[-1]) if len(km.obj) else float("nan")
        self.n_iter_ = int(self.max_iter)  # faiss runs every iteration of each restart
        self.labels_ = self._assign(X)
        return self

    def transform(self, X):
        """Squared Euclidean distances to every centroid."""
        check_is_fitted(self, "cluster_centers_")
        X = validate_data(self, X, dtype=np.float32, reset=False)
        c = self.cluster_centers_
        return (X * X).sum(1, keepdims=True) - 2 * X @ c.T + (c * c).sum(1)[None, :]

    def predict(self, X):
        check_is_fitted(self, "cluster_centers_")
        return self._assign(np.ascontiguousarray(validate_data(self, X, dtype=np.float32, reset=False)))

    def _assign(self, X: np.ndarray) -> np.ndarray:
        import faiss

        index = faiss.IndexFlatL2(self.cluster_centers_.shape[1])
        index.add(self.cluster_centers_)
        return index.search(X, 1)[1][:, 0].astype(np.int64)


def projection(X: np.ndarray, method: str, seed: int) -> np.ndarray:
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(X)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(X) - 1) / 3)))
        return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(X)
    raise UserError(f"cluster.projection={method!r} must be tsne or pca")
