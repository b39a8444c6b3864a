"""The training loop: epochs under AMP, early stopping on the validation slice, the best checkpoint on the test
part."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import make_loader
from ..embedding import resolve_amp, resolve_device
from ..errors import UserError
from .data import ArrayImages, FileImages, Source, make_transform
from .models import build_model

log = logging.getLogger(__name__)


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    device = resolve_device(str(cfg.device), key="device")
    amp = resolve_amp(str(cfg.amp), device, key="amp", training=True)
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
    kw = dict(batch_size=int(cfg.batch_size), workers=int(cfg.workers), pin_memory=device.type == "cuda",
              prefetch_factor=2)
    train_loader = make_loader(dataset(train_idx, src.images, src.targets, True), shuffle=True, generator=gen,
                               drop_last=len(train_idx) > int(cfg.batch_size), **kw)
    val_loader = make_loader(dataset(val_idx, src.images, src.targets, False), **kw)
    test_loader = None
    if test is not None:
        test_images, test_targets, test_idx = test
        test_loader = make_loader(dataset(test_idx, test_images, test_targets, False), **kw)

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
        log.info(f"{fold_name}epoch {epoch + 1}/{epochs}: train loss {tr_loss:.4f} {key} {tr_score:.4f} | "
              f"val loss {va_loss:.4f} {key} {va_score:.4f} ({row['seconds']:.0f} s)")
        value = va_loss if monitor == "val_loss" else (-va_score if classification else va_score)
        if value < best - 1e-6:
            best, stale, best_row = value, 0, row
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            torch.save(best_state, checkpoint)
        else:
            stale += 1
            if stale >= int(cfg.early_stopping.patience):
                log.info(f"{fold_name}early stop: no improvement of {monitor} for {stale} epochs")
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
    from ..evaluation import classification_metrics

    if task == "regression":
        return {"mse": float(np.mean((outs - tgts) ** 2)), "mae": float(np.mean(np.abs(outs - tgts)))}
    probs = torch.softmax(torch.from_numpy(outs), 1).numpy()
    names = np.asarray(classes)
    return classification_metrics(names[tgts], names[probs.argmax(1)], probs, names)
