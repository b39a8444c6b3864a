"""Splits: which pins train and which test. Per-category sampling, board-wise and pin-wise splits, the inner CV
that keeps boards apart, and repins (copies of a test pin never on the training side)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pinterest_cls.core import config
from pinterest_cls.core.errors import UserError
from pinterest_cls.core.progress import progress_bar
from pinterest_cls.data.manifest import pin_digests
from pinterest_cls.data.pixel_match import PIXEL_SCORES, ScoreCache
from pinterest_cls.learn.protocol import resolve_split_name
from pinterest_cls.neighbors.duplicates import (
    NOT_CALIBRATED,
    calibration_note,
    copy_policy,
    drop_train_copies,
    find_copies,
    keep_one,
    leaked,
    link_boards,
)

log = logging.getLogger(__name__)


def sample_rows(index: pd.DataFrame, max_per_category, seed: int) -> pd.DataFrame:
    """Embedded rows, at most ``max_per_category`` per category (seeded), in row order."""
    rows = index[index["embedded"]]
    if max_per_category is None:
        return rows.reset_index(drop=True)
    cap = int(max_per_category)
    if cap < 1:
        raise UserError(f"sampling.max_per_category={cap} must be >= 1 (or null for all)")
    rng = np.random.default_rng(seed)
    keep = []
    for _, g in rows.groupby("category", sort=True):
        pos = g.index.to_numpy()
        keep.append(np.sort(rng.choice(pos, size=cap, replace=False)) if len(pos) > cap else pos)
    return rows.loc[np.sort(np.concatenate(keep))].reset_index(drop=True)


@dataclass
class Splits:
    name: str
    folds: list[tuple[np.ndarray, np.ndarray]]  # (train positions, test positions)
    grouped: bool  # whole boards per side (inner CV then groups by board too)
    info: dict = field(default_factory=dict)


def board_keys(frame: pd.DataFrame) -> np.ndarray:
    """The unit a board-wise split keeps on one side: the board, or its linked group of boards (boards that
    share copies of a pin, when ``repins.mode=link``: column ``linked``)."""
    if "linked" in frame.columns:
        return frame["linked"].astype(str).to_numpy()
    return (frame["user"].astype(str) + "/" + frame["board"].astype(str)).to_numpy()


def find_repins(cfg: DictConfig, frame: pd.DataFrame, X: np.ndarray, store, progress: bool = False
                ) -> tuple[np.ndarray, dict]:
    """Duplicate group of each sampled pin (-1: no copy among them) by the ``repins`` settings on ``store`` (its
    calibration; ``neighbors.duplicates.find_copies``, as ``audit`` finds them): exact copies from the scan's
    content digests, near copies among the embeddings ``X`` verified on the pins' files; and counts for the run."""
    policy = copy_policy(cfg.repins, store.folder, store.meta)
    if policy.source == NOT_CALIBRATED:
        log.warning(calibration_note(store.folder, store.meta, str(cfg.backbone.name)))
    with progress_bar(None, "pixel check of near copies", "pair", progress and policy.checks_pixels) as bar:
        found = find_copies(pin_digests(cfg, frame), frame["path"].to_numpy(), policy, vectors=X, progress=bar,
                            cache=ScoreCache(config.data_dir(cfg) / PIXEL_SCORES))
    groups = found["group"].to_numpy()
    info = {**policy.params(), "repins_copies": policy.describe(),
            "duplicate_groups": int(len(np.unique(groups[groups >= 0]))), "pins_with_copies": int((groups >= 0).sum()),
            "exact_copies": int((found["kind"] == "exact").sum()), "near_candidates": found.attrs["candidates"],
            "near_candidates_rejected": found.attrs["rejected"]}
    return groups, info


