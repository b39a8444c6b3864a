"""What is wrong with the data: copies of a pin (repins), pins whose board's category is likely wrong, boards
that drifted off their topic, and pins far from everything, computed over a finished embedding store.

- One cosine k-nearest-neighbour graph (``pinterest_cls.neighbors.faiss_index.FaissNeighbors``, exact or IVF, read
  block by block from the memory map) serves the near copies and the outlier scores; exact copies come from the
  scan's content digests.
- Label issues come from out-of-fold predicted probabilities: a logistic regression on the L2-normalised
  embeddings, with folds made of whole boards, so a pin is never judged by a model that saw its own board. The
  probabilities go to cleanlab (confident learning: ``find_label_issues``, ``get_label_quality_scores``).
- Outlier scores are cleanlab's ``OutOfDistribution`` over the same faiss graph (mean k-NN cosine distance,
  mapped to (0, 1]; low = far from everything).

Nothing is N x N: memory is the index (1.3 GB for a million 1280-d rows) plus k neighbours and one probability
per category for each pin.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pinterest_cls.core import config
from pinterest_cls.core.errors import UserError
from pinterest_cls.core.fileio import atomic_write_json
from pinterest_cls.data.metadata import StoreMeta
from pinterest_cls.data.pixel_match import PIXEL_SCORES, ScoreCache
from pinterest_cls.neighbors.duplicates import CopyPolicy, find_copies
from pinterest_cls.neighbors.faiss_index import FaissNeighbors, blocks, read_rows, unit_rows

log = logging.getLogger(__name__)

FILES = {"duplicates": "duplicates.csv", "label_issues": "label_issues.csv", "boards": "boards.csv",
         "outliers": "outliers.csv"}


INFO = "audit.json"
#: what ``train audit.exclude=[...]`` may name, and the pins each takes out
EXCLUDABLE = {"label_issues": "pins flagged as likely mislabeled", "off_topic": "every pin of an off-topic board",
              "duplicates": "all but one pin of each duplicate group", "outliers": "pins flagged as outliers"}


KEYS = ["user", "board", "pin"]


@dataclass
class Findings:
    frame: pd.DataFrame  # the audited pins: row, user, board, pin, category, path
    duplicates: pd.DataFrame
    label_issues: pd.DataFrame
    boards: pd.DataFrame
    outliers: pd.DataFrame
    info: dict = field(default_factory=dict)

    def counts(self) -> dict:
        d = self.duplicates
        per_group = d.groupby("group").first()  # empty (with its columns) when nothing was copied
        return {
            "pins": len(self.frame), "duplicate_groups": int(d["group"].nunique()),
            "pins_in_duplicate_groups": len(d),
            "duplicate_groups_across_boards": int((per_group["group_boards"] > 1).sum()),
            "duplicate_groups_across_users": int((per_group["group_users"] > 1).sum()),
            "duplicate_groups_across_categories": int((per_group["group_categories"] > 1).sum()),
            "label_issues": int(self.label_issues["is_issue"].sum()), "boards": len(self.boards),
            "off_topic_boards": int(self.boards["is_off_topic"].sum()),
            "outliers": int(self.outliers["is_outlier"].sum()),
        }


def board_folds(categories: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """The fold of each pin: each category's boards (``groups``) are dealt round-robin, in a seeded order, over
    ``n_folds`` folds, so every fold's training side holds at least one board of every category. A category
    needs two boards; fewer is a ``UserError`` naming them."""
    frame = pd.DataFrame({"category": categories, "group": groups})
    per_cat = frame.groupby("category")["group"].nunique()
    single = sorted(map(str, per_cat.index[per_cat < 2]))
    if single:
        raise UserError(
            f"audit needs at least two boards per category for its out-of-fold model (a pin is judged only by a "
            f"model that did not see its board); one board only: {', '.join(single[:10])}"
            + (" ..." if len(single) > 10 else "") + ". Add boards, or leave these categories out at scan time "
            "(data.reject_categories) and re-extract")
    rng = np.random.default_rng(seed)
    fold_of: dict = {}
    for _, g in frame.groupby("category", sort=True):
        sizes = g["group"].value_counts()
        order = rng.permutation(sizes.index.to_numpy())
        start = int(rng.integers(n_folds))
        for j, board in enumerate(order):
            fold_of[board] = (start + j) % n_folds
    return frame["group"].map(fold_of).to_numpy(np.int64)


def _capped(positions: np.ndarray, y: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None:
        return positions
    keep = [rng.choice(p, cap, replace=False) if len(p) > cap else p
            for p in (positions[y[positions] == c] for c in np.unique(y[positions]))]
    return np.sort(np.concatenate(keep))


@dataclass(frozen=True)
class OofModel:
    """The out-of-fold model: a logistic regression of inverse regularisation ``C``, fitted on at most ``cap`` pins
    per category of the other folds (seeded by ``seed``; None: all), predicting ``block`` rows at a time."""

    C: float = 10.0
    cap: int | None = 2000
    seed: int = 0
    block: int = 8192


def oof_probabilities(emb, rows: np.ndarray, y: np.ndarray, n_classes: int, folds: np.ndarray, model: OofModel,
                      progress=None) -> np.ndarray:
    """(n, n_classes) probabilities, each pin's from ``model`` on the unit-length embeddings ``emb[rows]``, fitted
    on the other folds. The features are not standardised: that lets the model fit each board's own style, which
    does not carry to unseen boards."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(model.seed)
    probs = np.zeros((len(rows), n_classes), dtype=np.float32)
    for f in np.unique(folds):
        train = _capped(np.flatnonzero(folds != f), y, model.cap, rng)
        test = np.flatnonzero(folds == f)
        clf = LogisticRegression(C=model.C, max_iter=1000)
        clf.fit(unit_rows(read_rows(emb, 0, len(train), rows[train])), y[train])
        for lo, x in blocks(emb, rows[test], model.block):
            probs[np.ix_(test[lo:lo + len(x)], clf.classes_)] = clf.predict_proba(x)
        if progress is not None:
            progress.update(1)
    return probs


