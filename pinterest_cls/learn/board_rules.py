"""Boards as the unit: a board's category from its pins' predictions, the board-level metrics of a train run, how
many pins it takes to know a board, and abstaining where a board fits no known category.

Three rules combine a board's pins (``RULES``):

- ``vote``: the category most of its pins are predicted as (ties: the first in sorted order);
- ``mean_prob``: the category of highest mean pin probability, the probabilities being the classifier's own, or
  the softmax of its decision function where it has none (``pin_distribution``), temperature-scaled on held-out
  training boards (``fit_temperature``);
- ``mean_embedding``: a logistic regression on the boards' mean embeddings (L2-normalised), fitted on the training
  side's boards, where each category has at least ``MIN_BOARDS`` of them there.

A board abstains when its top mean score is below a threshold calibrated on held-out boards of the training side
(``abstention_threshold``): the share of known-category boards that abstain is then at most the stated target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pinterest_cls.learn.estimators import class_scores
from pinterest_cls.learn.metrics import bootstrap_ci, majority_vote

log = logging.getLogger(__name__)

RULES = ("vote", "mean_prob", "mean_embedding")
#: Training-side boards each category needs for the ``mean_embedding`` rule.
MIN_BOARDS = 3
#: Pins per board in the curve: 1, 2, 4, ... up to the largest board.
CURVE_DRAWS = 20
BOARDS_FILE, BOARD_PREDICTIONS, BOARD_CURVE = "boards.json", "board_predictions.csv", "board_curve.csv"


def _logits(scores: np.ndarray) -> np.ndarray:
    """Probabilities (rows summing to 1) as log-probabilities; a decision function as it is."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size and np.all(s >= -1e-9) and np.allclose(s.sum(1), 1.0, atol=1e-4):
        return np.log(np.clip(s, 1e-12, None))
    return s


def pin_distribution(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Each pin's scores as a distribution over the classes: the softmax of its log-probabilities (probabilities
    as they are at temperature 1), or of its decision function, divided by ``temperature``."""
    z = _logits(scores) / temperature
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def fit_temperature(scores: np.ndarray, truth: np.ndarray) -> float:
    """Temperature scaling: the temperature (0.01-100, on a log scale) whose distributions give the held-out pins'
    true classes (``truth``: column indices) the least negative log-likelihood, so that the mean of a board's
    pin distributions weighs calibrated probabilities (a linear SVM's decision values have no scale of their
    own)."""
    from scipy.optimize import minimize_scalar

    logits, rows = _logits(scores), np.arange(len(truth))

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float(-(z[rows, truth] - np.log(np.exp(z).sum(1))).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.01), np.log(100.0)), method="bounded").x))


def board_ids(frame: pd.DataFrame) -> np.ndarray:
    """One integer per (user, board), in sorted order of the boards."""
    keys = frame["user"].astype(str) + "\x00" + frame["board"].astype(str)
    return np.unique(keys.to_numpy(), return_inverse=True)[1]


def members_of(ids: np.ndarray) -> list[np.ndarray]:
    """The row indices of each board id, in id order."""
    order = np.argsort(ids, kind="stable")
    return np.split(order, np.cumsum(np.bincount(ids))[:-1]) if len(ids) else []


def _firsts(ids: np.ndarray) -> np.ndarray:
    """The first row of each board id, in id order."""
    return np.unique(ids, return_index=True)[1]


def mean_scores(probs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(boards, classes): each board's mean pin distribution."""
    n = ids.max() + 1 if len(ids) else 0
    total = np.zeros((n, probs.shape[1]))
    np.add.at(total, ids, probs)
    return total / np.maximum(np.bincount(ids, minlength=n), 1)[:, None]


def board_table(pins: pd.DataFrame, probs: np.ndarray | None, classes: np.ndarray,
                embedding_rule: dict | None = None, temperature: float = 1.0) -> pd.DataFrame:
    """One row per board of ``pins`` (``user``, ``board``, ``truth``, ``prediction``): its category, pin count,
    and each rule's prediction (``vote``, ``mean_prob`` where there are scores, ``mean_embedding`` where
    ``embedding_rule`` maps (user, board) to a prediction), with ``mean_prob_score``."""
    ids = board_ids(pins)
    first = _firsts(ids)
    table = pd.DataFrame({c: pins[c].to_numpy()[first] for c in ("user", "board", "truth")})
    table["pins"] = np.bincount(ids)
    pred = pins["prediction"].to_numpy()
    table["vote"] = [majority_vote(pred[m]) for m in members_of(ids)]
    if probs is not None:
        means = mean_scores(pin_distribution(probs, temperature), ids)
        table["mean_prob"] = np.asarray(classes)[means.argmax(1)]
        table["mean_prob_score"] = means.max(1)
    if embedding_rule is not None:
        table["mean_embedding"] = [embedding_rule.get((u, b)) for u, b in zip(table["user"], table["board"])]
    return table


