"""Plots people look at (PNG, headless)."""

from __future__ import annotations

import textwrap  # noqa: E402
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pinterest_cls.data.images import ImageDecodeError, load_rgb

matplotlib.use("Agg")


def _save(fig, path: Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` and free it: the one place every plot is saved."""
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def batch_timings_plot(timings, path: Path, title: str = "") -> Path:
    """Per-batch time split into waiting for data and computing (where extraction time goes)."""
    t = np.array([(w, c) for _, _, w, c in timings], dtype=float).reshape(-1, 2)
    n = np.array([k for _, k, _, _ in timings], dtype=float)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(t))
    ax1.bar(x, t[:, 1] * 1e3, width=1.0, color="tab:blue", label="compute (model)")
    ax1.bar(x, t[:, 0] * 1e3, width=1.0, bottom=t[:, 1] * 1e3, color="tab:orange", label="waiting for data")
    ax1.set_xlabel("batch")
    ax1.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax1.set_ylabel("ms per batch")
    ax1.legend(loc="upper right")
    ax1.set_title(title, fontsize=9)
    totals = t.sum(axis=0)
    ax2.bar(["wait", "compute"], totals, color=["tab:orange", "tab:blue"])
    ax2.set_ylabel("seconds in total")
    rate = n.sum() / totals.sum() if totals.sum() > 0 else 0
    ax2.set_title(f"{n.sum():.0f} images, {rate:.1f} img/s\nover wait + compute", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, 110)


def scatter_plot(xy: np.ndarray, labels, path: Path, title: str, palette: str | None = None,
                 legend_title: str = "") -> Path:
    """A 2-D projection coloured by ``labels`` (legend titled ``legend_title``). Two plots of the same points
    coloured by different things should use different ``palette`` s, so a colour never means two things."""
    labels = np.asarray(labels).astype(str)
    names = sorted(set(labels), key=lambda v: (len(v), v))
    cmap = plt.get_cmap(palette or ("tab20" if len(names) > 10 else "tab10"))
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for i, name in enumerate(names):
        m = labels == name
        ax.scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.75, color=cmap(i % cmap.N), label=name)
    if len(names) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best", title=legend_title or None, title_fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, path, 110)


def contact_sheet(query_path: str, hits: pd.DataFrame, path: Path, thumb: int = 160, query_label: str = "") -> Path:
    """The query (its name and, for a stored pin, its category: ``query_label``) and its neighbours side by side,
    each with its rank, its score and its category on lines of their own."""
    from PIL import Image, ImageDraw

    tiles = [(query_path, sheet_label("query", query_label or Path(query_path).name))]
    tiles += [(r.path, sheet_label(f"#{r.rank}", f"score {r.score:.3f}", str(r.category))) for r in hits.itertuples()]
    cols = min(len(tiles), 6)
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * (thumb + 8) + 8, rows * (thumb + 52) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (p, label) in enumerate(tiles):
        x, y = 8 + (i % cols) * (thumb + 8), 8 + (i // cols) * (thumb + 52)
        try:
            im = load_rgb(p, min_size=thumb)
            im.thumbnail((thumb, thumb))
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        except ImageDecodeError:
            draw.rectangle([x, y, x + thumb, y + thumb], outline="red")
        draw.text((x, y + thumb + 2), label, fill="black")
    sheet.save(path)
    return path


def sheet_label(*lines: str, width: int = 24) -> str:
    """A contact-sheet caption: each part on its own line, cut to ``width`` characters."""
    return "\n".join(line if len(line) <= width else line[: width - 1] + "…" for line in lines)


def confusion_plot(y_true, y_pred, classes, path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix with category names; each non-empty cell shows its share of the row and
    its count of pins."""
    counts = skm.confusion_matrix(y_true, y_pred, labels=classes)
    totals = counts.sum(axis=1, keepdims=True)
    cm = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
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
                if counts[i, j]:
                    ax.text(j, i, f"{cm[i, j]:.2f}\n({counts[i, j]})", ha="center", va="center", fontsize=6.5,
                            color="white" if cm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true category's pins")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, 120)


def heatmap_plot(table: pd.DataFrame, path: Path, title: str, fmt: str = "{:.3f}",
                 labels: pd.DataFrame | None = None, xlabel: str = "", ylabel: str = "") -> Path:
    """Rows x columns of numbers (NaN = missing) as an annotated heatmap; ``labels`` (same shape, text)
    replaces the numbers as annotations, e.g. with their confidence intervals. Scores in [0, 1] get the fixed
    colour scale 0 to 1, so colours compare across reports."""
    values = table.to_numpy(dtype=float)
    width = 1.6 * table.shape[1] + 3
    fig, ax = plt.subplots(figsize=(width, (0.5 if labels is None else 0.8) * table.shape[0] + 2.5))
    finite = values[np.isfinite(values)]
    scores = finite.size and finite.min() >= 0 and finite.max() <= 1
    vmin, vmax = (0.0, 1.0) if scores else (None, None)
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(table.shape[1]), labels=table.columns, rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), labels=table.index)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    mid = (vmin + vmax) / 2 if scores else ((finite.min() + finite.max()) / 2 if finite.size else 0)
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
    return _save(fig, path, 120)


def curves_plot(histories, path: Path, key: str) -> Path:
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
    return _save(fig, path, 110)


def board_curve_plot(curve, path: Path, title: str) -> Path:
    """Board accuracy against the pins seen per board (``curve``: columns pins, rule, accuracy, std), one line
    per rule, the spread over draws as a band; a log-2 axis of pins."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for rule, g in curve.groupby("rule", sort=False):
        ax.plot(g["pins"], g["accuracy"], "o-", label=rule)
        ax.fill_between(g["pins"], g["accuracy"] - g["std"], g["accuracy"] + g["std"], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("pins seen per board (drawn at random)")
    ax.set_ylabel("board accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, 110)