def apply_repins(cfg: DictConfig, frame: pd.DataFrame, y: np.ndarray, groups: np.ndarray) -> tuple[Splits, dict]:
    """The split with no copy of a test pin on the training side: ``repins.mode=drop`` keeps the board split and
    drops the training-side copies; ``link`` splits linked groups of boards (boards sharing copies) whole."""
    mode = str(cfg.repins.mode)
    plain = make_splits(cfg, frame, y)
    before = sum(leaked(tr, te, groups) for tr, te in plain.folds)
    info = {"repins_mode": mode, "test_pins_with_train_copy_before": before}
    if mode == "link":
        if not plain.grouped:
            raise UserError(f"repins.mode=link keeps linked boards on one side, which needs a board-wise split; "
                            f"split={plain.name} splits pins: use repins.mode=drop")
        boards = board_keys(frame)
        linked = link_boards(boards, groups)
        frame["linked"] = [f"linked{g}" for g in linked]
        splits = make_splits(cfg, frame, y)
        info["boards_linked"] = int(len(np.unique(boards)) - len(np.unique(linked)))
        info["pins_dropped"] = 0
    else:
        folds, dropped = [], 0
        for tr, te in plain.folds:
            kept, gone = drop_train_copies(tr, te, groups)
            folds.append((kept, te))
            dropped += len(gone)
        info["pins_dropped"] = dropped
        splits = Splits(plain.name, folds, plain.grouped, dict(plain.info))
    if bool(cfg.repins.keep_one):
        splits = keep_one_per_group(splits, groups)
        info["pins_deduplicated"] = sum(len(d) for d in splits.info["keep_one_dropped"])
    return splits, info


def keep_one_per_group(splits: Splits, groups: np.ndarray) -> Splits:
    """``repins.keep_one``: each side of each fold keeps one pin per duplicate group, so a repinned image neither
    weighs several times in training nor counts several times in the test metrics."""
    folds, gone = [], []
    for tr, te in splits.folds:
        (tr_kept, tr_gone), (te_kept, te_gone) = keep_one(tr, groups), keep_one(te, groups)
        folds.append((tr_kept, te_kept))
        gone.append(np.concatenate([tr_gone, te_gone]))
    return Splits(splits.name, folds, splits.grouped, {**splits.info, "keep_one_dropped": gone})


def split_table(frame: pd.DataFrame, splits: Splits, groups: np.ndarray | None) -> pd.DataFrame:
    """``split.csv``: for each fold, every sampled pin's side (train, test or dropped) and why."""
    parts = []
    for f, (tr, te) in enumerate(splits.folds):
        side = np.full(len(frame), "dropped", dtype=object)
        side[tr], side[te] = "train", "test"
        reason = np.full(len(frame), "", dtype=object)
        if groups is not None:
            tested = set(groups[te][groups[te] >= 0])
            reason[(side == "dropped") & np.isin(groups, list(tested))] = "a copy is on the test side"
        if "audit_excluded" in splits.info:
            reason[splits.info["audit_excluded"][f]] = "flagged by the audit (audit.exclude)"
        if "keep_one_dropped" in splits.info:
            reason[splits.info["keep_one_dropped"][f]] = "another copy is kept on this side (repins.keep_one)"
        part = frame[["user", "board", "pin"]].copy()
        part.insert(0, "fold", f)
        part["side"], part["reason"] = side, reason
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def group_split(frame: pd.DataFrame, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per category, whole boards (in a seeded order) go to test until it holds >= test_size of the
    category's pins, keeping at least one board for training. Single-board categories only train."""
    rng = np.random.default_rng(seed)
    boards = board_keys(frame)
    test_mask = np.zeros(len(frame), dtype=bool)
    single = []
    for cat, g in frame.groupby("category", sort=True):
        pos = g.index.to_numpy()
        cat_boards = np.unique(boards[pos])
        if len(cat_boards) < 2:
            single.append(str(cat))
            continue
        sizes = pd.Series(boards[pos]).value_counts()
        taken = 0
        for b in rng.permutation(cat_boards)[:-1]:  # the last board always stays in training
            if taken >= test_size * len(pos):
                break
            test_mask[pos[boards[pos] == b]] = True
            taken += int(sizes[b])
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask), single