def board_metrics(table: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """``test_board_<rule>_accuracy`` and ``_f1_macro`` of each rule in ``table``, with 95 % percentile bootstrap
    intervals that resample the boards (``_ci_low``, ``_ci_high``; none with ``n_boot`` 0)."""
    from sklearn.metrics import accuracy_score, f1_score

    out = {}
    for rule in RULES:
        if rule not in table.columns or table[rule].isna().any():
            continue
        truth, pred = table["truth"].astype(str).to_numpy(), table[rule].astype(str).to_numpy()
        ci = bootstrap_ci(truth, pred, None, n_boot=n_boot, seed=seed) if n_boot else {}
        values = {"accuracy": accuracy_score(truth, pred),
                  "f1_macro": f1_score(truth, pred, average="macro", labels=np.unique(truth), zero_division=0)}
        for key, value in values.items():
            out[f"test_board_{rule}_{key}"] = float(value)
            if n_boot:
                out[f"test_board_{rule}_{key}_ci_low"], out[f"test_board_{rule}_{key}_ci_high"] = ci[key]
    return out


def mean_embedding_rule(X_train: np.ndarray, train: pd.DataFrame, X_test: np.ndarray, test: pd.DataFrame,
                        seed: int) -> dict | None:
    """{(user, board): predicted category} of the test boards by a logistic regression on L2-normalised board
    mean embeddings fitted on the training boards; None where a category has fewer than ``MIN_BOARDS`` boards
    on the training side."""
    from sklearn.linear_model import LogisticRegression

    tr_ids, te_ids = board_ids(train), board_ids(test)
    labels = train["category"].to_numpy().astype(str)[_firsts(tr_ids)]
    _, per_category = np.unique(labels, return_counts=True)
    if len(per_category) < 2 or per_category.min() < MIN_BOARDS:
        return None

    def means(X, ids):
        m = mean_scores(np.asarray(X, dtype=np.float64), ids)
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)

    model = LogisticRegression(C=10.0, max_iter=2000, random_state=seed).fit(means(X_train, tr_ids), labels)
    pred = model.predict(means(X_test, te_ids))
    first = _firsts(te_ids)
    return {(u, b): str(p) for u, b, p in zip(test["user"].to_numpy()[first], test["board"].to_numpy()[first], pred)}


def pins_curve(pins: pd.DataFrame, probs: np.ndarray | None, classes: np.ndarray, seed: int,
               draws: int = CURVE_DRAWS, temperature: float = 1.0) -> pd.DataFrame:
    """Board accuracy against the pins seen per board: for k = 1, 2, 4, ... (up to the largest board), ``draws``
    seeded draws of k pins of each board (all of a smaller board's), combined by ``vote`` and ``mean_prob``;
    the mean accuracy over draws and its spread (``std``)."""
    ids = board_ids(pins)
    sizes = np.bincount(ids)
    members = members_of(ids)
    truth = pins["truth"].to_numpy().astype(str)[_firsts(ids)]
    pred = pins["prediction"].to_numpy().astype(str)
    dist = pin_distribution(probs, temperature) if probs is not None else None
    classes = np.asarray(classes).astype(str)
    rng = np.random.default_rng(seed)
    ks = [1]
    while ks[-1] * 2 <= sizes.max():
        ks.append(ks[-1] * 2)
    if ks[-1] < sizes.max():
        ks.append(int(sizes.max()))
    rows = []
    for k in ks:
        acc = {"vote": [], "mean_prob": []}
        for _ in range(draws):
            picks = [m if len(m) <= k else rng.choice(m, k, replace=False) for m in members]
            acc["vote"].append(np.mean([majority_vote(pred[p]) == t for p, t in zip(picks, truth)]))
            if dist is not None:
                acc["mean_prob"].append(np.mean([classes[dist[p].mean(0).argmax()] == t
                                                 for p, t in zip(picks, truth)]))
        for rule, values in acc.items():
            if values:
                rows.append({"pins": k, "rule": rule, "accuracy": float(np.mean(values)),
                             "std": float(np.std(values)), "boards": len(members),
                             "boards_with_k_pins": int((sizes >= k).sum()), "draws": draws})
    return pd.DataFrame(rows)


