"""What is wrong with the data: copies of a pin (repins), pins whose board's category is likely wrong, boards
that drifted off their topic, and pins far from everything, computed over a finished embedding store.

- One cosine k-nearest-neighbour graph (:class:`~pinterest_cls.neighbors.FaissNeighbors`, exact or IVF, read
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

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from . import config
from .duplicates import duplicate_groups, keep_one, pairs_from_graph
from .errors import UserError
from .fileio import atomic_write_json
from .neighbors import FaissNeighbors, blocks, read_rows, unit_rows
from .pages import Page, esc
from .splits import Splits

log = logging.getLogger(__name__)

FILES = {"duplicates": "duplicates.csv", "label_issues": "label_issues.csv", "boards": "boards.csv",
         "outliers": "outliers.csv"}
INFO = "audit.json"
PAGE = "audit"
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


# --- out-of-fold probabilities ---------------------------------------------------------------------------------


def board_folds(categories: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """The fold of each pin: each category's boards (``groups``) are dealt round-robin, in a seeded order, over
    ``n_folds`` folds, so every fold's training side holds at least one board of every category. A category
    needs two boards; fewer is a :class:`UserError` naming them."""
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


def oof_probabilities(emb, rows: np.ndarray, y: np.ndarray, n_classes: int, folds: np.ndarray, C: float,
                      cap: int | None, seed: int, block: int = 8192, progress=None) -> np.ndarray:
    """(n, n_classes) probabilities, each pin's from a logistic regression on the unit-length embeddings
    ``emb[rows]`` fitted on the other folds, at most ``cap`` pins per category of them (seeded). The features are
    not standardised: that lets the model fit each board's own style, which does not carry to unseen boards."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(seed)
    probs = np.zeros((len(rows), n_classes), dtype=np.float32)
    for f in np.unique(folds):
        train = _capped(np.flatnonzero(folds != f), y, cap, rng)
        test = np.flatnonzero(folds == f)
        clf = LogisticRegression(C=C, max_iter=1000)
        clf.fit(unit_rows(read_rows(emb, 0, len(train), rows[train])), y[train])
        for lo, x in blocks(emb, rows[test], block):
            probs[np.ix_(test[lo:lo + len(x)], clf.classes_)] = clf.predict_proba(x)
        if progress is not None:
            progress.update(1)
    return probs


# --- the four findings -------------------------------------------------------------------------------------------


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


def duplicate_table(frame: pd.DataFrame, digests: np.ndarray, sims: np.ndarray, ids: np.ndarray,
                    threshold: float | None) -> pd.DataFrame:
    """``duplicates.csv``: one row per pin in a group of two or more exact (same content digest) or near (cosine
    >= ``threshold`` in the k-NN graph) copies, groups numbered largest first, with how many boards, users and
    categories each group spans."""
    near = pairs_from_graph(sims, ids, threshold) if threshold is not None else None
    found = duplicate_groups(digests, None, threshold, near=near)
    cols = KEYS + ["category", "path"]
    d = frame[cols].assign(group=found["group"].to_numpy(), kind=found["kind"].to_numpy())
    d = d[d["group"] >= 0].copy()
    d["board_key"] = _joined(d, KEYS[:2])
    g = d.groupby("group")
    d["group_size"] = g["pin"].transform("size")
    d["group_boards"] = g["board_key"].transform("nunique")
    d["group_users"] = g["user"].transform("nunique")
    d["group_categories"] = g["category"].transform("nunique")
    order = d.groupby("group")["group_size"].first().sort_values(ascending=False, kind="stable")
    d["group"] = d["group"].map({old: new for new, old in enumerate(order.index)})
    d = d.sort_values(["group", "user", "board", "pin"], kind="stable")
    return d[["group", "kind", *cols[:-1], "group_size", "group_boards", "group_users", "group_categories",
              "path"]].reset_index(drop=True)


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


# --- the audit ---------------------------------------------------------------------------------------------------


def audited_pins(index: pd.DataFrame) -> pd.DataFrame:
    rows = index[index["embedded"]].reset_index(drop=True)
    return rows[["row", *KEYS, "category", "path"]].astype({k: str for k in KEYS + ["category"]})


