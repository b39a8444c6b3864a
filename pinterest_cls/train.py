"""``python -m pinterest_cls.train backbone=NAME classifier=NAME``: a classifier on stored embeddings, with
grid search, held-out (or k-fold) evaluation and everything logged to MLflow."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from . import config
from .catalog import file_sha256
from .errors import UserError, user_errors_exit
from .store import META, open_embeddings

PREPROCESS_STEPS = ("l2", "standardize", "pca")


# --- inputs --------------------------------------------------------------------------------------------------


def extract_command(cfg: DictConfig) -> str:
    b = cfg.backbone
    parts = ["python -m pinterest_cls.extract"]
    parts.append(f"backbone=timm backbone.model={b.model}" if b.get("kind") == "timm" else f"backbone={b.name}")
    if cfg.data.root:
        parts.append(f"data.root={cfg.data.root}")
        if cfg.data.layout != "pinterest":
            parts.append(f"data.layout={cfg.data.layout}")
    if str(cfg.paths.work) != "./work":
        parts.append(f"paths.work={cfg.paths.work}")
    return " ".join(parts)


def embeddings_folder(cfg: DictConfig) -> Path:
    return config.data_dir(cfg) / "embeddings" / str(cfg.backbone.name)


def open_store(cfg: DictConfig):
    """(embeddings memory-mapped, index, meta, folder) for this config's backbone, with clear errors."""
    folder = embeddings_folder(cfg)
    if not (folder / META).is_file():
        raise UserError(f"no embeddings for backbone {cfg.backbone.name} in {folder}; "
                        f"run first: {extract_command(cfg)}")
    emb, index, meta = open_embeddings(folder)
    if not meta.get("complete"):
        raise UserError(f"embeddings in {folder} are incomplete ({meta.get('rows_done')}/{meta.get('rows')} rows "
                        f"done); finish them (extract resumes): {extract_command(cfg)}")
    return emb, index, meta, folder


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


def load_xy(emb: np.ndarray, rows: pd.DataFrame) -> np.ndarray:
    """Only the sampled rows are read from the memory-mapped array."""
    return np.asarray(emb[rows["row"].to_numpy()], dtype=np.float32)


# --- splits --------------------------------------------------------------------------------------------------


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


def find_repins(cfg: DictConfig, frame: pd.DataFrame, X: np.ndarray) -> tuple[np.ndarray, dict]:
    """Duplicate group of each sampled pin (-1: no copy among them), from the scan's content digests (exact
    copies) and the embeddings (near copies: cosine >= ``repins.threshold``), and counts for the run."""
    from .catalog import MANIFEST, load_manifest
    from .duplicates import duplicate_groups

    digests = np.full(len(frame), None, dtype=object)
    manifest_path = config.data_dir(cfg) / MANIFEST
    if manifest_path.is_file():
        manifest = load_manifest(config.data_dir(cfg))
        if "digest" in manifest.columns:
            digests = frame["path"].map(manifest.set_index("path")["digest"]).to_numpy(dtype=object)
    if pd.isna(digests).all():
        print(f"note: {manifest_path} has no content digests (scanned before they were recorded): exact copies "
              "are found only as near copies; re-run scan to record them", flush=True)
    threshold = None if cfg.repins.threshold is None else float(cfg.repins.threshold)
    found = duplicate_groups(digests, X if threshold is not None else None, threshold, k=int(cfg.repins.k))
    groups = found["group"].to_numpy()
    info = {"repins_threshold": threshold, "duplicate_groups": int(len(np.unique(groups[groups >= 0]))),
            "pins_with_copies": int((groups >= 0).sum()), "exact_copies": int((found["kind"] == "exact").sum())}
    return groups, info


def apply_repins(cfg: DictConfig, frame: pd.DataFrame, y: np.ndarray, groups: np.ndarray) -> tuple[Splits, dict]:
    """The split with no copy of a test pin on the training side: ``repins.mode=drop`` keeps the board split and
    drops the training-side copies; ``link`` splits linked groups of boards (boards sharing copies) whole."""
    from .duplicates import drop_train_copies, leaked, link_boards

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
    from .duplicates import keep_one

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


