"""``python -m pinterest_cls.finetune model=simple_cnn|timm data=export|fashion_mnist|npz``: train a CNN end to
end (from scratch or from pretrained weights) for classification or regression, tracked in MLflow."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pinterest_cls.core import config
from pinterest_cls.core.cli import verb_main
from pinterest_cls.core.errors import UserError
from pinterest_cls.finetuning.inputs import PIN_MODES, has_boards, split_indices, split_mode
from pinterest_cls.finetuning.loop import fit_folds, run_params
from pinterest_cls.finetuning.models import model_name
from pinterest_cls.finetuning.sources import load_source
from pinterest_cls.learn.metrics import fold_mean, metric_key
from pinterest_cls.track.plots import confusion_plot, curves_plot
from pinterest_cls.track.tracking import log_curves, mlflow_run

log = logging.getLogger(__name__)


def finetune(cfg: DictConfig) -> dict:
    """Train the model of ``model`` on ``data`` under ``split``; returns {"metrics", "params", "histories",
    "output_dir", "run_id"}."""
    t0 = time.perf_counter()
    task = str(cfg.task)
    if task not in ("classification", "regression"):
        raise UserError(f"task={task!r} must be classification or regression")
    torch.manual_seed(int(cfg.seed))
    np.random.seed(int(cfg.seed))
    src = load_source(cfg)
    out = config.job_output_dir()
    folds = split_indices(cfg, src)
    mode = split_mode(cfg, src)
    leaky = mode in PIN_MODES and has_boards(cfg, src)
    board = folds[0][4]
    if board is not None:
        board.table().to_csv(out / "split.csv", index=False)
    tags = {"model": model_name(cfg), "backbone": OmegaConf.select(cfg, "model.backbone", default=None),
            "split": mode, **({"leaky_split": "true"} if leaky else {})}
    with mlflow_run(cfg, f"finetune-{model_name(cfg)}", "finetune", tags) as tracked:
        look_at_test = bool(cfg.evaluate_test)
        run = fit_folds(cfg, src, folds, out, look_at_test)
        metrics = fold_mean(run.best, "")  # the best epoch's validation scores: what hyper-parameters are chosen by
        metrics.update(fold_mean(run.test_metrics, "test_"))
        curves_plot(run.histories, out / "curves.png", "accuracy" if task == "classification" else "mae")
        if task == "classification" and look_at_test:
            names = np.asarray(src.classes)
            o, t = np.concatenate(run.outputs), np.concatenate(run.targets)
            confusion_plot(names[t], names[o.argmax(1)], list(names), out / "confusion_matrix.png",
                           title=f"{model_name(cfg)} on {cfg.data.name}: accuracy {metrics['test_accuracy']:.4f}")
        elapsed = time.perf_counter() - t0
        metrics["elapsed_s"] = elapsed
        if run.info.get("grad_scale") is not None:  # fp16: the GradScaler's final loss scale
            metrics["grad_scale"] = float(run.info["grad_scale"])
        params = run_params(cfg, folds, run.info, look_at_test, mode)
        if leaky:
            params["split_leaky"] = True
        shown = ("test_accuracy", "test_f1_macro", "test_mse", "test_mae") if look_at_test else (
            "best_val_accuracy", "best_val_mae", "best_val_loss")
        summary = ", ".join(f"{k} {metrics[k]:.4f}" + (f" ± {metrics[k + '_std']:.4f}" if k + "_std" in metrics else "")
                            for k in shown if k in metrics)
        if not look_at_test:
            summary += " (evaluate_test=false: the test part was not looked at)"
        log.info(f"finetune {params['model']} on {cfg.data.name}: {summary} ({elapsed / 60:.1f} min); outputs in {out}")
        (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "params": params}, indent=1))
        if task == "classification" and look_at_test:
            recalls = {c: metrics.get(f"test_recall_{metric_key(c)}") for c in src.classes}
            log.info("  recall per class: " + ", ".join(f"{c} {v:.3f}" for c, v in recalls.items() if v is not None))
        plots = [f for f in ("curves.png", "confusion_matrix.png") if (out / f).exists()]
        tracked.log(params=params, metrics=metrics, then=lambda: log_curves(run.histories),
                    artifacts={**{out / f: "plots" for f in plots}, **({out / "split.csv": ""} if board else {}),
                               **{ckpt: "checkpoints" for ckpt in sorted(out.glob("*_best.pt"))}})
    return {"metrics": metrics, "params": params, "histories": run.histories, "output_dir": out,
            "run_id": tracked.run_id}


@verb_main("finetune")
def main(cfg: DictConfig) -> None:
    finetune(cfg)


if __name__ == "__main__":
    main()