def run_audit(cfg: DictConfig, emb, frame: pd.DataFrame, digests: np.ndarray, by_board: bool,
              progress_factory=None) -> Findings:
    """All four findings for the pins ``frame`` of the store ``emb`` (``cfg.audit`` settings)."""
    a = cfg.audit
    rows = frame["row"].to_numpy()
    classes, y = np.unique(frame["category"].to_numpy(), return_inverse=True)
    if len(classes) < 2:
        raise UserError(f"audit needs at least two categories; the store has {len(classes)}")
    groups = _joined(frame, KEYS[:2]).to_numpy() if by_board else np.arange(len(frame))
    n_folds = int(a.folds)
    if n_folds < 2:
        raise UserError(f"audit.folds={n_folds} must be >= 2")
    folds = board_folds(frame["category"].to_numpy(), groups, n_folds, int(a.seed))
    bar = progress_factory(len(np.unique(folds)), "out-of-fold model", "fold") if progress_factory else None
    cap = None if a.max_fit_per_category is None else int(a.max_fit_per_category)
    probs = oof_probabilities(emb, rows, y, len(classes), folds, float(a.C), cap, int(a.seed), progress=bar)
    _close(bar)
    labels = label_issue_table(frame, probs, classes, y)
    boards = board_table(frame, classes[probs.argmax(axis=1)], float(a.off_topic_agreement))
    bar = progress_factory(len(frame), "neighbour graph", "pin") if progress_factory else None
    nn = FaissNeighbors(int(a.k), exact_max=int(a.exact_max), nprobe=int(a.nprobe), seed=int(a.seed),
                        progress=bar).fit(emb, rows)
    sims, ids = nn.self_graph()
    _close(bar)
    threshold = None if a.near_threshold is None else float(a.near_threshold)
    dups = duplicate_table(frame, digests, sims, ids, threshold)
    outliers = outlier_table(frame, nn, float(a.outlier_fraction))
    oof_accuracy = float((probs.argmax(axis=1) == y).mean())
    info = {"folds": int(len(np.unique(folds))), "folds_by": "board" if by_board else "pin",
            "neighbour_index": nn.kind_, "k": int(a.k), "near_threshold": threshold, "oof_accuracy": oof_accuracy,
            "categories": classes.tolist()}
    return Findings(frame, dups, labels, boards, outliers, info)


def _close(bar) -> None:
    if bar is not None:
        bar.close()


