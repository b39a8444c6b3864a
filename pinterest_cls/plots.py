"""Plots people look at (PNG, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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