def _random(cfg: DictConfig, frame: pd.DataFrame, y: np.ndarray, stratify: bool = False) -> Splits:
    from sklearn.model_selection import train_test_split

    name = "stratified" if stratify else "random"
    try:
        tr, te = train_test_split(np.arange(len(frame)), test_size=float(cfg.split.test_size),
                                  random_state=int(cfg.split.seed), stratify=y if stratify else None)
    except ValueError as exc:
        raise UserError(f"split={name}: {exc}") from None
    return Splits(name, [(np.sort(tr), np.sort(te))], grouped=False)


def _stratified(cfg: DictConfig, frame: pd.DataFrame, y: np.ndarray) -> Splits:
    return _random(cfg, frame, y, stratify=True)


def _group(cfg: DictConfig, frame: pd.DataFrame, y: np.ndarray) -> Splits:
    tr, te, single = group_split(frame, float(cfg.split.test_size), int(cfg.split.seed))
    if single:
        log.info(f"split=group: categories with a single board are left out of the test metrics "
                 f"(their pins only train): {', '.join(single)}")
    if len(te) == 0:
        raise UserError("split=group: no category has two boards, so nothing can be tested; use split=stratified")
    return Splits("group", [(tr, te)], grouped=True, info={"single_board_categories": single})


def _kfold(cfg: DictConfig, frame: pd.DataFrame, y: np.ndarray) -> Splits:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    s = cfg.split
    k, seed, positions = int(s.folds), int(s.seed), np.arange(len(frame))
    by_board = str(cfg.data.layout) == "pinterest" if s.by_board in ("auto", None) else bool(s.by_board)
    if k < 2:
        raise UserError(f"split.folds={k} must be >= 2")
    if by_board:
        cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        folds = list(cv.split(positions, y, groups=board_keys(frame)))
    else:
        folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(positions, y))
    return Splits("kfold", folds, grouped=by_board, info={"folds": k, "by_board": by_board})


def _predefined(cfg: DictConfig, frame: pd.DataFrame, y: np.ndarray) -> Splits:
    col, value = str(cfg.split.column), str(cfg.split.test_value)
    if col not in frame.columns:
        raise UserError(f"split.column={col!r} must be one of: user, board, pin")
    test = frame[col].astype(str).to_numpy() == value
    if not test.any() or test.all():
        raise UserError(f"split=predefined: {int(test.sum())} of {len(frame)} rows have {col} == {value!r}; "
                        "both sides need rows (see split.column and split.test_value)")
    return Splits("predefined", [(np.flatnonzero(~test), np.flatnonzero(test))], grouped=False,
                  info={"column": col, "test_value": value})


#: ``split.name`` -> the function that makes that split (``auto`` resolves to one of them first).
SPLITS: dict[str, Callable[[DictConfig, pd.DataFrame, np.ndarray], Splits]] = {
    "random": _random, "stratified": _stratified, "group": _group, "kfold": _kfold, "predefined": _predefined,
}


def make_splits(cfg: DictConfig, frame: pd.DataFrame, y: np.ndarray) -> Splits:
    """The split ``split.name`` names (one registry lookup; ``auto`` resolves by the data's layout)."""
    name = resolve_split_name(str(cfg.split.name), str(cfg.data.layout))
    if name not in SPLITS:
        raise UserError(f"split={name!r} is not a split; choose one of: auto, {', '.join(SPLITS)}")
    return SPLITS[name](cfg, frame, y)


def has_boards(cfg: DictConfig) -> bool:
    """Whether pins come in boards whose mates share a style (the pinterest layout; imagefolder's "board" is
    its class folder)."""
    return str(cfg.data.layout) == "pinterest"