def write_findings(folder: Path, findings: Findings, store_meta: dict, settings: dict) -> dict:
    """The four CSVs and ``audit.json`` (counts, settings and the store's identity, which ``train`` checks)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, file in FILES.items():
        getattr(findings, name).to_csv(folder / file, index=False)
    info = {"counts": findings.counts(), **findings.info, "settings": settings,
            "rows_sha256": store_meta.get("fingerprint", {}).get("rows_sha256", ""),
            "store_created": store_meta.get("created")}
    atomic_write_json(folder / INFO, info)
    return info


# --- using the findings ------------------------------------------------------------------------------------------


def flagged(folder: Path, frame: pd.DataFrame, kinds: list[str], rows_sha256: str) -> tuple[np.ndarray, dict]:
    """(mask over ``frame``'s pins that the audit in ``folder`` flags for any of ``kinds``, pins per kind).
    The audit must have been made on this store (same rows); else a :class:`UserError` says to re-run it."""
    unknown = sorted(set(kinds) - set(EXCLUDABLE))
    if unknown:
        raise UserError(f"audit.exclude: unknown {', '.join(unknown)}; choose from {', '.join(EXCLUDABLE)}")
    if not (folder / INFO).is_file():
        raise UserError(f"audit.exclude needs the audit's findings, but {folder / INFO} does not exist; "
                        "run python -m pinterest_cls.audit with the same data and backbone first")
    info = json.loads((folder / INFO).read_text())
    if info.get("rows_sha256") != rows_sha256:
        raise UserError(f"the audit in {folder} was made on other embeddings than this store's; re-run "
                        "python -m pinterest_cls.audit before training with audit.exclude")
    mask, per_kind = np.zeros(len(frame), dtype=bool), {}
    for kind in kinds:
        hit = _flagged_mask(folder, frame, kind)
        per_kind[kind] = int(hit.sum())
        mask |= hit
    return mask, per_kind


def apply_exclusions(cfg: DictConfig, frame: pd.DataFrame, splits: Splits, rows_sha256: str) -> tuple[Splits, dict]:
    """``train audit.exclude=[...]``: the split without the pins the audit flags, from the training side of each
    fold (``audit.exclude_from=train``, so runs with and without exclusion are scored on the same test pins) or
    from both sides (``all``); and the run's params (``audit_exclude``; ``audit_flagged_pins`` and per kind
    ``audit_flagged_<kind>`` among the sampled pins; ``audit_excluded_pins``, those some fold left out)."""
    kinds = [str(k) for k in (config.select(cfg, "audit.exclude") or [])]
    if not kinds:
        return splits, {}
    sides = str(config.select(cfg, "audit.exclude_from"))
    if sides not in ("train", "all"):
        raise UserError(f"audit.exclude_from={sides!r} must be train (training side only) or all")
    mask, per_kind = flagged(config.audit_dir(cfg), frame, kinds, rows_sha256)
    folds, gone = [], []
    for tr, te in splits.folds:
        out = np.concatenate([tr[mask[tr]], te[mask[te]] if sides == "all" else te[:0]])
        folds.append((tr[~mask[tr]], te[~mask[te]] if sides == "all" else te))
        gone.append(out)
    left_out = int(len(np.unique(np.concatenate(gone)))) if gone else 0
    info = {"audit_exclude": ",".join(sorted(kinds)), "audit_exclude_from": sides,
            "audit_flagged_pins": int(mask.sum()), "audit_excluded_pins": left_out,
            **{f"audit_flagged_{k}": n for k, n in per_kind.items()}}
    log.info(f"audit.exclude: {int(mask.sum())} pins flagged ("
             + ", ".join(f"{k} {n}" for k, n in per_kind.items()) + f"); {left_out} left out of "
             f"{'training' if sides == 'train' else 'training and test'}")
    return Splits(splits.name, folds, splits.grouped, {**splits.info, "audit_excluded": gone}), info


def exclusion_settings(kinds, sides: str) -> str:
    """How a run used the audit, as its protocol records it: ``""`` (no exclusion) or e.g.
    ``audit-excluded duplicates,label_issues from train``."""
    kinds = sorted(str(k) for k in (kinds or []))
    return f"audit-excluded {','.join(kinds)} from {sides}" if kinds else ""


def _joined(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """``user/board/pin`` (or ``user/board``) of each row, built column-wise."""
    out = df[columns[0]].astype(str)
    for c in columns[1:]:
        out = out + "/" + df[c].astype(str)
    return out


def _flagged_mask(folder: Path, frame: pd.DataFrame, kind: str) -> np.ndarray:
    """Which of ``frame``'s pins the audit flags for ``kind``: the pins of off-topic boards, all but the first pin
    of each duplicate group, or the pins marked ``is_issue`` / ``is_outlier``."""
    df = pd.read_csv(folder / FILES["boards" if kind == "off_topic" else kind], dtype={k: str for k in KEYS},
                     keep_default_na=False)
    if kind == "off_topic":
        return _joined(frame, KEYS[:2]).isin(set(_joined(df[df["is_off_topic"]], KEYS[:2]))).to_numpy()
    if kind == "duplicates":
        kept, _ = keep_one(np.arange(len(df)), df["group"].to_numpy())  # one pin per group stays
        df = df.drop(index=kept)
    else:
        df = df[df[{"label_issues": "is_issue", "outliers": "is_outlier"}[kind]]]
    return _joined(frame, KEYS).isin(set(_joined(df, KEYS))).to_numpy()


# --- the page ----------------------------------------------------------------------------------------------------


def write_page(folder: Path, findings: Findings, title: str, top: int = 24) -> Path:
    """``audit.html``: thumbnails of duplicate groups side by side, the top label issues (given vs suggested),
    off-topic boards and outliers, with the counts; thumbnails under ``thumbs/`` beside it."""
    page = Page(folder, title, name=PAGE)
    c = findings.counts()
    page.paragraph(
        f"{c['pins']} pins audited. {c['duplicate_groups']} duplicate groups ({c['pins_in_duplicate_groups']} pins; "
        f"{c['duplicate_groups_across_boards']} across boards, {c['duplicate_groups_across_users']} across users, "
        f"{c['duplicate_groups_across_categories']} across categories); {c['label_issues']} likely mislabeled pins; "
        f"{c['off_topic_boards']} of {c['boards']} boards off-topic; {c['outliers']} outliers. Out-of-fold model: "
        f"{findings.info['folds']} folds by {findings.info['folds_by']}, accuracy "
        f"{findings.info['oof_accuracy']:.3f}. Full lists: " + ", ".join(FILES.values()) + ".")
    _duplicate_section(page, findings.duplicates, top)
    _label_section(page, findings.label_issues, top)
    _board_section(page, findings.boards, findings.label_issues, top)
    _outlier_section(page, findings.outliers, top)
    return page.write()


def _thumb_name(r) -> str:
    """A file name for a pin's thumbnail (a digest: pin names may hold any character)."""
    return hashlib.sha1(f"{r.user}/{r.board}/{r.pin}".encode()).hexdigest()[:16]


