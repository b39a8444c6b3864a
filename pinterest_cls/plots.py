"""Plots people look at (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from sklearn import metrics as skm

matplotlib.use("Agg")
import textwrap

import matplotlib.pyplot as plt  # noqa: E402

from .images import ImageDecodeError, load_rgb


def batch_timings_plot(timings, path: Path, title: str = "") -> Path:
    """Per-batch time split into waiting for data and computing (where extraction time goes)."""
    t = np.array([(w, c) for _, _, w, c in timings], dtype=float).reshape(-1, 2)
    n = np.array([k for _, k, _, _ in timings], dtype=float)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(t))
    ax1.bar(x, t[:, 1] * 1e3, width=1.0, color="tab:blue", label="compute (model)")
    ax1.bar(x, t[:, 0] * 1e3, width=1.0, bottom=t[:, 1] * 1e3, color="tab:orange", label="waiting for data")
    ax1.set_xlabel("batch")
    ax1.set_ylabel("ms per batch")
    ax1.legend(loc="upper right")
    ax1.set_title(title, fontsize=9)
    totals = t.sum(axis=0)
    ax2.bar(["wait", "compute"], totals, color=["tab:orange", "tab:blue"])
    ax2.set_ylabel("seconds in total")
    rate = n.sum() / totals.sum() if totals.sum() > 0 else 0
    ax2.set_title(f"{n.sum():.0f} images, {rate:.1f} img/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scatter_plot(xy: np.ndarray, labels, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels).astype(str)
    names = sorted(set(labels), key=lambda v: (len(v), v))
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for i, name in enumerate(names):
        m = labels == name
        ax.scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.75, color=cmap(i % cmap.N), label=name)
    if len(names) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def contact_sheet(query_path: str, hits: pd.DataFrame, path: Path, thumb: int = 160) -> Path:
    """The query and its neighbours side by side, with rank, score and category."""
    from PIL import Image, ImageDraw

    tiles = [(query_path, "query")] + [(r.path, f"#{r.rank} {r.score:.3f}\n{r.category}") for r in hits.itertuples()]
    cols = min(len(tiles), 6)
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * (thumb + 8) + 8, rows * (thumb + 40) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (p, label) in enumerate(tiles):
        x, y = 8 + (i % cols) * (thumb + 8), 8 + (i // cols) * (thumb + 40)
        try:
            im = load_rgb(p, min_size=thumb)
            im.thumbnail((thumb, thumb))
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        except ImageDecodeError:
            draw.rectangle([x, y, x + thumb, y + thumb], outline="red")
        draw.text((x, y + thumb + 2), label, fill="black")
    sheet.save(path)
    return path


def confusion_plot(y_true, y_pred, classes, path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix with category names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = skm.confusion_matrix(y_true, y_pred, labels=classes, normalize="true")
    cm = np.nan_to_num(cm)
    n = len(classes)
    size = max(4.5, 0.45 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j] >= 0.005:
                    ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmap_plot(table: pd.DataFrame, path: Path, title: str, fmt: str = "{:.3f}",
                 labels: pd.DataFrame | None = None, xlabel: str = "", ylabel: str = "") -> Path:
    """Rows x columns of numbers (NaN = missing) as an annotated heatmap; ``labels`` (same shape, text)
    replaces the numbers as annotations, e.g. with their confidence intervals. Scores in [0, 1] get a colour
    scale that ends at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = table.to_numpy(dtype=float)
    width = 1.6 * table.shape[1] + 3
    fig, ax = plt.subplots(figsize=(width, (0.5 if labels is None else 0.8) * table.shape[0] + 2.5))
    finite = values[np.isfinite(values)]
    scores = finite.size and finite.min() >= 0 and finite.max() <= 1
    vmin, vmax = (max(0.0, float(finite.min()) - 0.05), 1.0) if scores else (None, None)
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(table.shape[1]), labels=table.columns, rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), labels=table.index)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                text = fmt.format(values[i, j]) if labels is None else \
                    str(labels.loc[table.index[i], table.columns[j]]).replace(" [", "\n[")
                ax.text(j, i, text, ha="center", va="center", fontsize=9,
                        color="black" if values[i, j] > mid else "white")
    fig.colorbar(im, ax=ax)
    ax.set_title("\n".join(textwrap.fill(line, width=int(width * 9)) for line in title.splitlines()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