def make_splits(cfg: DictConfig, frame: pd.DataFrame, y: np.ndarray) -> Splits:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

    from .evaluation import resolve_split_name

    s = cfg.split
    name = str(s.name)
    layout = str(cfg.data.layout)
    name = resolve_split_name(name, layout)
    positions = np.arange(len(frame))
    seed = int(s.seed)
    if name in ("random", "stratified"):
        test_size = float(s.test_size)
        try:
            tr, te = train_test_split(positions, test_size=test_size, random_state=seed,
                                      stratify=y if name == "stratified" else None)
        except ValueError as exc:
            raise UserError(f"split={name}: {exc}") from None
        return Splits(name, [(np.sort(tr), np.sort(te))], grouped=False)
    if name == "group":
        tr, te, single = group_split(frame, float(s.test_size), seed)
        if single:
            print(f"split=group: categories with a single board are left out of the test metrics "
                  f"(their pins only train): {', '.join(single)}", flush=True)
        if len(te) == 0:
            raise UserError("split=group: no category has two boards, so nothing can be tested; "
                            "use split=stratified")
        return Splits(name, [(tr, te)], grouped=True, info={"single_board_categories": single})
    if name == "kfold":
        k = int(s.folds)
        by_board = s.by_board
        by_board = layout == "pinterest" if by_board in ("auto", None) else bool(by_board)
        if k < 2:
            raise UserError(f"split.folds={k} must be >= 2")
        if by_board:
            cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            folds = list(cv.split(positions, y, groups=board_keys(frame)))
        else:
            folds = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(positions, y))
        return Splits("kfold", folds, grouped=by_board, info={"folds": k, "by_board": by_board})
    if name == "predefined":
        col, value = str(s.column), str(s.test_value)
        if col not in frame.columns:
            raise UserError(f"split.column={col!r} must be one of: user, board, pin")
        test = frame[col].astype(str).to_numpy() == value
        if not test.any() or test.all():
            raise UserError(f"split=predefined: {int(test.sum())} of {len(frame)} rows have {col} == {value!r}; "
                            "both sides need rows (see split.column and split.test_value)")
        return Splits("predefined", [(np.flatnonzero(~test), np.flatnonzero(test))], grouped=False,
                      info={"column": col, "test_value": value})
    raise UserError(f"split={name!r} is not a split; choose one of: auto, random, stratified, group, kfold, "
                    "predefined")


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
    inner = str(OmegaConf.select(cfg, "split.inner", default="auto"))
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
        return GroupKFold(n_splits=n), boards, f"{n}-fold by board, unstratified (one training board: {single})", \
            False
    n = min(folds, int(np.bincount(np.unique(y, return_inverse=True)[1]).min()))
    if n < 2:
        raise UserError("a category has fewer than 2 training samples, too few for cross-validation; raise "
                        "sampling.max_per_category or drop the category (data.reject_categories)")
    leaky = grouped or has_boards(cfg)
    desc = f"{n}-fold by pin" + (" (split.inner=stratified: board-mates on both sides, leaky)" if leaky else "")
    return StratifiedKFold(n_splits=n, shuffle=True, random_state=seed), None, desc, leaky


# --- model ---------------------------------------------------------------------------------------------------


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
        print(f"warning: inner CV {cv_desc}; its scores choose the hyper-parameters and report's cells", flush=True)
    n_train_fold = int(len(y) * (1 - 1 / cv.get_n_splits()))
    pipe = build_pipeline(cfg, X.shape[1], n_train_fold)
    grid = param_grid(cfg, pipe)
    search = GridSearchCV(pipe, grid or {}, scoring=str(cfg.train.scoring), cv=cv, n_jobs=cfg.train.n_jobs,
                          refit=True, error_score="raise")
    search.fit(X, y, groups=groups)
    return search, cv_desc, leaky


# --- one job -------------------------------------------------------------------------------------------------


def sweep_tags() -> dict:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return {"sweep": str(Path(hc.sweep.dir).resolve()), "sweep_job": str(hc.job.num)}
    except Exception:
        pass
    return {}


