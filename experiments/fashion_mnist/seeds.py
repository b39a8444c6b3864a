"""Fashion-MNIST row 1 as a headline: hyper-parameters chosen on the validation slice, then 3 seeds on the test set.

    python experiments/fashion_mnist/seeds.py --out /tmp/fm_seeds [--parallel 4] [--workers 3] [--epochs 15]
        [--seeds 0 1 2] [--data-root /usr/share/datasets/fashion-mnist] [--no-mlflow]
        [--grid optim.lr=0.001,0.002 augment=none,light]   (replaces GRID)

Stage 1, selection: every point of GRID trains `simple_cnn` with seed 0 and `evaluate_test=false`, so no
batch of the 10k test images is looked at. The point with the highest validation accuracy of its best epoch
(the epoch early stopping keeps, by validation loss) wins; ties go to the lower validation loss.
Stage 2, evaluation: the chosen point trains once per seed with `evaluate_test=true`. Each seed draws its own
initialisation, data order and 10 % validation slice; the test set is evaluated once per seed.

Writes selection.csv, seeds.csv and summary.md to --out, and prints the summary: mean ± sample standard
deviation (ddof=1) over the seeds. Runs go in parallel as separate processes (--parallel); each run's Hydra
folder is --out/runs/<name>, with its metrics.json, curves and checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

GRID = {"optim.lr": [0.001, 0.002, 0.004], "optim.label_smoothing": [0.0, 0.1], "augment": ["none", "light"]}
FIXED = ["data=fashion_mnist", "model=simple_cnn", "batch_size=128"]


def run(name: str, overrides: list[str], args) -> dict:
    folder = args.out / "runs" / name
    done = folder / "metrics.json"
    if not done.exists():  # a finished run is kept: the script resumes where it stopped
        cmd = [sys.executable, "-m", "pinterest_cls.finetune", *FIXED, f"epochs={args.epochs}",
               f"workers={args.workers}", f"data.root={args.data_root}", f"paths.work={args.out / 'work'}",
               f"hydra.run.dir={folder}", *(["mlflow.enabled=false"] if args.no_mlflow else []), *overrides]
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "stdout.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
        if rc.returncode != 0:
            raise SystemExit(f"{name} failed (exit {rc.returncode}); see {folder / 'stdout.log'}")
    result = json.loads(done.read_text())
    m = result["metrics"]
    shown = {k: m[k] for k in ("best_val_accuracy", "best_val_loss", "test_accuracy") if k in m}
    print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) + f" ({m['elapsed_s']:.0f} s)",
          flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--no-mlflow", action="store_true")
    ap.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", help="the grid to choose from, instead of GRID")
    args = ap.parse_args()
    grid = GRID if not args.grid else {k: v.split(",") for k, v in (g.split("=", 1) for g in args.grid)}
    args.out = args.out.resolve()
    t0 = time.perf_counter()
    keys = list(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*grid.values())]

    def label(point):
        return "_".join(f"{k.split('.')[-1]}-{v}" for k, v in point.items())

    with ThreadPoolExecutor(args.parallel) as pool:
        chosen_runs = list(pool.map(
            lambda p: run("select_" + label(p), [f"{k}={v}" for k, v in p.items()] + ["seed=0", "evaluate_test=false"],
                          args), points))
    rows = [{**p, **{k: r["metrics"][k] for k in ("best_val_accuracy", "best_val_loss", "best_epoch", "elapsed_s")}}
            for p, r in zip(points, chosen_runs)]
    best = max(rows, key=lambda r: (r["best_val_accuracy"], -r["best_val_loss"]))
    with open(args.out / "selection.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["chosen"])
        w.writeheader()
        w.writerows({**r, "chosen": r is best} for r in rows)
    point = {k: best[k] for k in keys}
    print(f"chosen on the validation slice: {label(point)} (val accuracy {best['best_val_accuracy']:.4f})", flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        finals = list(pool.map(
            lambda s: run(f"seed{s}_{label(point)}", [f"{k}={v}" for k, v in point.items()] + [f"seed={s}"], args),
            args.seeds))
    metrics = ["test_accuracy", "test_f1_macro", "test_roc_auc", "best_val_accuracy", "elapsed_s"]
    seed_rows = [{"seed": s, **{k: r["metrics"].get(k) for k in metrics}} for s, r in zip(args.seeds, finals)]
    with open(args.out / "seeds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["seed", *metrics])
        w.writeheader()
        w.writerows(seed_rows)

    def mean_std(k):
        vals = [r[k] for r in seed_rows if r[k] is not None]
        return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.4f}"

    recall = {c.removeprefix("test_recall_"): statistics.mean(r["metrics"][c] for r in finals)
              for c in finals[0]["metrics"] if c.startswith("test_recall_") and not c.endswith("_std")}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    lines = [
        f"# Fashion-MNIST, simple_cnn: {len(args.seeds)} seeds",
        "",
        f"Hardware: {device}, {os.cpu_count()} CPUs; torch {torch.__version__}; {args.epochs} epochs; "
        f"{args.parallel} runs at a time with {args.workers} workers each.",
        f"Chosen on the validation slice (seed 0, {len(rows)} grid points, test set not looked at): {label(point)}.",
        "",
        "| metric | mean ± std over seeds " + " ".join(str(s) for s in args.seeds) + " |",
        "|---|---|",
        *(f"| {k} | {mean_std(k)} |" for k in metrics),
        "",
        "Recall per class (mean over seeds): " + ", ".join(f"{c} {v:.3f}" for c, v in recall.items()),
        "",
        f"Whole script: {(time.perf_counter() - t0) / 60:.1f} min.",
    ]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