@dataclass
class Abstention:
    """The top mean pin score below which a board abstains, how it was set, and what it measured."""

    below: float
    target: float
    boards: int  # held-out training-side boards it was calibrated on
    abstained: float  # their share below it (at most ``target``)
    temperature: float = 1.0  # of the pin distributions it was set on

    def as_dict(self) -> dict:
        return {"rule": "mean_prob", "abstain_below": self.below, "target": self.target,
                "calibration_boards": self.boards, "calibration_abstained": self.abstained,
                "temperature": self.temperature,
                "method": "the target quantile (lower order statistic) of the top mean pin score of held-out "
                          "training-side boards (out-of-fold predictions of the inner CV's board folds, "
                          "temperature-scaled on the same predictions)"}


def abstention_threshold(top_scores: np.ndarray, target: float, temperature: float = 1.0) -> Abstention:
    """The threshold below which at most ``target`` of the boards whose ``top_scores`` (their top mean pin score,
    held out) are given would abstain."""
    s = np.sort(np.asarray(top_scores, dtype=np.float64))
    k = int(np.floor(target * len(s)))  # boards strictly below s[k]: at most k, a share of at most target
    below = float(s[min(k, len(s) - 1)]) if len(s) else 0.0
    return Abstention(below, float(target), int(len(s)), float(np.mean(s < below)) if len(s) else 0.0,
                      float(temperature))


def held_out_scores(estimator, X: np.ndarray, y: np.ndarray, classes: np.ndarray, cv, groups) -> np.ndarray | None:
    """Every training-side pin's class scores (columns in the order of ``classes``) from a clone of ``estimator``
    fitted on the other folds of ``cv`` (folds of whole boards): held-out boards. None where the estimator gives
    no scores."""
    from sklearn.base import clone

    out = None
    for tr, te in cv.split(X, y, groups):
        model = clone(estimator).fit(X[tr], y[tr])
        scores = class_scores(model, X[te])
        if scores is None:
            return None
        if out is None:  # a class absent from a fold's training side: probability 0, or the lowest decision
            out = np.zeros((len(y), len(classes))) if np.all(scores >= 0) else np.full((len(y), len(classes)), -1e3)
        out[np.ix_(te, np.searchsorted(classes, model.classes_))] = scores
    return out


def label_boards(pins: pd.DataFrame, probs: np.ndarray, classes: np.ndarray, abstain_below: float | None,
                 top: int = 3, weigh: int = 3, temperature: float = 1.0) -> pd.DataFrame:
    """``board_predictions.csv``: per board of ``pins`` (``user``, ``board``, ``pin``; rows of ``probs`` NaN where
    a pin failed) its pins (and failed ones), the ``top`` categories with their mean scores, the ``weigh`` pins
    with the highest score for the top category, and ``abstain`` (top score below ``abstain_below``; empty
    where the run has no calibrated threshold)."""
    classes = np.asarray(classes).astype(str)
    ok = np.isfinite(probs).all(1)
    dist = np.full_like(probs, np.nan, dtype=np.float64)
    if ok.any():
        dist[ok] = pin_distribution(probs[ok], temperature)
    rows = []
    for (user, board), g in pins.groupby(["user", "board"], sort=True):
        idx = g.index.to_numpy()
        good = idx[ok[idx]]
        row = {"user": user, "board": board, "pins": len(good), "failed": len(idx) - len(good)}
        if len(good):
            mean = dist[good].mean(0)
            order = np.argsort(-mean)[:top]
            for i, c in enumerate(order, 1):
                row[f"top{i}_category"], row[f"top{i}_score"] = classes[c], float(mean[c])
            weights = dist[good, order[0]]
            row["top_pins"] = ";".join(str(p) for p in pins.loc[good[np.argsort(-weights)[:weigh]], "pin"])
            row["abstain"] = None if abstain_below is None else bool(mean[order[0]] < abstain_below)
        rows.append(row)
    return pd.DataFrame(rows)
