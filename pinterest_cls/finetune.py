"""``python -m pinterest_cls.finetune model=simple_cnn|timm data=export|fashion_mnist|npz``: train a CNN end to
end (from scratch or from pretrained weights) for classification or regression, tracked in MLflow."""

from __future__ import annotations

import copy
import gzip
import json
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import config
from .errors import UserError, user_errors_exit

# --- data ----------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """Images as uint8 arrays (N, H, W, C) or file paths, with targets, and the data's own test part if any."""

    images: np.ndarray | list[str]
    targets: np.ndarray  # int class indices, or float values for regression
    classes: list[str] | None
    test_images: np.ndarray | list[str] | None = None
    test_targets: np.ndarray | None = None


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): ubyte images (N, H, W) or labels (N,)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08 or not 1 <= ndim <= 4:
            raise ValueError(f"bad IDX header (magic {data[:4].hex()}; expected unsigned bytes)")
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if body.size != int(np.prod(shape)):
            raise ValueError(f"holds {body.size} values, its header says {int(np.prod(shape))}")
        return body.reshape(shape)
    except FileNotFoundError:
        raise UserError(f"IDX file {path} not found (data.root={path.parent}); for Fashion-MNIST run "
                        "`apt-get install dataset-fashion-mnist`, or point data.root at the *-ubyte.gz files") from None
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise UserError(f"IDX file {path} cannot be read: {exc}") from None


def load_idx(dcfg) -> Source:
    root = Path(str(dcfg.root)).expanduser()
    x = read_idx(root / dcfg.train_images)
    y = read_idx(root / dcfg.train_labels)
    xt = read_idx(root / dcfg.test_images)
    yt = read_idx(root / dcfg.test_labels)
    for imgs, labels, name in ((x, y, dcfg.train_labels), (xt, yt, dcfg.test_labels)):
        if len(imgs) != len(labels):
            raise UserError(f"{root / name} has {len(labels)} labels for {len(imgs)} images")
    classes = list(dcfg.classes) if dcfg.get("classes") else [str(i) for i in range(int(max(y.max(), yt.max())) + 1)]
    return Source(x[..., None], y.astype(np.int64), classes, xt[..., None], yt.astype(np.int64))


def _npz_targets(z, key_labels, key_targets, file, task):
    if task == "regression":
        if key_targets not in z:
            raise UserError(f"{file} has no array '{key_targets}' (data.targets_key) with regression targets; "
                            f"it has: {', '.join(z.files)}")
        return np.asarray(z[key_targets], dtype=np.float32), None
    if key_labels not in z:
        raise UserError(f"{file} has no array '{key_labels}' (data.labels_key) with labels; it has: "
                        f"{', '.join(z.files)}")
    classes, idx = np.unique(np.asarray(z[key_labels]), return_inverse=True)
    return idx.astype(np.int64), [str(c) for c in classes]


