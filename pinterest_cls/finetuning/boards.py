"""``finetune`` on data with boards under ``train``'s protocol: the same per-category cap, the same test boards
(``split=group``), copies of a test pin kept off the training side by the same code (``learn.splits``), and a
validation slice of whole (linked) boards of the training side, so that early stopping never looks at a board, or
a copy, it trains on. The near copies come from the embedding store named by ``repins.store`` (its calibration,
as ``train`` uses it); without one, exact copies only, said so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pinterest_cls.core import config
from pinterest_cls.core.errors import UserError
from pinterest_cls.data.metadata import META
from pinterest_cls.data.store import open_store, rows_sha256
from pinterest_cls.learn.protocol import protocol, train_protocol
from pinterest_cls.learn.splits import (
    Splits,
    apply_repins,
    board_keys,
    find_repins,
    group_split,
    make_splits,
    sample_rows,
    split_table,
)
from pinterest_cls.neighbors.duplicates import duplicate_groups, link_boards

log = logging.getLogger(__name__)

#: Why a run under the board protocol found exact copies only, though near copies were asked for.
NO_STORE = "no embeddings store"
#: How a finetune run under the board protocol chooses its epoch, as its protocol's inner part says.
VALIDATION = "by board (one validation slice)"


@dataclass
class BoardSplit:
    """The pins (``frame``: user, board, pin, category, path), their sides (positions into ``frame``), the
    protocol string and the params of the run."""

    frame: pd.DataFrame
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    groups: np.ndarray
    protocol: str
    params: dict

    def table(self) -> pd.DataFrame:
        """``split.csv``: every pin's side (train, val, test or dropped) and why, as ``train`` writes it."""
        out = split_table(self.frame, Splits("group", [(np.concatenate([self.train, self.val]), self.test)], True),
                          self.groups)
        out.loc[out.index[self.val], "side"] = "val"
        return out


def protocol_config(cfg: DictConfig) -> DictConfig:
    """The settings of ``train``'s protocol that a finetune run under it shares (split, cap, repins, data)."""
    s = cfg.split
    return OmegaConf.create({
        "split": {"name": "group", "test_size": float(s.test_size), "seed": int(s.seed)},
        "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
        "repins": OmegaConf.to_container(cfg.repins, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "paths": OmegaConf.to_container(cfg.paths, resolve=True),
        "backbone": {"name": str(cfg.repins.store or "")}, "audit": {"exclude": [], "exclude_from": "train"},
    })


def board_split(cfg: DictConfig, ok: pd.DataFrame) -> BoardSplit:
    """The board protocol's split of the manifest's ok pins ``ok`` (``cfg``: finetune's settings)."""
    pcfg = protocol_config(cfg)
    mode = str(cfg.repins.mode)
    if mode not in ("drop", "off"):
        raise UserError(f"repins.mode={mode!r}: finetune takes drop or off (link needs whole linked groups of "
                        "boards on one side, which the validation slice does not keep)")
    store = _store(cfg)
    pins = ok if store is None else _embedded(store, ok)
    frame = sample_rows(pins.assign(embedded=True), cfg.sampling.max_per_category, int(cfg.sampling.seed))
    y = frame["category"].astype(str).to_numpy()
    if mode == "off":
        groups, info = np.full(len(frame), -1), {"repins_mode": "off", "repins_copies": ""}
        splits = make_splits(pcfg, frame, y)
    elif store is None:
        found = duplicate_groups(_digests(frame))
        groups = found["group"].to_numpy()
        copies = f"exact ({NO_STORE})" if cfg.repins.store else "exact"
        if cfg.repins.store:
            log.warning(f"note: repins.store={cfg.repins.store}: no complete store there, so exact copies only; "
                        f"extract it (python -m pinterest_cls.extract backbone={cfg.repins.store}) to find near "
                        "copies")
        splits, info = apply_repins(pcfg, frame, y, groups)
        info.update(repins_copies=copies, duplicate_groups=int(len(np.unique(groups[groups >= 0]))))
    else:
        groups, info = find_repins(pcfg, frame, store.vectors_of(frame), store, progress=True)
        splits, more = apply_repins(pcfg, frame, y, groups)
        info.update(more)
    (train, test), = splits.folds
    train, val = _validation(frame, train, groups, float(cfg.split.val_fraction), int(cfg.split.seed))
    rows = store.meta.rows_sha256 if store is not None else rows_sha256(ok)
    settings = train_protocol(pcfg, "group", VALIDATION, info.get("repins_copies", ""))
    params = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool)) or v is None}
    params.update(split_leaky=False, repins_store=str(cfg.repins.store))
    log.info(f"split=boards: {len(train)} training, {len(val)} validation and {len(test)} test pins, whole boards "
             f"on each side; repins {info.get('repins_copies') or 'off'}: {info.get('pins_dropped', 0)} training "
             "pins dropped")
    return BoardSplit(frame, train, val, test, groups, protocol(settings, rows), params)


def _validation(frame: pd.DataFrame, train: np.ndarray, groups: np.ndarray, fraction: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): whole boards of the training side, boards that share copies kept together."""
    part = frame.iloc[train].reset_index(drop=True)
    part = part.assign(linked=[f"linked{g}" for g in link_boards(board_keys(part), groups[train])])
    tr, va, _ = group_split(part, fraction, seed)
    if len(va) == 0:
        raise UserError("split=boards: no category has two training boards to take a validation slice from; add "
                        "boards or use split.mode=fractions (pins, leaky)")
    return train[tr], train[va]


def _store(cfg: DictConfig):
    """The complete store named by ``repins.store`` (None: not set, or not made yet)."""
    name = cfg.repins.store
    if not name:
        return None
    folder = config.embeddings_dir(cfg, str(name))
    if not (folder / META).is_file():
        return None
    store = open_store(folder)
    return store if store.meta.complete else None


def _embedded(store, ok: pd.DataFrame) -> pd.DataFrame:
    """The ok pins that hold a vector in ``store``, with its row (train's frame on the same store)."""
    pins = store.embedded()
    if set(pins["path"]) - set(ok["path"]):
        raise UserError(f"the store {store.folder} holds pins this scan has not (re-extracted since?); run python "
                        f"-m pinterest_cls.extract backbone={store.meta.backbone} first")
    keep = ok.drop(columns=[c for c in ("row",) if c in ok.columns])
    return pins[["row", "path"]].merge(keep, on="path", how="left")


def _digests(frame: pd.DataFrame) -> np.ndarray:
    return frame["digest"].to_numpy(dtype=object) if "digest" in frame.columns else np.full(len(frame), None)
