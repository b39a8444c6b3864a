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
import time
from dataclasses import dataclass
from numbers import Integral, Real

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from sklearn.base import BaseEstimator, ClassifierMixin, ClusterMixin, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .duplicates import link_boards
from .embedding import resolve_device
from .errors import UserError
from .evaluation import board_accuracy, classification_metrics
from .splits import board_keys, inner_cv

log = logging.getLogger(__name__)

VOTES = ("uniform", "distance", "softmax")


PREPROCESS_STEPS = ("l2", "standardize", "pca")


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
        with torch.no_grad():
            for start in range(0, len(X), 8192):
                out.append(torch.softmax(net(torch.from_numpy(X[start:start + 8192]).to(device)), dim=1).cpu())
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


def build_pipeline(cfg: DictConfig, n_features: int, n_train: int):
    from sklearn.decomposition import PCA
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    steps = []
    for step in cfg.preprocess.steps:
        if step == "l2":
            steps.append(("l2", Normalizer(norm="l2")))
        elif step == "standardize":
            steps.append(("standardize", StandardScaler()))
        elif step == "pca":
            k = int(cfg.preprocess.pca_components)
            if not 1 <= k <= min(n_features, n_train):
                raise UserError(f"preprocess.pca_components={k} must be between 1 and "
                                f"min(features {n_features}, training samples per CV fold ~{n_train})")
            steps.append(("pca", PCA(n_components=k, random_state=int(cfg.seed))))
        else:
            raise UserError(f"preprocess.steps: unknown step {step!r}; choose from {', '.join(PREPROCESS_STEPS)}")
    try:
        estimator = hydra.utils.instantiate(cfg.classifier.estimator)
    except Exception as exc:
        raise UserError(f"classifier.estimator of classifier={cfg.classifier.name} cannot be built: "
                        f"{str(exc).splitlines()[0]}") from None
    steps.append(("clf", estimator))
    return Pipeline(steps)


def param_grid(cfg: DictConfig, pipeline) -> dict[str, list]:
    """``classifier.grid`` as a GridSearchCV grid, each value checked against the estimator."""
    from sklearn.base import clone

    estimator = pipeline.named_steps["clf"]
    valid = estimator.get_params()
    grid = {}
    for key, values in (OmegaConf.to_container(cfg.classifier.grid, resolve=True) or {}).items():
        values = values if isinstance(values, list) else [values]
        if key not in valid:
            raise UserError(f"classifier.grid.{key}: {type(estimator).__name__} has no parameter {key!r} "
                            f"(it has: {', '.join(sorted(valid))})")
        if not values:
            raise UserError(f"classifier.grid.{key} is empty; give at least one value")
        for v in values:
            candidate = clone(estimator).set_params(**{key: v})
            try:
                if hasattr(candidate, "_validate_params"):
                    candidate._validate_params()
            except Exception as exc:
                raise UserError(f"classifier.grid.{key}={v!r} is invalid for {type(estimator).__name__}: "
                                f"{str(exc).splitlines()[0]}") from None
        grid[f"clf__{key}"] = values
    return grid


def fit_grid(cfg: DictConfig, X, y, frame: pd.DataFrame, grouped: bool):
    from sklearn.model_selection import GridSearchCV

    seed = int(cfg.seed)
    cv, groups, cv_desc, leaky = inner_cv(cfg, frame, y, grouped, seed)
    if leaky:
        log.warning(f"warning: inner CV {cv_desc}; its scores choose the hyper-parameters and report's cells")
    n_train_fold = int(len(y) * (1 - 1 / cv.get_n_splits()))
    pipe = build_pipeline(cfg, X.shape[1], n_train_fold)
    grid = param_grid(cfg, pipe)
    search = GridSearchCV(pipe, grid or {}, scoring=str(cfg.train.scoring), cv=cv, n_jobs=cfg.train.n_jobs,
                          refit=True, error_score="raise")
    search.fit(X, y, groups=groups)
    return search, cv_desc, leaky


@dataclass
class FoldResults:
    """What :func:`fit_and_test` gives back: per-fold test metrics (and the inner CV score), every test pin's
    prediction, and the grid search whose best estimator is the run's model."""

    fold_metrics: list[dict]
    predictions: pd.DataFrame
    search: object
    cv_desc: str
    leaky: bool
    fit_s: float = 0.0  # the grid searches (CV and refits), every fold's, and the refit on all rows under k-fold
    predict_s: float = 0.0  # predicting the test pins, every fold's

    @property
    def best_params(self) -> dict:
        return {k.removeprefix("clf__"): v for k, v in self.search.best_params_.items()}


def fit_and_test(cfg: DictConfig, X: np.ndarray, y: np.ndarray, frame: pd.DataFrame, splits, groups) -> FoldResults:
    """Grid search on each fold's training side, the best model on its test side; under k-fold the model kept
    is then refit on every sampled row. The inner CV keeps boards (and boards sharing copies) apart."""
    fold_metrics, predictions, search, cv_desc, leaky = [], [], None, "", False
    fit_s = predict_s = 0.0
    for f, (tr, te) in enumerate(splits.folds):
        inner = frame.iloc[tr].reset_index(drop=True)
        if groups is not None and splits.grouped and "linked" not in inner.columns:
            # the inner folds keep copies on one side too: boards sharing copies form one group
            inner["linked"] = link_boards(board_keys(inner), groups[tr])
        t0 = time.perf_counter()
        search, cv_desc, leaky = fit_grid(cfg, X[tr], y[tr], inner, splits.grouped)
        model = search.best_estimator_
        t1 = time.perf_counter()
        pred = model.predict(X[te])
        scores = class_scores(model, X[te])
        fit_s, predict_s = fit_s + t1 - t0, predict_s + time.perf_counter() - t1
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
    fitted = FoldResults(fold_metrics, pd.concat(predictions, ignore_index=True), search, cv_desc, leaky)
    if len(splits.folds) > 1:  # k-fold: the logged model is refit on every sampled row
        everything = frame
        if groups is not None and splits.grouped and "linked" not in frame.columns:
            everything = frame.assign(linked=link_boards(board_keys(frame), groups))
        t0 = time.perf_counter()
        fitted.search, fitted.cv_desc, fitted.leaky = fit_grid(cfg, X, y, everything, splits.grouped)
        fit_s += time.perf_counter() - t0
    fitted.fit_s, fitted.predict_s = fit_s, predict_s
    return fitted


def estimator_params(model) -> dict:
    """Every setting of a fitted pipeline's steps that is a plain value (``C``, ``hidden``, ``max_iter``,
    ``pca__n_components``), named as the grid search's best parameters are (the classifier's without ``clf__``)."""
    out = {}
    for key, value in model.get_params(deep=True).items():
        if key.rsplit("__", 1)[-1] in ("copy", "verbose"):  # how it computes, not what
            continue
        if "__" in key and (value is None or isinstance(value, (str, int, float, bool))):
            out[key.removeprefix("clf__")] = value
    return out