def load_npz(dcfg, task: str) -> Source:
    file = Path(str(dcfg.root)).expanduser()
    if not file.is_file():
        raise UserError(f"data.root={file} is not a .npz file")
    try:
        z = np.load(file, allow_pickle=False)
    except Exception as exc:
        raise UserError(f"{file} cannot be read as .npz: {exc}") from None
    if dcfg.images_key not in z:
        raise UserError(f"{file} has no array '{dcfg.images_key}' (data.images_key); it has: {', '.join(z.files)}")
    images = np.asarray(z[dcfg.images_key])
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise UserError(f"{file}: '{dcfg.images_key}' must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    if images.dtype != np.uint8:  # floats in [0, 1] (or any range): scaled to bytes per array
        lo, hi = float(images.min()), float(images.max())
        images = np.round((images - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
    targets, classes = _npz_targets(z, dcfg.labels_key, dcfg.targets_key, file, task)
    if len(targets) != len(images):
        raise UserError(f"{file}: {len(targets)} labels/targets for {len(images)} images")
    return Source(images, targets, classes)


def load_manifest_source(cfg: DictConfig) -> Source:
    from .extract import ok_rows

    _, ok = ok_rows(cfg)
    classes, idx = np.unique(ok["category"].astype(str).to_numpy(), return_inverse=True)
    return Source(ok["path"].tolist(), idx.astype(np.int64), [str(c) for c in classes])


def load_source(cfg: DictConfig) -> Source:
    kind = str(cfg.data.get("kind") or "export")
    task = str(cfg.task)
    if kind == "idx":
        src = load_idx(cfg.data)
    elif kind == "npz":
        src = load_npz(cfg.data, task)
    elif kind == "export":
        src = load_manifest_source(cfg)
    else:
        raise UserError(f"data.kind={kind!r} must be export (a scanned export), idx or npz")
    if task == "regression" and src.classes is not None and kind != "npz":
        raise UserError(f"task=regression needs numeric targets (data=npz with data.targets_key); data.kind={kind} "
                        "has class labels")
    return src


# --- transforms and datasets ---------------------------------------------------------------------------------


def make_transform(augment: str, size: int, in_chans: int, mean, std, aug_cfg, train: bool,
                   source_size: int | None = None):
    """uint8 (C, H, W) tensor -> float normalised tensor of ``size`` x ``size``, with the augmentation preset
    when training. No resize when the source already has that size (``source_size``)."""
    from torchvision.transforms import v2

    steps = [] if source_size == size else [v2.Resize((size, size), antialias=True)]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train and augment == "light":
        steps += [v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=0, translate=(0.1, 0.1))]
    elif train and augment == "affine":
        # the face study's Keras ImageDataGenerator(shear_range=0.2, zoom_range=0.2, horizontal_flip=True);
        # Keras' shear_range is an angle in degrees
        zoom = float(aug_cfg.zoom)
        steps += [v2.RandomAffine(degrees=0, shear=float(aug_cfg.shear), scale=(1 - zoom, 1 + zoom))]
        if aug_cfg.hflip:
            steps.append(v2.RandomHorizontalFlip())
    elif augment not in ("none", "light", "affine"):
        raise UserError(f"augment={augment!r} must be one of: none, light, affine")
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
        from .images import load_rgb

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


# --- models --------------------------------------------------------------------------------------------------


class SimpleCNN(nn.Module):
    """The sibling studies' small CNN: conv 32 -> pool -> conv 64 -> pool -> conv 64 -> dense 64 -> output,
    channels configurable, with batch norm and dropout (``batchnorm``/``dropout`` 0 give the plain Keras net)."""

    def __init__(self, in_chans: int, num_outputs: int, image_size: int, channels=(32, 64, 64), dense: int = 64,
                 batchnorm: bool = True, dropout: float = 0.3):
        super().__init__()
        layers, c_in = [], in_chans
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU(inplace=True))
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** (len(channels) - 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in * side * side, dense),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dense, num_outputs))
        self.pretrained_cfg = {"mean": (0.5,) * in_chans, "std": (0.5,) * in_chans}

    def forward(self, x):
        return self.head(self.features(x))

    def get_classifier(self):
        return self.head[-1]


