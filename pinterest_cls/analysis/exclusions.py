"""``train audit.exclude=[...]``: the pins an audit flagged, left out of a run's split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pinterest_cls.analysis.findings import EXCLUDABLE, FILES, INFO, KEYS, joined_keys
from pinterest_cls.core import config
from pinterest_cls.core.errors import UserError
from pinterest_cls.learn.splits import Splits
from pinterest_cls.neighbors.duplicates import keep_one

log = logging.getLogger(__name__)


def flagged(folder: Path, frame: pd.DataFrame, kinds: list[str], rows_sha256: str) -> tuple[np.ndarray, dict]:
    """(mask over ``frame``'s pins that the audit in ``folder`` flags for any of ``kinds``, pins per kind).
    The audit must have been made on this store (same rows); else a ``UserError`` says to re-run it."""
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


def _flagged_mask(folder: Path, frame: pd.DataFrame, kind: str) -> np.ndarray:
    """Which of ``frame``'s pins the audit flags for ``kind``: the pins of off-topic boards, all but the first pin
    of each duplicate group, or the pins marked ``is_issue`` / ``is_outlier``."""
    df = pd.read_csv(folder / FILES["boards" if kind == "off_topic" else kind], dtype={k: str for k in KEYS},
                     keep_default_na=False)
    if kind == "off_topic":
        return joined_keys(frame, KEYS[:2]).isin(set(joined_keys(df[df["is_off_topic"]], KEYS[:2]))).to_numpy()
    if kind == "duplicates":
        kept, _ = keep_one(np.arange(len(df)), df["group"].to_numpy())  # one pin per group stays
        df = df.drop(index=kept)
    else:
        df = df[df[{"label_issues": "is_issue", "outliers": "is_outlier"}[kind]]]
    return joined_keys(frame, KEYS).isin(set(joined_keys(df, KEYS))).to_numpy()
