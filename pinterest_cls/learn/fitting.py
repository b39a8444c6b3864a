"""From a config to a fitted model: the preprocessing pipeline, the grid search on the training side (inner CV by
board) and the test of each fold, and the params a train run records."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pinterest_cls.core import config
from pinterest_cls.core.errors import UserError
from pinterest_cls.core.fileio import file_sha256
from pinterest_cls.data.metadata import META
from pinterest_cls.data.store import Store
from pinterest_cls.learn import board_rules
from pinterest_cls.learn.estimators import class_scores
from pinterest_cls.learn.metrics import board_accuracy, classification_metrics, fold_mean
from pinterest_cls.learn.protocol import protocol as run_protocol
from pinterest_cls.learn.protocol import train_protocol
from pinterest_cls.learn.splits import board_keys, has_boards, inner_cv
from pinterest_cls.neighbors.duplicates import link_boards

log = logging.getLogger(__name__)


def _l2(cfg: DictConfig, n_features: int, n_train: int):
    from sklearn.preprocessing import Normalizer

    return Normalizer(norm="l2")


def _standardize(cfg: DictConfig, n_features: int, n_train: int):
    from sklearn.preprocessing import StandardScaler

    return StandardScaler()


def _pca(cfg: DictConfig, n_features: int, n_train: int):
    from sklearn.decomposition import PCA

    k = int(cfg.preprocess.pca_components)
    if not 1 <= k <= min(n_features, n_train):
        raise UserError(f"preprocess.pca_components={k} must be between 1 and "
                        f"min(features {n_features}, training samples per CV fold ~{n_train})")
    return PCA(n_components=k, random_state=int(cfg.seed))


#: ``preprocess.steps`` entry -> the builder of that pipeline step (fitted inside each CV fold).
PREPROCESS: dict[str, Callable] = {"l2": _l2, "standardize": _standardize, "pca": _pca}


def preprocess_name(cfg: DictConfig) -> str:
    """``preprocess.steps`` as a run records it: ``l2``, ``standardize+pca50``, or ``none``."""
    return "+".join(f"pca{cfg.preprocess.pca_components}" if s == "pca" else str(s)
                    for s in cfg.preprocess.steps) or "none"


def build_pipeline(cfg: DictConfig, n_features: int, n_train: int):
    """``preprocess.steps`` (each looked up in ``PREPROCESS``), then ``classifier.estimator``, as one
    scikit-learn Pipeline."""
    from sklearn.pipeline import Pipeline

    steps = []
    for step in cfg.preprocess.steps:
        if str(step) not in PREPROCESS:
            raise UserError(f"preprocess.steps: unknown step {step!r}; choose from {', '.join(PREPROCESS)}")
        steps.append((str(step), PREPROCESS[str(step)](cfg, n_features, n_train)))
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
    """What ``fit_and_test`` gives back: per-fold test metrics (and the inner CV score), every test pin's
    prediction, and the grid search whose best estimator is the run's model."""

    fold_metrics: list[dict]
    predictions: pd.DataFrame
    search: object
    cv_desc: str
    leaky: bool
    fit_s: float = 0.0  # the grid searches (CV and refits), every fold's, and the refit on all rows under k-fold
    predict_s: float = 0.0  # predicting the test pins, every fold's
    scores: np.ndarray | None = None  # each prediction's class scores, columns in the order of ``classes``
    classes: np.ndarray | None = None
    embedding_rule: dict | None = None  # the boards' mean-embedding rule: (user, board) -> predicted category

    @property
    def best_params(self) -> dict:
        return {k.removeprefix("clf__"): v for k, v in self.search.best_params_.items()}

    @property
    def inner_kind(self) -> str:
        """How the inner CV folded, as the protocol says it: ``by board``, ``by pin`` or ``by pin, leaky``."""
        return "by board" if "by board" in self.cv_desc else ("by pin, leaky" if self.leaky else "by pin")

    def metrics(self) -> dict:
        """The run's metrics: the test metrics (``test_*``; the mean over folds, with ``_std``, under k-fold), the
        inner CV score (``cv_*``), and the fit and predict times."""
        test = [{k: v for k, v in m.items() if not k.startswith("cv_")} for m in self.fold_metrics]
        cv = [{k: v for k, v in m.items() if k.startswith("cv_")} for m in self.fold_metrics]
        return {**fold_mean(test, "test_"), **fold_mean(cv, ""), "fit_time_s": self.fit_s,
                "predict_time_s": self.predict_s}


def fit_and_test(cfg: DictConfig, X: np.ndarray, y: np.ndarray, frame: pd.DataFrame, splits, groups) -> FoldResults:
    """Grid search on each fold's training side, the best model on its test side; under k-fold the model kept
    is then refit on every sampled row. The inner CV keeps boards (and boards sharing copies) apart."""
    fold_metrics, predictions, search, cv_desc, leaky = [], [], None, "", False
    fit_s = predict_s = 0.0
    classes = np.unique(y)
    all_scores: list[np.ndarray] | None = []
    embedding_rule: dict | None = {} if has_boards(cfg) else None
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
        if scores is not None and all_scores is not None:
            full = np.zeros((len(te), len(classes)))
            full[:, np.searchsorted(classes, model.classes_)] = scores
            all_scores.append(full)
        else:
            all_scores = None
        if has_boards(cfg):
            m["board_accuracy"] = board_accuracy(part)
            rule = board_rules.mean_embedding_rule(X[tr], inner, X[te], part, int(cfg.seed))
            embedding_rule = None if rule is None or embedding_rule is None else {**embedding_rule, **rule}
        if len(splits.folds) > 1:
            part["fold"] = f
            log.info(f"  fold {f + 1}/{len(splits.folds)}: accuracy {m['accuracy']:.4f}, "
                     f"macro F1 {m['f1_macro']:.4f}")
        fold_metrics.append(m)
        predictions.append(part)
    fitted = FoldResults(fold_metrics, pd.concat(predictions, ignore_index=True), search, cv_desc, leaky,
                         scores=np.concatenate(all_scores) if all_scores else None, classes=classes,
                         embedding_rule=embedding_rule)
    if len(splits.folds) > 1:  # k-fold: the logged model is refit on every sampled row
        everything = frame
        if groups is not None and splits.grouped and "linked" not in frame.columns:
            everything = frame.assign(linked=link_boards(board_keys(frame), groups))
        t0 = time.perf_counter()
        fitted.search, fitted.cv_desc, fitted.leaky = fit_grid(cfg, X, y, everything, splits.grouped)
        fit_s += time.perf_counter() - t0
    fitted.fit_s, fitted.predict_s = fit_s, predict_s
    return fitted


