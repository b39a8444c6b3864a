"""The report's HTML page (``report.html``): the backbone x classifier tables with their intervals, each cell
linked to its MLflow run, the heatmaps, per-class F1 by backbone, and a gallery of the best run's misclassified
pins. It opens from disk: its pictures are files in its own folder."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .pages import Page, esc
from .plots import heatmap_plot

PAGE = "report"  # report.html


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI's page of a run (``ui``: the UI's address, e.g. http://127.0.0.1:5000)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def per_class_f1(runs: pd.DataFrame, best: pd.DataFrame, select_by: str) -> pd.DataFrame:
    """Backbone x category: the test F1 of each category, from the best run of each backbone (the cell with the
    highest ``select_by`` in its row of ``best``); categories as logged (``test_f1_<category>``)."""
    top = best.sort_values(select_by, ascending=False).groupby("backbone", sort=True).head(1)
    cols = [c for c in runs.columns if c.startswith("metrics.test_f1_") and c != "metrics.test_f1_macro"
            and not c.endswith(("_std", "_ci_low", "_ci_high"))]
    chosen = runs.set_index("run_id").loc[top["run_id"], cols]
    chosen.index = top["backbone"].to_numpy()
    chosen.columns = [c.removeprefix("metrics.test_f1_") for c in cols]
    chosen.index.name = "backbone"
    return chosen.sort_index().dropna(axis=1, how="all")


def write_report_page(folder: Path, title: str, protocol: str, note: str, cells: dict[str, pd.DataFrame],
                      links: pd.DataFrame, heatmaps: dict[str, str], per_class: pd.DataFrame,
                      gallery: pd.DataFrame | None, gallery_run: str, gallery_max: int) -> Path:
    """``cells``: metric -> backbone x classifier text (value [low, high]); ``links``: backbone x classifier
    run URLs; ``heatmaps``: metric -> PNG file name in ``folder``; ``gallery``: the gallery run's test
    predictions (path, truth, prediction, score)."""
    page = Page(folder, title, name=PAGE)
    page.paragraph(f"Protocol: {protocol}")
    page.paragraph("Each cell is the best run of its backbone and classifier by the cross-validation score of the "
                   "training side; the brackets are 95 % bootstrap intervals over test boards. A cell links to its "
                   "run in the MLflow UI.")
    if note:
        page.paragraph(note)
    for metric, text in cells.items():
        page.heading(metric)
        page.table(text.reset_index(), links=links.reindex(index=text.index, columns=text.columns)
                   .reset_index().assign(backbone=""))
        if metric in heatmaps:
            page.image(heatmaps[metric], f"{metric} heatmap", width=720)
    if not per_class.empty:
        heatmap_plot(per_class, folder / "per_class_f1.png", "test F1 per category (best run of each backbone)",
                     xlabel="category", ylabel="backbone")
        page.heading("F1 per category, by backbone")
        page.paragraph("The best run of each backbone (over its classifiers, by the same CV score).")
        page.table(per_class.reset_index())
        page.image("per_class_f1.png", "per-category F1 heatmap", width=720)
    if gallery is not None:
        wrong = gallery[gallery["truth"].astype(str) != gallery["prediction"].astype(str)]
        wrong = wrong.sort_values("score", ascending=False, na_position="last")
        page.heading(f"Misclassified test pins of the best run ({len(wrong)} of {len(gallery)})")
        page.paragraph(f"Run {gallery_run}; the most confident mistakes first"
                       + (f", the first {gallery_max} shown." if len(wrong) > gallery_max else "."))
        tiles = []
        for i, row in enumerate(wrong.head(gallery_max).itertuples(index=False)):
            score = f" ({row.score:.2f})" if pd.notna(row.score) else ""
            lines = [f'<span class="good">true: {esc(row.truth)}</span>',
                     f'<span class="bad">predicted: {esc(row.prediction)}{score}</span>',
                     f'<span class="muted">{esc(getattr(row, "board", ""))}/{esc(getattr(row, "pin", ""))}</span>']
            tiles.append(page.tile(str(row.path), f"miss_{i:04d}", lines))
        page.tiles(tiles)
    return page.write()