def build_model(cfg: DictConfig, in_chans: int, num_outputs: int, image_size: int) -> tuple[nn.Module, dict]:
    m = cfg.model
    if m.kind == "simple_cnn":
        model = SimpleCNN(in_chans, num_outputs, image_size, tuple(m.channels), int(m.dense), bool(m.batchnorm),
                          float(m.dropout))
        return model, {"weights": "random (from scratch)", "mean": (0.5,) * in_chans, "std": (0.5,) * in_chans}
    if m.kind != "timm":
        raise UserError(f"model.kind={m.kind!r} must be simple_cnn or timm")
    from .backbones import REGISTRY, _create_timm

    spec = REGISTRY.get(str(m.get("backbone") or ""))
    model_id = str(m.name or (spec.model if spec else ""))
    if not model_id:
        raise UserError("model=timm needs model.name=<timm model> (or model.backbone=<registered backbone>)")
    bcfg = OmegaConf.create({"pretrained": bool(m.pretrained), "weights": m.get("weights"), "in_chans": None})
    model, info = _create_timm(model_id, bcfg, spec)  # 3-channel features, with the weight rules of backbones
    if in_chans != 3:
        _adapt_first_conv(model, in_chans)
    model.reset_classifier(num_outputs)
    cfg_pre = model.pretrained_cfg or {}
    mean = tuple(cfg_pre.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(cfg_pre.get("std", (0.5, 0.5, 0.5)))
    if in_chans != 3:  # grey or multi-band input: one mean/std for every band
        mean, std = (float(np.mean(mean)),) * in_chans, (float(np.mean(std)),) * in_chans
    return model, {"weights": info["weights"], "weights_sha256": info.get("weights_sha256"), "mean": mean, "std": std,
                   "timm_id": model_id}


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """Replace the first conv for ``in_chans`` inputs, adapting its (pretrained) weights as timm does."""
    from timm.models import adapt_input_conv

    name = (model.pretrained_cfg or {}).get("first_conv")
    if not name:
        raise UserError(f"cannot find the first conv of {type(model).__name__} to adapt it to in_chans={in_chans}")
    module = model.get_submodule(name)
    new = copy.deepcopy(module)
    new.in_channels = in_chans
    new.weight = nn.Parameter(adapt_input_conv(in_chans, module.weight.detach()))
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# --- training ------------------------------------------------------------------------------------------------


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _device_amp(cfg):
    dev = torch.device("cuda" if str(cfg.device) == "auto" and torch.cuda.is_available()
                       else ("cpu" if str(cfg.device) == "auto" else str(cfg.device)))
    amp = str(cfg.amp)
    if amp == "auto":
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if dev.type == "cuda" else None
    elif amp == "off":
        dtype = None
    elif amp in ("bf16", "fp16"):
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    else:
        raise UserError(f"amp={amp!r} must be one of: auto, off, bf16, fp16")
    return dev, dtype


def run_epoch(model, loader, loss_fn, task, device, amp, channels_last, optimizer=None, scheduler=None,
              scaler=None, grad_clip=0.0, desc=""):
    """One pass; trains when an optimizer is given. Returns (mean loss, accuracy or MAE, outputs, targets)."""
    from tqdm.auto import tqdm

    train = optimizer is not None
    model.train(train)
    total, n, outs, tgts = 0.0, 0, [], []
    ctx = torch.enable_grad() if train else torch.inference_mode()
    with ctx, tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=not desc) as bar:
        for x, y in bar:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = model(x)
                out = out.squeeze(1) if task == "regression" else out
                loss = loss_fn(out.float(), y.float() if task == "regression" else y)
            if train:
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
            outs.append(out.detach().float().cpu())
            tgts.append(y.cpu())
            bar.set_postfix(loss=f"{total / n:.4f}")
    outs, tgts = torch.cat(outs), torch.cat(tgts)
    score = (float((outs - tgts).abs().mean()) if task == "regression"
             else float((outs.argmax(1) == tgts).float().mean()))
    return total / max(n, 1), score, outs, tgts


def _set_trainable(model, head_only: bool):
    head = model.get_classifier()
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad = (id(p) in head_params) or not head_only


