"""The training loop: epochs under AMP, early stopping on the validation slice, the best checkpoint on the test
part."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pinterest_cls.core.errors import UserError
from pinterest_cls.core.progress import progress_bar
from pinterest_cls.data.loader import make_loader
from pinterest_cls.embed.device import resolve_amp, resolve_device
from pinterest_cls.finetuning.inputs import ArrayImages, FileImages, make_transform
from pinterest_cls.finetuning.models import build_model, model_name
from pinterest_cls.finetuning.sources import Source
from pinterest_cls.learn.metrics import classification_metrics

log = logging.getLogger(__name__)


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Setup:
    """One fold's model on its device, with the precision, the loss and the task's score."""

    model: nn.Module
    info: dict
    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    task: str
    loss_fn: nn.Module

    @property
    def key(self) -> str:
        return "accuracy" if self.task == "classification" else "mae"


@dataclass
class Step:
    """What a training pass steps with: the optimizer and its schedule, the fp16 GradScaler (or None), and the
    gradient clip (max norm; 0 = off)."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object | None = None
    grad_clip: float = 0.0

    def __call__(self, loss: torch.Tensor, model: nn.Module) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()


def run_epoch(setup: Setup, loader, step: Step | None = None, desc: str = ""):
    """One pass of ``setup``'s model over ``loader``; trains when a ``step`` is given. Returns (mean loss, accuracy
    or MAE, outputs, targets)."""
    train, model, device = step is not None, setup.model, setup.device
    model.train(train)
    total, n, outs, tgts = 0.0, 0, [], []
    ctx = torch.enable_grad() if train else torch.inference_mode()
    with ctx, progress_bar(desc=desc, unit="batch", enabled=bool(desc), iterable=loader) as bar:
        for x, y in bar:
            x = x.to(device, non_blocking=True)
            if setup.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=setup.amp or torch.float32, enabled=setup.amp is not None):
                out = model(x)
                out = out.squeeze(1) if setup.task == "regression" else out
                loss = setup.loss_fn(out.float(), y.float() if setup.task == "regression" else y)
            if train:
                step(loss, model)
            total += float(loss.detach()) * len(y)
            n += len(y)
            outs.append(out.detach().float().cpu())
            tgts.append(y.cpu())
            bar.set_postfix(loss=f"{total / n:.4f}")
    outs, tgts = torch.cat(outs), torch.cat(tgts)
    score = (float((outs - tgts).abs().mean()) if setup.task == "regression"
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
    setup, in_chans, size = _setup(cfg, src)
    train_loader, val_loader, test_loader = _loaders(cfg, src, setup, train_idx, val_idx, test, in_chans, size)
    history, best_row, best_state, scaler = _train(cfg, setup, train_loader, val_loader, fold_name, checkpoint)
    setup.model.load_state_dict(best_state)
    key = setup.key
    info = {**setup.info, "device": setup.device.type,
            "amp": str(setup.amp).replace("torch.", "") if setup.amp else "off",
            "grad_scale": scaler.get_scale() if scaler is not None else None,
            "best": {"best_epoch": best_row["epoch"], "best_val_loss": best_row["val_loss"],
                     f"best_val_{key}": best_row[f"val_{key}"]}}
    if test_loader is None:
        return history, None, None, info
    _, _, outs, tgts = run_epoch(setup, test_loader)
    return history, outs.numpy(), tgts.numpy(), info


def _setup(cfg, src: Source) -> tuple[Setup, int, int]:
    """The model for the data's classes and channels, on the configured device and precision."""
    task = str(cfg.task)
    classification = task == "classification"
    n_outputs = len(src.classes) if classification else 1
    if classification and cfg.model.num_classes is not None and int(cfg.model.num_classes) != n_outputs:
        raise UserError(f"model.num_classes={cfg.model.num_classes} but the data has {n_outputs} classes "
                        f"({', '.join(src.classes[:10])}{' ...' if n_outputs > 10 else ''}); "
                        "set model.num_classes=null or to the data's class count")
    arrays = isinstance(src.images, np.ndarray)
    in_chans = int(cfg.model.in_chans) if cfg.model.in_chans else (src.images.shape[-1] if arrays else 3)
    size = int(cfg.image_size) if cfg.image_size else (src.images.shape[1] if arrays else 224)
    torch.manual_seed(int(cfg.seed))
    model, info = build_model(cfg, in_chans, n_outputs, size)
    device = resolve_device(str(cfg.device), key="device")
    amp = resolve_amp(str(cfg.amp), device, key="amp", training=True)
    channels_last = bool(cfg.channels_last) if cfg.channels_last != "auto" else (
        device.type == "cuda" and cfg.model.kind == "timm")
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    loss_fn = nn.CrossEntropyLoss(label_smoothing=float(o.label_smoothing)) if classification else nn.MSELoss()
    return Setup(model, info, device, amp, channels_last, task, loss_fn), in_chans, size


def _loaders(cfg, src: Source, setup: Setup, train_idx, val_idx, test, in_chans: int, size: int):
    """(train, validation, test or None) loaders; only the training one augments and shuffles (seeded)."""
    def dataset(idx, images, targets, train):
        square = isinstance(images, np.ndarray) and images.shape[1] == images.shape[2]
        t = make_transform(str(cfg.augment) if train else "none", size, in_chans, setup.info["mean"],
                           setup.info["std"], cfg.augment_params, train,
                           source_size=images.shape[1] if square else None)
        if isinstance(images, np.ndarray):
            return ArrayImages(images[idx], targets[idx], t, in_chans)
        return FileImages([images[i] for i in idx], targets[idx], t, in_chans, size)

    gen = torch.Generator().manual_seed(int(cfg.seed))
    kw = dict(batch_size=int(cfg.batch_size), workers=int(cfg.workers), pin_memory=setup.device.type == "cuda",
              prefetch_factor=2)
    train_loader = make_loader(dataset(train_idx, src.images, src.targets, True), shuffle=True, generator=gen,
                               drop_last=len(train_idx) > int(cfg.batch_size), **kw)
    val_loader = make_loader(dataset(val_idx, src.images, src.targets, False), **kw)
    test_loader = None
    if test is not None:
        test_images, test_targets, test_idx = test
        test_loader = make_loader(dataset(test_idx, test_images, test_targets, False), **kw)
    return train_loader, val_loader, test_loader


def _train(cfg, setup: Setup, train_loader, val_loader, fold_name: str, checkpoint: Path):
    """The epochs: AdamW with warm-up and cosine decay, an optional linear probe first, early stopping on the
    validation slice; the best epoch's weights saved to ``checkpoint``. (history, best row, best state,
    GradScaler or None)."""
    o, model = cfg.optim, setup.model
    epochs = int(cfg.epochs)
    probe = min(int(cfg.linear_probe_epochs), epochs)
    if probe and cfg.model.kind == "simple_cnn":
        raise UserError("linear_probe_epochs needs a pretrained model (model=timm); simple_cnn trains from scratch")
    steps = epochs * max(1, len(train_loader))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(o.lr), weight_decay=float(o.weight_decay))
    scheduler = cosine_with_warmup(optimizer, int(float(o.warmup_epochs) * len(train_loader)), steps)
    scaler = torch.amp.GradScaler(setup.device.type) if setup.amp == torch.float16 else None
    history, best, best_state, best_row, stale = [], math.inf, None, None, 0
    monitor, key = str(cfg.early_stopping.monitor), setup.key
    step = Step(optimizer, scheduler, scaler, float(o.grad_clip))
    for epoch in range(epochs):
        _set_trainable(model, head_only=epoch < probe)
        t0 = time.perf_counter()
        desc = f"{fold_name}epoch {epoch + 1}/{epochs}" + (" (probe)" if epoch < probe else "")
        tr_loss, tr_score, _, _ = run_epoch(setup, train_loader, step, desc)
        va_loss, va_score, _, _ = run_epoch(setup, val_loader)
        row = {"epoch": epoch + 1, "train_loss": tr_loss, f"train_{key}": tr_score, "val_loss": va_loss,
               f"val_{key}": va_score, "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}
        history.append(row)
        log.info(f"{fold_name}epoch {epoch + 1}/{epochs}: train loss {tr_loss:.4f} {key} {tr_score:.4f} | "
                 f"val loss {va_loss:.4f} {key} {va_score:.4f} ({row['seconds']:.0f} s)")
        value = va_loss if monitor == "val_loss" else (-va_score if setup.task == "classification" else va_score)
        if value < best - 1e-6:
            best, stale, best_row = value, 0, row
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            torch.save(best_state, checkpoint)
        else:
            stale += 1
            if stale >= int(cfg.early_stopping.patience):
                log.info(f"{fold_name}early stop: no improvement of {monitor} for {stale} epochs")
                break
    return history, best_row, best_state, scaler


def evaluate_outputs(task, outs, tgts, classes) -> dict:
    if task == "regression":
        return {"mse": float(np.mean((outs - tgts) ** 2)), "mae": float(np.mean(np.abs(outs - tgts)))}
    probs = torch.softmax(torch.from_numpy(outs), 1).numpy()
    names = np.asarray(classes)
    return classification_metrics(names[tgts], names[probs.argmax(1)], probs, names)


@dataclass
class FoldRuns:
    """Every fold's curves and best-epoch validation scores, and (when the test part is looked at) its test
    metrics, outputs and targets; ``info`` is the last fold's (model, weights, device, precision)."""

    histories: list = field(default_factory=list)
    best: list = field(default_factory=list)
    test_metrics: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


def fit_folds(cfg, src: Source, folds: list, out: Path, look_at_test: bool) -> FoldRuns:
    """``fit_one`` on each fold of ``split_indices``, each best checkpoint saved in ``out``."""
    runs = FoldRuns()
    for f, (tr, va, test, name, _) in enumerate(folds):
        ckpt = out / (f"fold{f + 1}_best.pt" if len(folds) > 1 else "model_best.pt")
        h, outs, tgts, runs.info = fit_one(cfg, src, tr, va, test if look_at_test else None, name, ckpt)
        runs.histories.append(h)
        runs.best.append(runs.info["best"])
        if not look_at_test:
            continue
        runs.test_metrics.append(evaluate_outputs(str(cfg.task), outs, tgts, src.classes))
        runs.outputs.append(outs)
        runs.targets.append(tgts)
        if len(folds) > 1:
            log.info(f"{name}" + ", ".join(f"{k} {v:.4f}" for k, v in runs.test_metrics[-1].items()
                                         if k in ("accuracy", "f1_macro", "mse", "mae")))
    return runs


def run_params(cfg, folds: list, info: dict, look_at_test: bool, split: str) -> dict:
    """A finetune run's MLflow params: the model and its weights, the optimisation, the split (``split``: its mode
    resolved; under the board protocol, its protocol and copies) and the precision."""
    params = {"model": model_name(cfg), "pretrained": bool(cfg.model.pretrained),
              "weights": info.get("weights"), "task": str(cfg.task), "epochs": int(cfg.epochs),
              "batch_size": int(cfg.batch_size), "lr": float(cfg.optim.lr), "augment": str(cfg.augment),
              "label_smoothing": float(cfg.optim.label_smoothing), "linear_probe_epochs": int(cfg.linear_probe_epochs),
              "split": split, "folds": len(folds), "seed": int(cfg.seed), "data": str(cfg.data.name),
              "n_train": int(len(folds[0][0])), "n_val": int(len(folds[0][1])),
              "n_test": int(np.sum([len(f[2][2]) for f in folds])),
              "device": info.get("device"), "amp": info.get("amp"), "channels_last": str(cfg.channels_last),
              "weight_decay": float(cfg.optim.weight_decay), "evaluate_test": look_at_test}
    board = folds[0][4]
    if board is not None:
        params.update(board.params, protocol=board.protocol, split_test_size=float(cfg.split.test_size),
                      split_seed=int(cfg.split.seed), sampling_max_per_category=cfg.sampling.max_per_category,
                      sampling_seed=int(cfg.sampling.seed))
    return params
