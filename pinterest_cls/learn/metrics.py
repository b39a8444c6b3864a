"""Metrics of classifier and clustering runs, and their uncertainty: bootstrap intervals over test boards."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize


def metric_key(name: str) -> str:
    """A category name made safe for an MLflow metric key."""
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", str(name)).replace(" ", "_")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray | None,
                           classes: np.ndarray) -> dict[str, float]:
    """accuracy, macro F1, balanced accuracy, per-class precision/recall/F1; with scores (columns in the order
    of ``classes``, any order) also top-5 accuracy (more than 5 classes), one-vs-rest ROC-AUC and PR-AUC (macro
    over the classes present in y_true)."""
    classes = np.asarray(classes)
    if scores is not None:  # scikit-learn's ranking metrics want the labels sorted
        order = np.argsort(classes, kind="stable")
        classes, scores = classes[order], np.asarray(scores)[:, order]
    out = {
        "accuracy": skm.accuracy_score(y_true, y_pred),
        "f1_macro": skm.f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true), zero_division=0),
        "balanced_accuracy": skm.balanced_accuracy_score(y_true, y_pred),
    }
    present = np.unique(y_true)
    p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    for c, pc, rc, fc in zip(present, p, r, f):
        out[f"precision_{metric_key(c)}"] = pc
        out[f"recall_{metric_key(c)}"] = rc
        out[f"f1_{metric_key(c)}"] = fc
    if scores is not None and len(classes) > 1:
        if len(classes) > 5:
            out["top5_accuracy"] = skm.top_k_accuracy_score(y_true, scores, k=5, labels=classes)
        cols = [i for i, c in enumerate(classes) if c in set(present)]
        if len(cols) >= 2:
            onehot = label_binarize(y_true, classes=classes)
            if onehot.shape[1] == 1:  # binary: label_binarize gives one column
                onehot = np.column_stack([1 - onehot[:, 0], onehot[:, 0]])
            out["roc_auc"] = skm.roc_auc_score(onehot[:, cols], scores[:, cols], average="macro")
            out["pr_auc"] = skm.average_precision_score(onehot[:, cols], scores[:, cols], average="macro")
    return {k: float(v) for k, v in out.items()}


def majority_vote(pred: np.ndarray) -> str:
    """The most frequent of the predicted categories ``pred`` (ties: the first in sorted order)."""
    values, counts = np.unique(np.asarray(pred).astype(str), return_counts=True)
    return str(values[counts == counts.max()][0])  # np.unique sorts: ties go to the first name


def board_accuracy(frame: pd.DataFrame) -> float:
    """Share of boards whose majority predicted category (``majority_vote``) is their category."""
    correct = [majority_vote(g["prediction"].to_numpy()) == str(g["truth"].iloc[0])
               for _, g in frame.groupby(["user", "board"], sort=True)]
    return float(np.mean(correct)) if correct else float("nan")


def _accuracy_f1(t: np.ndarray, p: np.ndarray, k: int) -> tuple[float, float]:
    """Accuracy and macro F1 (over the ``k`` labels of the whole test set, absent ones scoring 0) of integer
    labels, from one confusion matrix."""
    cm = np.bincount(t * k + p, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    present = support > 0
    return tp.sum() / max(cm.sum(), 1), float(f1[present].mean()) if present.any() else 0.0


def bootstrap_ci(truth, pred, groups=None, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """95 % percentile bootstrap intervals of accuracy and macro F1: ``{"accuracy": (low, high), "f1_macro":
    (low, high)}``. With ``groups`` (the board of each test pin) whole groups are resampled, since board-mates
    are not independent: resampling pins would understate the uncertainty. Macro F1 is over the labels present
    in ``truth``, as ``classification_metrics`` computes it."""
    truth, pred = np.asarray(truth).astype(str), np.asarray(pred).astype(str)
    labels = np.unique(truth)
    t = np.searchsorted(labels, truth)
    known = np.isin(pred, labels)
    p = np.where(known, np.searchsorted(labels, pred), len(labels))  # a label absent from truth: its own slot
    k = len(labels) + 1
    units = np.asarray(groups) if groups is not None else np.arange(len(truth))
    _, inverse = np.unique(units, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(inverse.max() + 1))
    ends = np.append(starts[1:], len(order))
    members = [order[a:b] for a, b in zip(starts, ends)]
    rng = np.random.default_rng(seed)
    stats = np.empty((n_boot, 2))
    for b in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        stats[b] = _accuracy_f1(t[idx], p[idx], k)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail], axis=0)
    return {"accuracy": (float(low[0]), float(high[0])), "f1_macro": (float(low[1]), float(high[1]))}


def purity(labels_true, labels_pred) -> float:
    table = pd.crosstab(labels_pred, labels_true)
    return float(table.max(axis=1).sum() / table.to_numpy().sum())


def fold_mean(per_fold: list[dict], prefix: str) -> dict:
    """{prefix + name: mean over folds}, with ``_std`` beside each when there are several folds."""
    out = {}
    for k in sorted(set().union(*per_fold)) if per_fold else ():
        vals = [m[k] for m in per_fold if k in m]
        out[prefix + k] = float(np.mean(vals))
        if len(per_fold) > 1:
            out[prefix + k + "_std"] = float(np.std(vals))
    return out


def bootstrap_metrics(preds: pd.DataFrame, boards: np.ndarray | None, n_boot: int, seed: int) -> tuple[dict, str]:
    """95 % bootstrap intervals of test accuracy and macro F1 from a run's predictions (``truth``,
    ``prediction``) as metrics, resampling ``boards`` (each prediction's board) when given, else pins; and how
    they were made."""
    if not n_boot:
        return {}, "off"
    by_board = boards is not None
    ci = bootstrap_ci(preds["truth"], preds["prediction"], boards, n_boot=n_boot, seed=seed)
    metrics = {}
    for key, (low, high) in ci.items():
        metrics[f"test_{key}_ci_low"], metrics[f"test_{key}_ci_high"] = low, high
    return metrics, f"95% percentile bootstrap, {n_boot} resamples of the test {'boards' if by_board else 'pins'}"


def clustering_metrics(X: np.ndarray, assign: np.ndarray, categories: np.ndarray | None, rng: np.random.Generator,
                       silhouette_sample: int, cosine: bool, seed: int) -> dict[str, float]:
    """How clusters match the categories (NMI, ARI, homogeneity, completeness, purity; when ``categories`` is
    given), and their silhouette on a sample of ``silhouette_sample`` rows (cosine or Euclidean)."""
    from sklearn import metrics as skm

    out = {}
    if categories is not None:
        out.update({
            "nmi": skm.normalized_mutual_info_score(categories, assign),
            "ari": skm.adjusted_rand_score(categories, assign),
            "homogeneity": skm.homogeneity_score(categories, assign),
            "completeness": skm.completeness_score(categories, assign),
            "purity": purity(categories, assign),
        })
    sil = rng.choice(len(X), min(len(X), silhouette_sample), replace=False)
    if len(set(assign[sil])) >= 2:
        metric = "cosine" if cosine else "euclidean"
        out["silhouette"] = skm.silhouette_score(X[sil], assign[sil], metric=metric, random_state=seed)
    return {m: float(v) for m, v in out.items()}


def summary(metrics: dict, keys) -> str:
    """``test_accuracy 0.9123 [0.8810, 0.9402], ...`` for those of ``keys`` in ``metrics`` (with the interval
    where it has one)."""
    return ", ".join(f"{k} {metrics[k]:.4f}" + (f" [{metrics[k + '_ci_low']:.4f}, {metrics[k + '_ci_high']:.4f}]"
                                                if k + "_ci_low" in metrics else "") for k in keys if k in metrics)