@dataclass
class BoardResults:
    """A train run's board-level outcome: each test board's predictions (``board_rules.board_table``), their
    metrics, the pins-per-board curve and the abstention threshold."""

    table: pd.DataFrame
    metrics: dict
    curve: pd.DataFrame
    abstention: board_rules.Abstention | None
    temperature: float = 1.0  # of the pin distributions the mean_prob rule averages (temperature scaling)

    def params(self) -> dict:
        """What the run records of the pin calibration and the abstention threshold as params."""
        out = {"board_temperature": self.temperature}
        if self.abstention is not None:
            out.update(board_abstain_below=self.abstention.below, board_abstain_target=self.abstention.target)
        return out


def board_results(cfg: DictConfig, fitted: FoldResults, X: np.ndarray, y: np.ndarray, frame: pd.DataFrame,
                  splits) -> BoardResults:
    """The test boards' categories by each rule, with intervals that resample boards; the pins-per-board curve;
    and, from out-of-fold predictions of the (last) fold's training boards (held out by the inner CV's board
    folds), the temperature of the pin distributions and the abstention threshold
    (``train.boards.abstain_target``)."""
    seed, n_boot = int(cfg.seed), int(config.select(cfg, "train.bootstrap") or 0)
    temperature, abstention = 1.0, None
    target = config.select(cfg, "train.boards.abstain_target")
    if fitted.scores is not None:
        tr = splits.folds[-1][0]
        inner = frame.iloc[tr].reset_index(drop=True)
        cv, groups, desc, _ = inner_cv(cfg, inner, y[tr], True, seed)
        held_out = (board_rules.held_out_scores(fitted.search.best_estimator_, X[tr], y[tr], fitted.classes, cv,
                                                groups) if "by board" in desc else None)
        if held_out is None:
            log.warning(f"warning: pin scores not calibrated and no abstention threshold: the training side's "
                        f"inner CV is {desc}, not by board")
        else:
            temperature = board_rules.fit_temperature(held_out, np.searchsorted(fitted.classes, y[tr]))
            if target is not None:
                top = board_rules.mean_scores(board_rules.pin_distribution(held_out, temperature),
                                              board_rules.board_ids(inner)).max(1)
                abstention = board_rules.abstention_threshold(top, float(target), temperature)
    table = board_rules.board_table(fitted.predictions, fitted.scores, fitted.classes, fitted.embedding_rule,
                                    temperature)
    metrics = board_rules.board_metrics(table, n_boot, seed)
    curve = board_rules.pins_curve(fitted.predictions, fitted.scores, fitted.classes, seed, temperature=temperature)
    if abstention is not None:
        metrics["test_board_abstained"] = float(np.mean(table["mean_prob_score"] < abstention.below))
    return BoardResults(table, metrics, curve, abstention, temperature)


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


def run_params(cfg: DictConfig, store: Store, frame: pd.DataFrame, splits, fitted: FoldResults, extra: dict) -> dict:
    """A train run's MLflow params: what was trained on (``store``, the sampled pins ``frame``), how it was split
    and chosen, its protocol, every setting of the model, and ``extra`` (counts of copies and exclusions, the
    interval method)."""
    meta = store.meta
    protocol = train_protocol(cfg, splits.name, fitted.inner_kind, extra.get("repins_copies", ""))
    params = {
        "backbone": str(cfg.backbone.name), "classifier": str(cfg.classifier.name), "split": splits.name,
        "split_seed": int(cfg.split.seed), "test_size": cfg.split.get("test_size"), "folds": len(splits.folds),
        "inner_cv": fitted.cv_desc, "protocol": run_protocol(protocol, meta.rows_sha256),
        "scoring": str(cfg.train.scoring), "sampling_max_per_category": cfg.sampling.max_per_category,
        "sampling_seed": int(cfg.sampling.seed), "preprocess": preprocess_name(cfg), "n_samples": len(frame),
        "n_test": int(sum(len(te) for _, te in splits.folds)), "n_classes": int(frame["category"].nunique()),
        "embeddings": str(store.folder), "embeddings_meta_sha256": file_sha256(store.folder / META),
        "timm_id": meta.timm_id, "seed": int(cfg.seed),
        # how the features were computed: extract.runtime and the precision used
        "extract_runtime": meta.extract.runtime, "extract_amp": meta.extract.amp,
        "repins_keep_one": bool(cfg.repins.keep_one), **extra,
        **estimator_params(fitted.search.best_estimator_),  # every setting of the model, searched or not
        **fitted.best_params,
    }
    if splits.info.get("single_board_categories"):
        params["single_board_categories"] = ",".join(splits.info["single_board_categories"])
    return params
