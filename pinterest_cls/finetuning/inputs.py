"""How finetune's images reach the model: transforms with the augmentation presets, datasets, and the splits."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pinterest_cls.core import config
from pinterest_cls.core.errors import UserError
from pinterest_cls.data.images import load_rgb
from pinterest_cls.finetuning.boards import board_split
from pinterest_cls.finetuning.sources import Source

log = logging.getLogger(__name__)


def _no_augment(aug_cfg) -> list:
    return []


def _light(aug_cfg) -> list:
    from torchvision.transforms import v2

    return [v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=0, translate=(0.1, 0.1))]


def _affine(aug_cfg) -> list:
    """The face study's Keras ``ImageDataGenerator(shear_range=0.2, zoom_range=0.2, horizontal_flip=True)``;
    Keras' shear_range is an angle in degrees."""
    from torchvision.transforms import v2

    zoom = float(aug_cfg.zoom)
    steps = [v2.RandomAffine(degrees=0, shear=float(aug_cfg.shear), scale=(1 - zoom, 1 + zoom))]
    return steps + ([v2.RandomHorizontalFlip()] if aug_cfg.hflip else [])


#: ``augment`` -> the training-time augmentation steps of that preset (``augment_params``: its settings).
AUGMENTS = {"none": _no_augment, "light": _light, "affine": _affine}


def make_transform(augment: str, size: int, in_chans: int, mean, std, aug_cfg, train: bool,
                   source_size: int | None = None):
    """uint8 (C, H, W) tensor -> float normalised tensor of ``size`` x ``size``, with the augmentation preset
    when training. No resize when the source already has that size (``source_size``)."""
    from torchvision.transforms import v2

    if augment not in AUGMENTS:
        raise UserError(f"augment={augment!r} must be one of: {', '.join(AUGMENTS)}")
    steps = [] if source_size == size else [v2.Resize((size, size), antialias=True)]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train:
        steps += AUGMENTS[augment](aug_cfg)
    steps.append(v2.Normalize(mean=list(mean)[:in_chans], std=list(std)[:in_chans]))
    return v2.Compose(steps)


class ArrayImages(Dataset):
    def __init__(self, images: np.ndarray, targets: np.ndarray, transform, in_chans: int):
        self.images, self.targets, self.transform, self.in_chans = images, targets, transform, in_chans

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        x = _match_channels(x, self.in_chans)
        return self.transform(x), self.targets[i]


class FileImages(Dataset):
    """Decoded on the fly; a file that fails now is an error (finetune trains on a scanned, verified list)."""

    def __init__(self, paths: list[str], targets: np.ndarray, transform, in_chans: int, size: int):
        self.paths, self.targets, self.transform, self.in_chans, self.size = paths, targets, transform, in_chans, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        im = load_rgb(self.paths[i], min_size=self.size)
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1)
        return self.transform(_match_channels(x, self.in_chans)), self.targets[i]


def _match_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    c = x.shape[0]
    if c == in_chans:
        return x
    if in_chans == 1:
        return x.float().mean(0, keepdim=True).round().to(torch.uint8)
    if c == 1:
        return x.expand(in_chans, -1, -1)
    raise UserError(f"images have {c} channels, model.in_chans={in_chans}")


def _own(cfg, src: Source, strat, seed: int) -> list:
    """The data's own test part, with a validation slice of the training part."""
    from sklearn.model_selection import train_test_split

    if src.test_images is None:
        raise UserError("split.mode=own: this data has no test part of its own; use fractions or kfold")
    tr, va = train_test_split(np.arange(len(src.targets)), test_size=float(cfg.split.val_fraction),
                              random_state=seed, stratify=strat)
    return [(tr, va, (src.test_images, src.test_targets, np.arange(len(src.test_targets))), "")]


def _fractions(cfg, src: Source, strat, seed: int) -> list:
    """Train, validation and test fractions (``split.fractions``), stratified by class."""
    from sklearn.model_selection import train_test_split

    f_tr, f_va, f_te = (float(v) for v in cfg.split.fractions)
    if abs(f_tr + f_va + f_te - 1) > 1e-6:
        raise UserError(f"split.fractions={list(cfg.split.fractions)} must sum to 1 (train, val, test)")
    rest, te = train_test_split(np.arange(len(src.targets)), test_size=f_te, random_state=seed, stratify=strat)
    tr, va = train_test_split(rest, test_size=f_va / (f_tr + f_va), random_state=seed,
                              stratify=strat[rest] if strat is not None else None)
    return [(tr, va, (src.images, src.targets, te), "")]


def _kfold(cfg, src: Source, strat, seed: int) -> list:
    """``split.folds`` folds (stratified by class), each with a validation slice of its training part."""
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    k, n = int(cfg.split.folds), len(src.targets)
    splitter = (StratifiedKFold(k, shuffle=True, random_state=seed) if strat is not None
                else KFold(k, shuffle=True, random_state=seed))
    out = []
    for f, (rest, te) in enumerate(splitter.split(np.zeros(n), strat)):
        tr, va = train_test_split(rest, test_size=float(cfg.split.val_fraction), random_state=seed,
                                  stratify=strat[rest] if strat is not None else None)
        out.append((tr, va, (src.images, src.targets, te), f"fold {f + 1}/{k}: "))
    return out


def _boards(cfg, src: Source, strat, seed: int) -> list:
    """Whole boards on each side under ``train``'s protocol (``finetuning.boards``)."""
    if src.pins is None or str(config.select(cfg, "data.layout")) != "pinterest":
        raise UserError("split.mode=boards needs data with boards (data=export with data.layout=pinterest)")
    split = board_split(cfg, src.pins)
    where = pd.Series(np.arange(len(src.images)), index=pd.Index(src.images))
    index = where.loc[split.frame["path"]].to_numpy()  # the sampled pins' positions among the source's images
    return [(index[split.train], index[split.val], (src.images, src.targets, index[split.test]), "", split)]


#: ``split.mode`` -> the function that makes that split (``auto``: ``boards`` on data with boards, else ``own``
#: where the data has a test part, else ``fractions``).
SPLIT_MODES = {"boards": _boards, "own": _own, "fractions": _fractions, "kfold": _kfold}
#: The modes that split pins one by one: leaky on data with boards (board-mates and copies on both sides).
PIN_MODES = ("fractions", "kfold")


def has_boards(cfg, src: Source) -> bool:
    return src.pins is not None and str(config.select(cfg, "data.layout")) == "pinterest"


def split_indices(cfg, src: Source):
    """[(train idx, val idx, (test images, test targets, test idx), name, board split or None)] for the configured
    split. A pin-level split of data with boards runs only when asked for, and is said to be leaky."""
    mode = split_mode(cfg, src)
    if mode not in SPLIT_MODES:
        raise UserError(f"split.mode={mode!r} must be one of: auto, {', '.join(SPLIT_MODES)}")
    if mode in PIN_MODES and has_boards(cfg, src):
        log.warning(f"split.mode={mode} splits pins: board-mates and copies of a pin sit on both sides (leaky; "
                    "tagged leaky_split=true). split.mode=boards keeps whole boards apart, as train does")
    strat = src.targets if cfg.task == "classification" else None
    folds = SPLIT_MODES[mode](cfg, src, strat, int(cfg.seed))
    return [f if len(f) == 5 else (*f, None) for f in folds]


def split_mode(cfg, src: Source) -> str:
    """``split.mode`` resolved (``auto`` made concrete)."""
    mode = str(cfg.split.mode)
    if mode != "auto":
        return mode
    return "boards" if has_boards(cfg, src) else "own" if src.test_images is not None else "fractions"