def fit_one(cfg, src: Source, train_idx, val_idx, test, fold_name: str, checkpoint: Path):
    """Train on ``train_idx``, early-stop on ``val_idx``, evaluate the best checkpoint on ``test``.

    ``test`` is None when the test part is not to be looked at (``evaluate_test=false``, for choosing
    hyper-parameters on the validation slice alone); outputs and targets are then None."""
    task = str(cfg.task)
    classification = task == "classification"
    n_outputs = len(src.classes) if classification else 1
    if classification and cfg.model.num_classes is not None and int(cfg.model.num_classes) != n_outputs:
        raise UserError(f"model.num_classes={cfg.model.num_classes} but the data has {n_outputs} classes "
                        f"({', '.join(src.classes[:10])}{' ...' if n_outputs > 10 else ''}); "
                        "set model.num_classes=null or to the data's class count")
    in_chans = int(cfg.model.in_chans) if cfg.model.in_chans else (
        src.images.shape[-1] if isinstance(src.images, np.ndarray) else 3)
    size = int(cfg.image_size) if cfg.image_size else (src.images.shape[1] if isinstance(src.images, np.ndarray)
                                                       else 224)
    torch.manual_seed(int(cfg.seed))
    model, info = build_model(cfg, in_chans, n_outputs, size)
    device, amp = _device_amp(cfg)
    channels_last = bool(cfg.channels_last) if cfg.channels_last != "auto" else (
        device.type == "cuda" and cfg.model.kind == "timm")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def dataset(idx, images, targets, train):
        square = isinstance(images, np.ndarray) and images.shape[1] == images.shape[2]
        t = make_transform(str(cfg.augment) if train else "none", size, in_chans, info["mean"], info["std"],
                           cfg.augment_params, train, source_size=images.shape[1] if square else None)
        if isinstance(images, np.ndarray):
            return ArrayImages(images[idx], targets[idx], t, in_chans)
        return FileImages([images[i] for i in idx], targets[idx], t, in_chans, size)

    gen = torch.Generator().manual_seed(int(cfg.seed))
    kw = dict(batch_size=int(cfg.batch_size), num_workers=int(cfg.workers), pin_memory=device.type == "cuda",
              persistent_workers=int(cfg.workers) > 0)
    if int(cfg.workers) > 0:
        from .catalog import mp_context

        kw["multiprocessing_context"] = mp_context()
    train_loader = DataLoader(dataset(train_idx, src.images, src.targets, True), shuffle=True, generator=gen,
                              drop_last=len(train_idx) > int(cfg.batch_size), **kw)
    val_loader = DataLoader(dataset(val_idx, src.images, src.targets, False), shuffle=False, **kw)
    test_loader = None
    if test is not None:
        test_images, test_targets, test_idx = test
        test_loader = DataLoader(dataset(test_idx, test_images, test_targets, False), shuffle=False, **kw)

    o = cfg.optim
    loss_fn = (nn.CrossEntropyLoss(label_smoothing=float(o.label_smoothing)) if classification else nn.MSELoss())
    epochs = int(cfg.epochs)
    probe = min(int(cfg.linear_probe_epochs), epochs)
    if probe and cfg.model.kind == "simple_cnn":
        raise UserError("linear_probe_epochs needs a pretrained model (model=timm); simple_cnn trains from scratch")
    steps = epochs * max(1, len(train_loader))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(o.lr), weight_decay=float(o.weight_decay))
    scheduler = cosine_with_warmup(optimizer, int(float(o.warmup_epochs) * len(train_loader)), steps)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    history, best, best_state, best_row, stale = [], math.inf, None, None, 0
    monitor = str(cfg.early_stopping.monitor)
    key = "accuracy" if classification else "mae"
    for epoch in range(epochs):
        _set_trainable(model, head_only=epoch < probe)
        t0 = time.perf_counter()
        tr_loss, tr_score, _, _ = run_epoch(model, train_loader, loss_fn, task, device, amp, channels_last, optimizer,
                                            scheduler, scaler, float(o.grad_clip),
                                            desc=f"{fold_name}epoch {epoch + 1}/{epochs}" + (" (probe)" if epoch < probe
                                                                                          else ""))
        va_loss, va_score, _, _ = run_epoch(model, val_loader, loss_fn, task, device, amp, channels_last)
        row = {"epoch": epoch + 1, "train_loss": tr_loss, f"train_{key}": tr_score, "val_loss": va_loss,
               f"val_{key}": va_score, "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}
        history.append(row)
        print(f"{fold_name}epoch {epoch + 1}/{epochs}: train loss {tr_loss:.4f} {key} {tr_score:.4f} | "
              f"val loss {va_loss:.4f} {key} {va_score:.4f} ({row['seconds']:.0f} s)", flush=True)
        value = va_loss if monitor == "val_loss" else (-va_score if classification else va_score)
        if value < best - 1e-6:
            best, stale, best_row = value, 0, row
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            torch.save(best_state, checkpoint)
        else:
            stale += 1
            if stale >= int(cfg.early_stopping.patience):
                print(f"{fold_name}early stop: no improvement of {monitor} for {stale} epochs", flush=True)
                break
    model.load_state_dict(best_state)
    info = {**info, "device": device.type, "amp": str(amp).replace("torch.", "") if amp else "off",
            "grad_scale": scaler.get_scale() if scaler is not None else None,
            "best": {"best_epoch": best_row["epoch"], "best_val_loss": best_row["val_loss"],
                     f"best_val_{key}": best_row[f"val_{key}"]}}
    if test_loader is None:
        return history, None, None, info
    _, _, outs, tgts = run_epoch(model, test_loader, loss_fn, task, device, amp, channels_last)
    return history, outs.numpy(), tgts.numpy(), info


def evaluate_outputs(task, outs, tgts, classes) -> dict:
    from .evaluation import classification_metrics

    if task == "regression":
        return {"mse": float(np.mean((outs - tgts) ** 2)), "mae": float(np.mean(np.abs(outs - tgts)))}
    probs = torch.softmax(torch.from_numpy(outs), 1).numpy()
    names = np.asarray(classes)
    return classification_metrics(names[tgts], names[probs.argmax(1)], probs, names)


def curves_plot(histories, path: Path, key: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for f, h in enumerate(histories):
        ep = [r["epoch"] for r in h]
        tag = f" fold {f + 1}" if len(histories) > 1 else ""
        a1.plot(ep, [r["train_loss"] for r in h], "-", label=f"train{tag}")
        a1.plot(ep, [r["val_loss"] for r in h], "--", label=f"val{tag}")
        a2.plot(ep, [r[f"train_{key}"] for r in h], "-", label=f"train{tag}")
        a2.plot(ep, [r[f"val_{key}"] for r in h], "--", label=f"val{tag}")
    a1.set_title("loss")
    a2.set_title(key)
    for a in (a1, a2):
        a.set_xlabel("epoch")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def split_indices(cfg, src: Source):
    """[(train idx, val idx, (test images, test targets, test idx), name)] for the configured split."""
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    s = cfg.split
    n = len(src.targets)
    strat = src.targets if cfg.task == "classification" else None
    seed = int(cfg.seed)
    mode = str(s.mode)
    if mode == "auto":
        mode = "own" if src.test_images is not None else "fractions"
    if mode == "own":
        if src.test_images is None:
            raise UserError("split.mode=own: this data has no test part of its own; use fractions or kfold")
        tr, va = train_test_split(np.arange(n), test_size=float(s.val_fraction), random_state=seed, stratify=strat)
        return [(tr, va, (src.test_images, src.test_targets, np.arange(len(src.test_targets))), "")]
    if mode == "fractions":
        f_tr, f_va, f_te = (float(v) for v in s.fractions)
        if abs(f_tr + f_va + f_te - 1) > 1e-6:
            raise UserError(f"split.fractions={list(s.fractions)} must sum to 1 (train, val, test)")
        rest, te = train_test_split(np.arange(n), test_size=f_te, random_state=seed, stratify=strat)
        tr, va = train_test_split(rest, test_size=f_va / (f_tr + f_va), random_state=seed,
                                  stratify=strat[rest] if strat is not None else None)
        return [(tr, va, (src.images, src.targets, te), "")]
    if mode == "kfold":
        k = int(s.folds)
        splitter = (StratifiedKFold(k, shuffle=True, random_state=seed) if strat is not None
                    else KFold(k, shuffle=True, random_state=seed))
        out = []
        for f, (rest, te) in enumerate(splitter.split(np.zeros(n), strat if strat is not None else None)):
            tr, va = train_test_split(rest, test_size=float(s.val_fraction), random_state=seed,
                                      stratify=strat[rest] if strat is not None else None)
            out.append((tr, va, (src.images, src.targets, te), f"fold {f + 1}/{k}: "))
        return out
    raise UserError(f"split.mode={mode!r} must be one of: auto, own, fractions, kfold")


def fold_mean(per_fold: list[dict], prefix: str) -> dict:
    """{prefix + name: mean over folds}, with ``_std`` beside each when there are several folds."""
    out = {}
    for k in sorted(set().union(*per_fold)) if per_fold else ():
        vals = [m[k] for m in per_fold if k in m]
        out[prefix + k] = float(np.mean(vals))
        if len(per_fold) > 1:
            out[prefix + k + "_std"] = float(np.std(vals))
    return out


def model_name(cfg: DictConfig) -> str:
    """simple_cnn, the timm model name, or the registered backbone it came from."""
    return str(cfg.model.get("name") or cfg.model.get("backbone") or cfg.model.kind)


def finetune(cfg: DictConfig) -> dict:
    t0 = time.perf_counter()
    task = str(cfg.task)
    if task not in ("classification", "regression"):
        raise UserError(f"task={task!r} must be classification or regression")
    torch.manual_seed(int(cfg.seed))
    np.random.seed(int(cfg.seed))
    src = load_source(cfg)
    out = config.job_output_dir()
    folds = split_indices(cfg, src)
    look_at_test = bool(cfg.evaluate_test)
    histories, fold_metrics, fold_best, all_out, all_tgt, info = [], [], [], [], [], {}
    for f, (tr, va, test, name) in enumerate(folds):
        ckpt = out / (f"fold{f + 1}_best.pt" if len(folds) > 1 else "model_best.pt")
        h, outs, tgts, info = fit_one(cfg, src, tr, va, test if look_at_test else None, name, ckpt)
        histories.append(h)
        fold_best.append(info["best"])
        if not look_at_test:
            continue
        fold_metrics.append(evaluate_outputs(task, outs, tgts, src.classes))
        all_out.append(outs)
        all_tgt.append(tgts)
        if len(folds) > 1:
            print(f"{name}" + ", ".join(f"{k} {v:.4f}" for k, v in fold_metrics[-1].items()
                                         if k in ("accuracy", "f1_macro", "mse", "mae")), flush=True)
    metrics = fold_mean(fold_best, "")  # the best epoch's validation scores: what hyper-parameters are chosen by
    metrics.update(fold_mean(fold_metrics, "test_"))
    key = "accuracy" if task == "classification" else "mae"
    curves_plot(histories, out / "curves.png", key)
    if task == "classification" and look_at_test:
        from .evaluation import confusion_plot

        names = np.asarray(src.classes)
        o, t = np.concatenate(all_out), np.concatenate(all_tgt)
        confusion_plot(names[t], names[o.argmax(1)], list(names), out / "confusion_matrix.png",
                       title=f"{model_name(cfg)} on {cfg.data.name}: accuracy "
                             f"{metrics['test_accuracy']:.4f}")
    elapsed = time.perf_counter() - t0
    metrics["elapsed_s"] = elapsed
    params = {"model": model_name(cfg), "pretrained": bool(cfg.model.get("pretrained", False)),
              "weights": info.get("weights"), "task": task, "epochs": int(cfg.epochs),
              "batch_size": int(cfg.batch_size), "lr": float(cfg.optim.lr), "augment": str(cfg.augment),
              "label_smoothing": float(cfg.optim.label_smoothing), "linear_probe_epochs": int(cfg.linear_probe_epochs),
              "split": str(cfg.split.mode), "folds": len(folds), "seed": int(cfg.seed), "data": str(cfg.data.name),
              "n_train": int(len(folds[0][0])), "n_test": int(np.sum([len(f[2][2]) for f in folds])),
              "device": info.get("device"), "amp": info.get("amp"), "channels_last": str(cfg.channels_last),
              "weight_decay": float(cfg.optim.weight_decay), "evaluate_test": look_at_test}
    if info.get("grad_scale") is not None:  # fp16: the GradScaler's final loss scale
        metrics["grad_scale"] = float(info["grad_scale"])
    shown = ("test_accuracy", "test_f1_macro", "test_mse", "test_mae") if look_at_test else (
        "best_val_accuracy", "best_val_mae", "best_val_loss")
    summary = ", ".join(f"{k} {metrics[k]:.4f}" + (f" ± {metrics[k + '_std']:.4f}" if k + "_std" in metrics else "")
                        for k in shown if k in metrics)
    if not look_at_test:
        summary += " (evaluate_test=false: the test part was not looked at)"
    print(f"finetune {params['model']} on {cfg.data.name}: {summary} ({elapsed / 60:.1f} min); outputs in {out}")
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "params": params}, indent=1))
    if task == "classification" and look_at_test:
        from .evaluation import metric_key

        recalls = {c: metrics.get(f"test_recall_{metric_key(c)}") for c in src.classes}
        print("  recall per class: " + ", ".join(f"{c} {v:.3f}" for c, v in recalls.items() if v is not None))
    from .tracking import mlflow_run

    with mlflow_run(cfg, f"finetune-{params['model']}", tags={"verb": "finetune", "model": params["model"]}) as run:
        if run is not None:
            import mlflow

            mlflow.log_params(params)
            for f, h in enumerate(histories):
                prefix = f"fold{f + 1}_" if len(histories) > 1 else ""
                for r in h:
                    mlflow.log_metrics({prefix + k: v for k, v in r.items() if k != "epoch"}, step=r["epoch"])
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(out / "curves.png"), "plots")
            if (out / "confusion_matrix.png").exists():
                mlflow.log_artifact(str(out / "confusion_matrix.png"), "plots")
            for ckpt in sorted(out.glob("*_best.pt")):
                mlflow.log_artifact(str(ckpt), "checkpoints")
    return {"metrics": metrics, "params": params, "histories": histories, "output_dir": out,
            "run_id": run.info.run_id if run is not None else None}


@hydra.main(config_path=config.CONF_DIR, config_name="finetune", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    finetune(cfg)


if __name__ == "__main__":
    main()
