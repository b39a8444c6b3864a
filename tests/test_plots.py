"""Plots people read: what each figure shows, checked on the figure itself (its texts, scales and ticks) and on
the written file."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pinterest_cls.track import plots

from .helpers import write_image


@pytest.fixture
def figures(monkeypatch):
    """Every figure a plot function saves, kept open for inspection (the file is still written)."""
    kept = []

    def save(fig, path, dpi):
        fig.savefig(path, dpi=dpi)
        kept.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", save)
    yield kept
    for fig in kept:
        plots.plt.close(fig)


def texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def test_confusion_cells_show_share_and_count(figures, tmp_path):
    truth = ["a"] * 10 + ["b"] * 4
    pred = ["a"] * 7 + ["b"] * 3 + ["b"] * 4
    plots.confusion_plot(truth, pred, ["a", "b"], tmp_path / "cm.png")
    assert sorted(texts(figures[0])) == sorted(["0.70\n(7)", "0.30\n(3)", "1.00\n(4)"])
    assert (tmp_path / "cm.png").stat().st_size > 0


def test_score_heatmap_has_a_fixed_0_to_1_scale_and_labelled_axes(figures, tmp_path):
    table = pd.DataFrame([[0.91, 0.95], [0.97, np.nan]], index=["b1", "b2"], columns=["svm", "knn"])
    plots.heatmap_plot(table, tmp_path / "h.png", "scores", xlabel="classifier", ylabel="backbone")
    ax = figures[0].axes[0]
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert ax.get_xlabel() == "classifier" and ax.get_ylabel() == "backbone"
    assert sorted(texts(figures[0])) == ["0.910", "0.950", "0.970"]


def test_timing_plot_ticks_whole_batches(figures, tmp_path):
    timings = [(i, 32, 0.01, 0.05) for i in range(3)]  # three batches: fractional ticks without a locator
    plots.batch_timings_plot(timings, tmp_path / "t.png", "timing")
    ticks = figures[0].axes[0].get_xticks()
    visible = [t for t in ticks if -0.5 <= t <= 2.5]
    assert visible and all(float(t).is_integer() for t in visible)


def test_projection_legends_are_titled_and_palettes_can_differ(figures, tmp_path):
    xy = np.random.default_rng(0).normal(size=(20, 2))
    labels = ["x"] * 10 + ["y"] * 10
    plots.scatter_plot(xy, labels, tmp_path / "a.png", "by category", legend_title="category")
    plots.scatter_plot(xy, labels, tmp_path / "b.png", "by cluster", palette="Dark2", legend_title="cluster")
    a, b = (f.axes[0] for f in figures)
    assert a.get_legend().get_title().get_text() == "category" and b.get_legend().get_title().get_text() == "cluster"
    assert a.get_title() != b.get_title()
    colours = [tuple(ax.collections[0].get_facecolor()[0]) for ax in (a, b)]
    assert colours[0] != colours[1]


def test_contact_sheet_keeps_rank_and_score_apart_and_names_the_query(tmp_path):
    assert plots.sheet_label("#10", "score 0.872", "ocean") == "#10\nscore 0.872\nocean"
    assert plots.sheet_label("query", "a_very_long_file_name_of_a_pin.jpg").endswith("…")
    query = write_image(tmp_path / "q.jpg", seed=1)
    hit = write_image(tmp_path / "h.jpg", seed=2)
    hits = pd.DataFrame({"rank": [1], "score": [0.9], "category": ["ocean"], "path": [str(hit)]})
    out = plots.contact_sheet(str(query), hits, tmp_path / "sheet.png", thumb=64)
    with Image.open(out) as im:
        assert im.size == (2 * 72 + 8, 64 + 52 + 8)