def inner_cv(cfg: DictConfig, frame: pd.DataFrame, y: np.ndarray, grouped: bool, seed: int):
    """(CV splitter, groups, description, leaky) for the grid search on the training side.

    Where the data has boards, folds hold whole boards: stratified by category (``StratifiedGroupKFold``) when
    every category has at least two training boards, else ``GroupKFold`` (a category with one training board is
    then validated by models that did not see it: a lower CV score, never an inflated one), with as many folds
    as the boards allow. A pin-level CV is used only where there are no boards, or when asked for with
    ``split.inner=stratified`` (``leaky`` is then True)."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold

    folds = int(cfg.train.cv_folds)
    inner = str(config.select(cfg, "split.inner"))
    if inner not in ("auto", "stratified"):
        raise UserError(f"split.inner={inner!r} must be auto (by board where the data has boards) or stratified")
    if inner == "auto" and (grouped or has_boards(cfg)):
        boards = board_keys(frame)
        per_class = pd.Series(boards).groupby(y).nunique()
        n = min(folds, int(per_class.min()))
        if n >= 2:
            return (StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed), boards,
                    f"{n}-fold by board", False)
        n = min(folds, len(np.unique(boards)))
        if n < 2:
            raise UserError("the training side holds a single board, so no cross-validation can keep boards apart; "
                            "add boards, or opt in to a leaky pin-level inner CV with split.inner=stratified")
        single = ", ".join(sorted(map(str, per_class.index[per_class < 2])))
        cv = GroupKFold(n_splits=n)
        if any(len(set(y[tr])) < 2 for tr, _ in cv.split(frame, y, groups=boards)):
            raise UserError(f"the inner CV by board leaves a fold that trains on a single category (categories with "
                            f"one training board: {single}); add boards, or opt in to a leaky pin-level inner CV "
                            "with split.inner=stratified")
        return cv, boards, f"{n}-fold by board, unstratified (one training board: {single})", False
    n = min(folds, int(np.bincount(np.unique(y, return_inverse=True)[1]).min()))
    if n < 2:
        raise UserError("a category has fewer than 2 training samples, too few for cross-validation; raise "
                        "sampling.max_per_category or drop the category (data.reject_categories)")
    leaky = grouped or has_boards(cfg)
    desc = f"{n}-fold by pin" + (" (split.inner=stratified: board-mates on both sides, leaky)" if leaky else "")
    return StratifiedKFold(n_splits=n, shuffle=True, random_state=seed), None, desc, leaky


def split_for_run(cfg: DictConfig, frame: pd.DataFrame, X: np.ndarray, y: np.ndarray, store,
                  progress: bool = False) -> tuple[Splits, np.ndarray | None, dict]:
    """The run's split, with repins handled as ``repins.*`` asks on ``store`` (its calibration): (splits,
    duplicate group per pin or None, counts for the run's params, among them ``repins_copies``, what the protocol
    records)."""
    mode = str(cfg.repins.mode)
    if mode not in ("drop", "link", "off"):
        raise UserError(f"repins.mode={mode!r} must be drop, link or off")
    if mode == "off":
        if bool(cfg.repins.keep_one):
            raise UserError("repins.keep_one=true needs the duplicate groups: set repins.mode=drop or link")
        return make_splits(cfg, frame, y), None, {"repins_mode": "off", "repins_copies": ""}
    groups, info = find_repins(cfg, frame, X, store, progress)
    splits, more = apply_repins(cfg, frame, y, groups)
    info.update(more)
    log.info(f"repins ({info['repins_copies']}): {info['pins_with_copies']} pins in {info['duplicate_groups']} "
             f"duplicate groups ({info['near_candidates']} near candidates, {info['near_candidates_rejected']} "
             "refused by their pixels); "
             f"{info['test_pins_with_train_copy_before']} test pins had a copy in training; "
             + (f"{info['boards_linked']} boards linked" if info["repins_mode"] == "link"
                else f"{info['pins_dropped']} training pins dropped")
             + (f"; {info['pins_deduplicated']} further copies dropped to keep one per group and side"
                if "pins_deduplicated" in info else ""))
    return splits, groups, info