def label_issue_table(frame: pd.DataFrame, probs: np.ndarray, classes: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    """``label_issues.csv``: one row per pin, most likely mislabeled first. ``score`` is cleanlab's label quality
    (self-confidence: the out-of-fold probability of the given category; low = likely wrong); ``is_issue`` is
    cleanlab's confident-learning verdict (``find_label_issues``, pruned by noise rate)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    score = get_label_quality_scores(y, probs, method="self_confidence")
    is_issue = find_label_issues(y, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    out = frame[KEYS].copy()
    out["given"], out["suggested"] = classes[y], classes[probs.argmax(axis=1)]
    out["score"], out["is_issue"] = score.astype(np.float64), is_issue
    out["path"] = frame["path"].to_numpy()
    return out.sort_values(["score", "user", "board", "pin"], kind="stable").reset_index(drop=True)


def board_table(frame: pd.DataFrame, suggested: np.ndarray, max_agreement: float) -> pd.DataFrame:
    """``boards.csv``: per board, the share of its pins whose out-of-fold prediction is the board's category
    (``agreement``), the category most of its pins are predicted as (``belongs_to``, with its share), and
    ``is_off_topic``: agreement below ``max_agreement`` and the pins mostly predicted as another category."""
    f = frame[["user", "board", "category"]].assign(suggested=suggested)
    f["agrees"] = f["suggested"] == f["category"]
    g = f.groupby(["user", "board"], sort=True)
    out = g.agg(category=("category", "first"), pins=("agrees", "size"), agreement=("agrees", "mean"))
    top = g["suggested"].agg(lambda s: s.value_counts().index[0])
    share = g["suggested"].agg(lambda s: s.value_counts().iloc[0] / len(s))
    out["belongs_to"], out["belongs_share"] = top, share
    out["is_off_topic"] = (out["agreement"] < max_agreement) & (out["belongs_to"] != out["category"])
    return out.reset_index().sort_values(["agreement", "user", "board"], kind="stable").reset_index(drop=True)


def duplicate_table(frame: pd.DataFrame, digests: np.ndarray, policy: CopyPolicy,
                    graph: tuple[np.ndarray, np.ndarray], progress=None, cache=None) -> pd.DataFrame:
    """``duplicates.csv``: one row per pin in a group of two or more copies, exact (same content digest) or near
    (``policy``: ``neighbors.duplicates.find_copies`` over the k-NN ``graph``, as ``train`` finds them), groups
    numbered largest first, with how many boards, users and categories each group spans, and the weakest near
    link that made it (``similarity``: cosine; ``pixel_score``: the pixel check; empty for exact copies). Its
    ``attrs`` hold the near candidates and those the pixels refused."""
    found = find_copies(digests, frame["path"].to_numpy(), policy, graph=graph, progress=progress, cache=cache)
    weakest = _weakest_links(found)
    cols = KEYS + ["category", "path"]
    d = frame[cols].assign(group=found["group"].to_numpy(), kind=found["kind"].to_numpy())
    d = d[d["group"] >= 0].copy()
    d["similarity"] = d["group"].map(weakest["similarity"]).astype(np.float64)
    d["pixel_score"] = d["group"].map(weakest["pixel_score"]).astype(np.float64)
    d["board_key"] = joined_keys(d, KEYS[:2])
    g = d.groupby("group")
    d["group_size"] = g["pin"].transform("size")
    d["group_boards"] = g["board_key"].transform("nunique")
    d["group_users"] = g["user"].transform("nunique")
    d["group_categories"] = g["category"].transform("nunique")
    order = d.groupby("group")["group_size"].first().sort_values(ascending=False, kind="stable")
    d["group"] = d["group"].map({old: new for new, old in enumerate(order.index)})
    d = d.sort_values(["group", "user", "board", "pin"], kind="stable")
    out = d[["group", "kind", *cols[:-1], "group_size", "group_boards", "group_users", "group_categories",
             "similarity", "pixel_score", "path"]].reset_index(drop=True)
    out.attrs.update(candidates=found.attrs["candidates"], rejected=found.attrs["rejected"])
    return out


def _weakest_links(found: pd.DataFrame) -> pd.DataFrame:
    """Per duplicate group, the lowest cosine and pixel score of its near links (NaN for exact-only groups)."""
    pairs = found.attrs["pairs"]
    near = pairs[pairs["kind"] == "near"]
    if near.empty:
        return pd.DataFrame(columns=["similarity", "pixel_score"], dtype=np.float64)
    near = near.assign(group=found["group"].to_numpy()[near["a"].to_numpy(np.int64)])
    if "pixel_score" not in near.columns:
        near = near.assign(pixel_score=np.nan)
    return near.groupby("group")[["similarity", "pixel_score"]].min()


def outlier_table(frame: pd.DataFrame, nn: FaissNeighbors, fraction: float) -> pd.DataFrame:
    """``outliers.csv``: every pin, farthest from everything first. ``score`` is cleanlab's outlier score over
    the faiss graph (``exp(-t * mean k-NN cosine distance / median)``, low = outlying); ``is_outlier`` marks the
    lowest ``fraction`` of pins."""
    from cleanlab.outlier import OutOfDistribution

    ood = OutOfDistribution(params={"knn": nn, "k": nn.n_neighbors})
    score = ood.score(features=nn._fit_X)
    dist = nn.kneighbors()[0].mean(axis=1)
    out = frame[KEYS + ["category"]].assign(score=score.astype(np.float64), mean_knn_distance=dist,
                                           path=frame["path"].to_numpy())
    out = out.sort_values(["score", "user", "board", "pin"], kind="stable").reset_index(drop=True)
    out["is_outlier"] = np.arange(len(out)) < int(round(fraction * len(out)))
    return out


def audited_pins(index: pd.DataFrame) -> pd.DataFrame:
    rows = index[index["embedded"]].reset_index(drop=True)
    return rows[["row", *KEYS, "category", "path"]].astype({k: str for k in KEYS + ["category"]})


def run_audit(cfg: DictConfig, emb, frame: pd.DataFrame, digests: np.ndarray, by_board: bool, policy: CopyPolicy,
              progress_factory=None) -> Findings:
    """All four findings for the pins ``frame`` of the store ``emb`` (``cfg.audit`` settings; copies by
    ``policy``)."""
    a = cfg.audit
    rows = frame["row"].to_numpy()
    classes, y = np.unique(frame["category"].to_numpy(), return_inverse=True)
    if len(classes) < 2:
        raise UserError(f"audit needs at least two categories; the store has {len(classes)}")
    groups = joined_keys(frame, KEYS[:2]).to_numpy() if by_board else np.arange(len(frame))
    n_folds = int(a.folds)
    if n_folds < 2:
        raise UserError(f"audit.folds={n_folds} must be >= 2")
    folds = board_folds(frame["category"].to_numpy(), groups, n_folds, int(a.seed))
    bar = progress_factory(len(np.unique(folds)), "out-of-fold model", "fold") if progress_factory else None
    cap = None if a.max_fit_per_category is None else int(a.max_fit_per_category)
    probs = oof_probabilities(emb, rows, y, len(classes), folds, OofModel(float(a.C), cap, int(a.seed)), bar)
    _close(bar)
    labels = label_issue_table(frame, probs, classes, y)
    boards = board_table(frame, classes[probs.argmax(axis=1)], float(a.off_topic_agreement))
    bar = progress_factory(len(frame), "neighbour graph", "pin") if progress_factory else None
    nn = FaissNeighbors(int(a.k), seed=int(a.seed), progress=bar).fit(emb, rows)
    sims, ids = nn.self_graph()
    _close(bar)
    bar = progress_factory(None, "pixel check of near copies", "pair") if progress_factory and policy.checks_pixels \
        else None
    dups = duplicate_table(frame, digests, policy, (sims, ids), bar, ScoreCache(config.data_dir(cfg) / PIXEL_SCORES))
    _close(bar)
    outliers = outlier_table(frame, nn, float(a.outlier_fraction))
    oof_accuracy = float((probs.argmax(axis=1) == y).mean())
    info = {"folds": int(len(np.unique(folds))), "folds_by": "board" if by_board else "pin",
            "neighbour_index": nn.kind_, "k": int(a.k), "copies": policy.describe(), "repins": policy.params(),
            "near_candidates": dups.attrs["candidates"], "near_candidates_rejected": dups.attrs["rejected"],
            "oof_accuracy": oof_accuracy,
            "categories": classes.tolist()}
    return Findings(frame, dups, labels, boards, outliers, info)


def _close(bar) -> None:
    if bar is not None:
        bar.close()


def write_findings(folder: Path, findings: Findings, store_meta: StoreMeta, settings: dict) -> dict:
    """The four CSVs and ``audit.json`` (counts, settings and the store's identity, which ``train`` checks)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, file in FILES.items():
        getattr(findings, name).to_csv(folder / file, index=False)
    info = {"counts": findings.counts(), **findings.info, "settings": settings,
            "rows_sha256": store_meta.rows_sha256, "store_created": store_meta.created}
    atomic_write_json(folder / INFO, info)
    return info


def joined_keys(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """``user/board/pin`` (or ``user/board``) of each row, built column-wise."""
    out = df[columns[0]].astype(str)
    for c in columns[1:]:
        out = out + "/" + df[c].astype(str)
    return out