def _duplicate_section(page: Page, d: pd.DataFrame, top: int) -> None:
    page.heading("Duplicate groups (largest first)")
    if d.empty:
        page.paragraph("No copies found.")
        return
    groups = []
    for gid, g in list(d.groupby("group", sort=True))[:top]:
        first = g.iloc[0]
        spans = " · ".join(_count(n, word) for n, word in ((first.group_size, "pin"), (first.group_boards, "board"),
                                                           (first.group_users, "user"),
                                                           (first.group_categories, "category")))
        tiles = [page.tile(r.path, _thumb_name(r),
                           [esc(f"{r.user}/{r.board}/{r.pin}"), esc(f"{r.category} ({r.kind})")])
                 for r in g.head(8).itertuples()]
        groups.append(f'<div class="group"><b>group {gid}</b>: {esc(spans)}<div class="tiles">{"".join(tiles)}'
                      "</div></div>")
    page.tiles(groups)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {'categories' if word == 'category' else word + 's'}"


def _label_section(page: Page, labels: pd.DataFrame, top: int) -> None:
    page.heading("Likely mislabeled pins (lowest label quality first)")
    shown = labels[labels["is_issue"]].head(top)
    if shown.empty:
        page.paragraph("cleanlab flags no pin.")
        return
    page.tiles([page.tile(r.path, _thumb_name(r), [esc(f"{r.user}/{r.board}/{r.pin}"),
                                            f'given <span class="bad">{esc(r.given)}</span>',
                                            f'suggested <span class="good">{esc(r.suggested)}</span>',
                                            esc(f"score {r.score:.3f}")]) for r in shown.itertuples()])


def _board_section(page: Page, boards: pd.DataFrame, labels: pd.DataFrame, top: int) -> None:
    page.heading("Off-topic boards")
    off = boards[boards["is_off_topic"]].head(top)
    if off.empty:
        page.paragraph("No board is off-topic.")
    for b in off.itertuples():
        pins = labels[(labels["user"] == b.user) & (labels["board"] == b.board)].head(8)
        tiles = [page.tile(r.path, _thumb_name(r), [esc(r.pin), esc(f"predicted {r.suggested}")])
                 for r in pins.itertuples()]
        page.raw(f'<div class="group"><b>{esc(b.user)}/{esc(b.board)}</b>: labelled {esc(b.category)}, '
                 f"{b.pins} pins, agreement {b.agreement:.2f}; mostly {esc(b.belongs_to)} "
                 f'({b.belongs_share:.0%})<div class="tiles">{"".join(tiles)}</div></div>')
    page.heading("Boards by agreement (lowest first)", level=3)
    page.table(boards[["user", "board", "category", "pins", "agreement", "belongs_to", "is_off_topic"]], max_rows=20)


def _outlier_section(page: Page, outliers: pd.DataFrame, top: int) -> None:
    page.heading("Outliers (farthest from everything first)")
    shown = outliers[outliers["is_outlier"]].head(top)
    if shown.empty:
        page.paragraph("No pin flagged (audit.outlier_fraction=0).")
        return
    page.tiles([page.tile(r.path, _thumb_name(r), [esc(f"{r.user}/{r.board}/{r.pin}"), esc(r.category),
                                            esc(f"score {r.score:.3f}, distance {r.mean_knn_distance:.3f}")])
                for r in shown.itertuples()])
