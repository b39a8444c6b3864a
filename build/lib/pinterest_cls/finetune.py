"""``python -m pinterest_cls.finetune model=simple_cnn|timm data=export|fashion_mnist|npz``: train a CNN end to
end (from scratch or from pretrained weights) for classification or regression, tracked in MLflow."""

from __future__ import annotations

import json
import logging
import time

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from . import config
from .errors import UserError, user_errors_exit
from .evaluation import fold_mean
from .finetuning.data import load_source, split_indices
from .finetuning.loop import evaluate_outputs, fit_one
from .finetuning.models import model_name
from .plots import curves_plot

log = logging.getLogger(__name__)

# --- data ----------------------------------------------------------------------------------------------------


# --- transforms and datasets ---------------------------------------------------------------------------------


# --- models --------------------------------------------------------------------------------------------------


# --- training ------------------------------------------------------------------------------------------------


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
            log.info(f"{name}" + ", ".join(f"{k} {v:.4f}" for k, v in fold_metrics[-1].items()
                                         if k in ("accuracy", "f1_macro", "mse", "mae")))
    metrics = fold_mean(fold_best, "")  # the best epoch's validation scores: what hyper-parameters are chosen by
    metrics.update(fold_mean(fold_metrics, "test_"))
    key = "accuracy" if task == "classification" else "mae"
    curves_plot(histories, out / "curves.png", key)
    if task == "classification" and look_at_test:
        from .plots import confusion_plot

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
    log.info(f"finetune {params['model']} on {cfg.data.name}: {summary} ({elapsed / 60:.1f} min); outputs in {out}")
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