def train(cfg: DictConfig, progress: bool = True) -> dict:
    """Run one training job; returns {"metrics", "params", "run_id", "output_dir"}."""
    from sklearn.metrics import classification_report

    from .classifiers import class_scores
    from .evaluation import (
        board_accuracy,
        classification_metrics,
        confusion_plot,
        protocol,
        protocol_settings,
        repins_settings,
    )

    t0 = time.perf_counter()
    emb, index, meta, folder = open_store(cfg)
    frame = sample_rows(index, cfg.sampling.max_per_category, int(cfg.sampling.seed))
    categories = sorted(frame["category"].unique())
    if len(categories) < 2:
        raise UserError(f"only {len(categories)} category left after filtering ({', '.join(categories) or 'none'}); "
                        "a classifier needs at least two: check data.reject_categories and the scan report")
    X = load_xy(emb, frame)
    y = frame["category"].to_numpy().astype(str)
    groups, repin_info = None, {"repins_mode": "off"}
    if str(cfg.repins.mode) != "off":
        if str(cfg.repins.mode) not in ("drop", "link"):
            raise UserError(f"repins.mode={cfg.repins.mode!r} must be drop, link or off")
    elif bool(cfg.repins.keep_one):
        raise UserError("repins.keep_one=true needs the duplicate groups: set repins.mode=drop or link")
    if str(cfg.repins.mode) != "off":
        groups, repin_info = find_repins(cfg, frame, X)
        splits, more = apply_repins(cfg, frame, y, groups)
        repin_info.update(more)
        print(f"repins: {repin_info['pins_with_copies']} pins in {repin_info['duplicate_groups']} duplicate groups; "
              f"{repin_info['test_pins_with_train_copy_before']} test pins had a copy in training; "
              + (f"{repin_info['boards_linked']} boards linked" if repin_info["repins_mode"] == "link"
                 else f"{repin_info['pins_dropped']} training pins dropped")
              + (f"; {repin_info['pins_deduplicated']} further copies dropped to keep one per group and side"
                 if "pins_deduplicated" in repin_info else ""), flush=True)
    else:
        splits = make_splits(cfg, frame, y)
    out = config.job_output_dir()
    split_table(frame, splits, groups).to_csv(out / "split.csv", index=False)
    name = f"{cfg.backbone.name}-{cfg.classifier.name}"
    print(f"train {name}: {len(frame)} pins, {len(categories)} categories, {X.shape[1]}-d, split={splits.name}",
          flush=True)

    fold_metrics, predictions, search, cv_desc, leaky = [], [], None, "", False
    for f, (tr, te) in enumerate(splits.folds):
        inner = frame.iloc[tr].reset_index(drop=True)
        if groups is not None and splits.grouped and "linked" not in inner.columns:
            # the inner folds keep copies on one side too: boards sharing copies form one group
            from .duplicates import link_boards

            inner["linked"] = link_boards(board_keys(inner), groups[tr])
        search, cv_desc, leaky = fit_grid(cfg, X[tr], y[tr], inner, splits.grouped)
        model = search.best_estimator_
        pred = model.predict(X[te])
        scores = class_scores(model, X[te])
        m = classification_metrics(y[te], pred, scores, model.classes_)
        m["cv_" + str(cfg.train.scoring)] = float(search.best_score_)
        part = frame.iloc[te][["row", "user", "board", "pin", "path"]].copy()
        part["truth"], part["prediction"] = y[te], pred
        part["score"] = scores.max(axis=1) if scores is not None else np.nan
        if str(cfg.data.layout) == "pinterest":
            m["board_accuracy"] = board_accuracy(part)
        if len(splits.folds) > 1:
            part["fold"] = f
            print(f"  fold {f + 1}/{len(splits.folds)}: accuracy {m['accuracy']:.4f}, "
                  f"macro F1 {m['f1_macro']:.4f}", flush=True)
        fold_metrics.append(m)
        predictions.append(part)
    best_params = {k.removeprefix("clf__"): v for k, v in search.best_params_.items()}
    if len(splits.folds) > 1:  # k-fold: the logged model is refit on every sampled row
        everything = frame
        if groups is not None and splits.grouped and "linked" not in frame.columns:
            from .duplicates import link_boards

            everything = frame.assign(linked=link_boards(board_keys(frame), groups))
        search, cv_desc, leaky = fit_grid(cfg, X, y, everything, splits.grouped)
        best_params = {k.removeprefix("clf__"): v for k, v in search.best_params_.items()}

    keys = sorted(set().union(*fold_metrics))
    metrics = {}
    for k in keys:
        vals = [m[k] for m in fold_metrics if k in m]
        prefix = "" if k.startswith("cv_") else "test_"
        metrics[prefix + k] = float(np.mean(vals))
        if len(splits.folds) > 1:
            metrics[prefix + k + "_std"] = float(np.std(vals))
    preds = pd.concat(predictions, ignore_index=True)
    preds.to_csv(out / "predictions.csv", index=False)
    n_boot = int(OmegaConf.select(cfg, "train.bootstrap", default=1000) or 0)
    ci_desc = "off"
    if n_boot:
        from .evaluation import bootstrap_ci

        by_board = splits.grouped or has_boards(cfg)
        ci = bootstrap_ci(preds["truth"], preds["prediction"], board_keys(preds) if by_board else None,
                          n_boot=n_boot, seed=int(cfg.seed))
        for key, (low, high) in ci.items():
            metrics[f"test_{key}_ci_low"], metrics[f"test_{key}_ci_high"] = low, high
        ci_desc = f"95% percentile bootstrap, {n_boot} resamples of the test {'boards' if by_board else 'pins'}"
    report_txt = classification_report(preds["truth"], preds["prediction"], zero_division=0, digits=4)
    (out / "classification_report.txt").write_text(report_txt)
    pd.DataFrame(search.cv_results_).drop(columns=["params"]).to_csv(out / "cv_results.csv", index=False)
    confusion_plot(preds["truth"], preds["prediction"], categories, out / "confusion_matrix.png",
                   title=f"{name}, split={splits.name}: accuracy {metrics['test_accuracy']:.3f}, "
                         f"macro F1 {metrics['test_f1_macro']:.3f}")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    test_sizes = [len(te) for _, te in splits.folds]
    split_cfg = OmegaConf.merge(cfg.split, {"name": splits.name})
    inner_kind = "by board" if "by board" in cv_desc else ("by pin, leaky" if leaky else "by pin")
    run_protocol = protocol(protocol_settings(split_cfg, cfg.sampling.max_per_category, int(cfg.sampling.seed),
                                              inner_kind, repins_settings(str(cfg.repins.mode), cfg.repins.threshold,
                                                                              bool(cfg.repins.keep_one))),
                            meta.get("fingerprint", {}).get("rows_sha256", ""))
    params = {
        "backbone": str(cfg.backbone.name), "classifier": str(cfg.classifier.name), "split": splits.name,
        "split_seed": int(cfg.split.seed), "test_size": cfg.split.get("test_size"), "folds": len(splits.folds),
        "inner_cv": cv_desc, "protocol": run_protocol, "scoring": str(cfg.train.scoring), "ci": ci_desc,
        "sampling_max_per_category": cfg.sampling.max_per_category, "sampling_seed": int(cfg.sampling.seed),
        "preprocess": "+".join(f"pca{cfg.preprocess.pca_components}" if s == "pca" else str(s)
                               for s in cfg.preprocess.steps) or "none",
        "n_samples": len(frame), "n_test": int(np.sum(test_sizes)), "n_classes": len(categories),
        "embeddings": str(folder), "embeddings_meta_sha256": file_sha256(folder / META),
        "timm_id": meta.get("timm_id"), "seed": int(cfg.seed), "repins_keep_one": bool(cfg.repins.keep_one),
        **repin_info,
        **{k: v for k, v in best_params.items()},
    }
    if splits.info.get("single_board_categories"):
        params["single_board_categories"] = ",".join(splits.info["single_board_categories"])
    shutil.copyfile(folder / META, out / "embeddings_meta.json")
    run_id = _log_run(cfg, name, params, metrics, out, search.best_estimator_, out / "embeddings_meta.json",
                      {"leaky_inner_cv": "true"} if leaky else {})
    elapsed = time.perf_counter() - t0
    summary = ", ".join(f"{k} {metrics[k]:.4f}" + (f" [{metrics[k + '_ci_low']:.4f}, {metrics[k + '_ci_high']:.4f}]"
                                                   if k + "_ci_low" in metrics else "")
                        for k in ("test_accuracy", "test_f1_macro", "test_balanced_accuracy", "test_board_accuracy",
                                  f"cv_{cfg.train.scoring}") if k in metrics)
    print(f"{name}: best {best_params}; {summary} ({elapsed:.1f} s)", flush=True)
    print(f"  artifacts in {out}" + (f"; MLflow run {run_id}" if run_id else ""), flush=True)
    return {"metrics": metrics, "params": params, "run_id": run_id, "output_dir": out}


def _log_run(cfg, name, params, metrics, out: Path, model, store_meta: Path, extra_tags: dict) -> str | None:
    from .tracking import mlflow_run

    tags = {"verb": "train", "backbone": params["backbone"], "classifier": params["classifier"],
            "data": str(cfg.data.name), **sweep_tags(), **extra_tags}
    with mlflow_run(cfg, name, tags=tags) as run:
        if run is None:
            return None
        import mlflow

        mlflow.log_params({k: ("null" if v is None else v) for k, v in params.items()})
        mlflow.log_metrics(metrics)
        for f in ("predictions.csv", "classification_report.txt", "cv_results.csv", "metrics.json", "split.csv"):
            mlflow.log_artifact(str(out / f))
        mlflow.log_artifact(str(out / "confusion_matrix.png"), "plots")
        mlflow.log_artifact(str(store_meta))  # what predict needs to rebuild the backbone
        log_model(model)
        if cfg.train.log_pipeline:
            from .predict import log_pipeline

            log_pipeline(model, store_meta, out)
        return run.info.run_id


def log_model(model) -> None:
    """The fitted pipeline via mlflow.sklearn (loads back with mlflow.sklearn.load_model). Pickled with
    cloudpickle: MLflow's default (skops) refuses classes it does not know, such as our FaissKNN."""
    import mlflow.sklearn
    import sklearn

    from . import __version__

    reqs = [f"scikit-learn=={sklearn.__version__}", f"numpy=={np.__version__}", "faiss-cpu", "torch",
            f"# pinterest_cls=={__version__} (install from the project's repository)"]
    mlflow.sklearn.log_model(model, name="model", pip_requirements=reqs[:-1],
                             serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_CLOUDPICKLE)


@hydra.main(config_path=config.CONF_DIR, config_name="train", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
