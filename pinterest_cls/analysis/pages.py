"""The pages people look at, each opening from disk (its pictures are files in its own folder):

- ``audit.html``: thumbnails of duplicate groups side by side, the top label issues (given vs suggested),
  off-topic boards and outliers, with the counts;
- ``report.html``: the backbone x classifier tables with their intervals, each cell linked to its MLflow run, the
  heatmaps, per-class F1 by backbone, and a gallery of the best run's misclassified pins.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pinterest_cls.analysis.findings import FILES, Findings
from pinterest_cls.track.html import Page, esc
from pinterest_cls.track.plots import heatmap_plot

#: The pages' names: audit.html, report.html, board_predictions.html.
AUDIT_PAGE, REPORT_PAGE, BOARD_PAGE = "audit", "report", "board_predictions"


def write_board_page(folder: Path, boards: pd.DataFrame, pins: pd.DataFrame, title: str, strip: int = 8) -> Path:
    """``board_predictions.html``: per board (``boards``: ``label_boards``' rows) its top categories and whether
    it abstains, and a strip of up to ``strip`` of its pins (``pins``: user, board, pin, path), those that weigh
    most for the top category first."""
    page = Page(folder, title, name=BOARD_PAGE, thumb_size=96)
    abstained = int(boards["abstain"].fillna(False).astype(bool).sum()) if "abstain" in boards else 0
    page.paragraph(f"{len(boards)} boards, {abstained} abstained (their pins fit no known category well enough). "
                   "Scores: the mean over a board's pins. Full list: board_predictions.csv.")
    by_board = {key: g for key, g in pins.groupby(["user", "board"], sort=False)}
    for i, r in enumerate(boards.itertuples(index=False)):
        tops = [f"{esc(getattr(r, f'top{k}_category'))} {getattr(r, f'top{k}_score'):.3f}"
                for k in (1, 2, 3) if isinstance(getattr(r, f"top{k}_category", None), str)]
        verdict = ('<span class="bad">abstains</span>' if getattr(r, "abstain", None) is True
                   else (f'<span class="good">{esc(r.top1_category)}</span>' if tops else "no readable pin"))
        page.raw(f'<div class="group"><b>{esc(r.user)} / {esc(r.board)}</b>: {verdict}; {r.pins} pins'
                 + (f", {r.failed} unreadable" if r.failed else "") + ("<br>" + ", ".join(tops) if tops else ""))
        g = by_board.get((r.user, r.board))
        if g is not None:
            rank = {p: i for i, p in enumerate(str(getattr(r, "top_pins", "") or "").split(";")) if p}
            ordered = sorted(g.itertuples(index=False), key=lambda p: (rank.get(str(p.pin), len(rank)), str(p.pin)))
            page.tiles([page.tile(p.path, f"b{i}_{hashlib.sha1(str(p.path).encode()).hexdigest()[:12]}",
                                  [esc(p.pin)]) for p in ordered[:strip]])
        page.raw("</div>")
    return page.write()


def write_audit_page(folder: Path, findings: Findings, title: str, top: int = 24) -> Path:
    """``audit.html``: thumbnails of duplicate groups side by side, the top label issues (given vs suggested),
    off-topic boards and outliers, with the counts; thumbnails under ``thumbs/`` beside it."""
    page = Page(folder, title, name=AUDIT_PAGE)
    c = findings.counts()
    page.paragraph(
        f"{c['pins']} pins audited. {c['duplicate_groups']} duplicate groups ({c['pins_in_duplicate_groups']} pins; "
        f"{c['duplicate_groups_across_boards']} across boards, {c['duplicate_groups_across_users']} across users, "
        f"{c['duplicate_groups_across_categories']} across categories); {c['label_issues']} likely mislabeled pins; "
        f"{c['off_topic_boards']} of {c['boards']} boards off-topic; {c['outliers']} outliers. Out-of-fold model: "
        f"{findings.info['folds']} folds by {findings.info['folds_by']}, accuracy "
        f"{findings.info['oof_accuracy']:.3f}. Full lists: " + ", ".join(FILES.values()) + ".")
    _duplicate_section(page, findings.duplicates, top)
    _label_section(page, findings.label_issues, top)
    _board_section(page, findings.boards, findings.label_issues, top)
    _outlier_section(page, findings.outliers, top)
    return page.write()


def _thumb_name(r) -> str:
    """A file name for a pin's thumbnail (a digest: pin names may hold any character)."""
    return hashlib.sha1(f"{r.user}/{r.board}/{r.pin}".encode()).hexdigest()[:16]


def _duplicate_section(page: Page, d: pd.DataFrame, top: int) -> None:
    page.heading("Duplicate groups (largest first)")
    if d.empty:
        page.paragraph("No copies found.")
        return
    groups = []
    for gid, g in list(d.groupby("group", sort=True))[:top]:
        first = g.iloc[0]
        spans = " · ".join(_count(n, word) for n, word in ((first.group_size, "pin"), (first.group_boards, "board"),
                                                           (first.group_users, "user"),
                                                           (first.group_categories, "category")))
        tiles = [page.tile(r.path, _thumb_name(r),
                           [esc(f"{r.user}/{r.board}/{r.pin}"), esc(f"{r.category} ({r.kind})")])
                 for r in g.head(8).itertuples()]
        groups.append(f'<div class="group"><b>group {gid}</b>: {esc(spans)}; {esc(_evidence(g))}'
                      f'<div class="tiles">{"".join(tiles)}</div></div>')
    page.tiles(groups)


def _evidence(g: pd.DataFrame) -> str:
    """What made a duplicate group: byte-identical files, and the weakest near link's cosine and pixel score."""
    parts = ["byte-identical copies"] if (g["kind"] == "exact").any() else []
    sim = g["similarity"].iloc[0] if "similarity" in g.columns else np.nan
    if pd.notna(sim):
        pixel = g["pixel_score"].iloc[0]
        parts.append(f"near copies at cosine >= {sim:.3f}" +
                     (f", pixel score >= {pixel:.3f}" if pd.notna(pixel) else " (not verified on pixels)"))
    return " and ".join(parts)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {'categories' if word == 'category' else word + 's'}"


def _label_section(page: Page, labels: pd.DataFrame, top: int) -> None:
    page.heading("Likely mislabeled pins (lowest label quality first)")
    shown = labels[labels["is_issue"]].head(top)
    if shown.empty:
        page.paragraph("cleanlab flags no pin.")
        return
    page.tiles([page.tile(r.path, _thumb_name(r), [esc(f"{r.user}/{r.board}/{r.pin}"),
                                            f'given <span class="bad">{esc(r.given)}</span>',
                                            f'suggested <span class="good">{esc(r.suggested)}</span>',
                                            esc(f"score {r.score:.3f}")]) for r in shown.itertuples()])


def _board_section(page: Page, boards: pd.DataFrame, labels: pd.DataFrame, top: int) -> None:
    page.heading("Off-topic boards")
    off = boards[boards["is_off_topic"]].head(top)
    if off.empty:
        page.paragraph("No board is off-topic.")
    for b in off.itertuples():
        pins = labels[(labels["user"] == b.user) & (labels["board"] == b.board)].head(8)
        tiles = [page.tile(r.path, _thumb_name(r), [esc(r.pin), esc(f"predicted {r.suggested}")])
                 for r in pins.itertuples()]
        page.raw(f'<div class="group"><b>{esc(b.user)}/{esc(b.board)}</b>: labelled {esc(b.category)}, '
                 f"{b.pins} pins, agreement {b.agreement:.2f}; mostly {esc(b.belongs_to)} "
                 f'({b.belongs_share:.0%})<div class="tiles">{"".join(tiles)}</div></div>')
    page.heading("Boards by agreement (lowest first)", level=3)
    page.table(boards[["user", "board", "category", "pins", "agreement", "belongs_to", "is_off_topic"]], max_rows=20)


def _outlier_section(page: Page, outliers: pd.DataFrame, top: int) -> None:
    page.heading("Outliers (farthest from everything first)")
    shown = outliers[outliers["is_outlier"]].head(top)
    if shown.empty:
        page.paragraph("No pin flagged (audit.outlier_fraction=0).")
        return
    page.tiles([page.tile(r.path, _thumb_name(r), [esc(f"{r.user}/{r.board}/{r.pin}"), esc(r.category),
                                            esc(f"score {r.score:.3f}, distance {r.mean_knn_distance:.3f}")])
                for r in shown.itertuples()])


@dataclass
class ReportPage:
    """What ``report.html`` shows. ``cells``: metric -> backbone x classifier text (value [low, high]); ``links``:
    backbone x classifier run URLs; ``heatmaps``: metric -> PNG file name in the page's folder; ``per_class``:
    backbone x category test F1; ``gallery``: the test predictions (path, truth, prediction, score) of the run
    ``gallery_run`` names, of which at most ``gallery_max`` mistakes are shown."""

    title: str
    protocol: str
    note: str
    cells: dict[str, pd.DataFrame]
    links: pd.DataFrame
    heatmaps: dict[str, str]
    per_class: pd.DataFrame
    gallery: pd.DataFrame | None
    gallery_run: str
    gallery_max: int
    boards: pd.DataFrame | None = None  # (backbone, classifier) x board rule, as text
    boards_title: str = ""


def write_report_page(folder: Path, report: ReportPage) -> Path:
    """``report.html`` in ``folder``: the tables with links to the runs, the heatmaps, per-class F1 and the
    gallery run's most confident mistakes."""
    page = Page(folder, report.title, name=REPORT_PAGE)
    page.paragraph(f"Protocol: {report.protocol}")
    page.paragraph("Each cell is the best run of its backbone and classifier by the cross-validation score of the "
                   "training side; the brackets are 95 % bootstrap intervals over test boards. A cell links to its "
                   "run in the MLflow UI.")
    if report.note:
        page.paragraph(report.note)
    for metric, text in report.cells.items():
        page.heading(metric)
        page.table(text.reset_index(), links=report.links.reindex(index=text.index, columns=text.columns)
                   .reset_index().assign(backbone=""))
        if metric in report.heatmaps:
            page.image(report.heatmaps[metric], f"{metric} heatmap", width=720)
    if report.boards is not None and not report.boards.empty:
        page.heading(report.boards_title)
        page.table(report.boards)
    if not report.per_class.empty:
        heatmap_plot(report.per_class.drop(columns=["run"]), folder / "per_class_f1.png", "test F1 per category "
                     "(best run of each backbone)", xlabel="category", ylabel="backbone")
        page.heading("F1 per category, by backbone")
        page.paragraph("The best run of each backbone (over its classifiers, by the same CV score), named in the "
                       "column run; categories in the order of the confusion matrices.")
        page.table(report.per_class.reset_index())
        page.image("per_class_f1.png", "per-category F1 heatmap", width=720)
    if report.gallery is not None:
        _gallery_section(page, report.gallery, report.gallery_run, report.gallery_max)
    return page.write()


def _gallery_section(page: Page, gallery: pd.DataFrame, run: str, top: int) -> None:
    wrong = gallery[gallery["truth"].astype(str) != gallery["prediction"].astype(str)]
    wrong = wrong.sort_values("score", ascending=False, na_position="last")
    page.heading(f"Misclassified test pins of the best run ({len(wrong)} of {len(gallery)})")
    page.paragraph(f"The run with the best CV score of all cells: {run}; the most confident mistakes first"
                   + (f", the first {top} shown." if len(wrong) > top else "."))
    tiles = []
    for i, row in enumerate(wrong.head(top).itertuples(index=False)):
        score = f" ({row.score:.2f})" if pd.notna(row.score) else ""
        lines = [f'<span class="good">true: {esc(row.truth)}</span>',
                 f'<span class="bad">predicted: {esc(row.prediction)}{score}</span>',
                 f'<span class="muted">{esc(getattr(row, "board", ""))}/{esc(getattr(row, "pin", ""))}</span>']
        tiles.append(page.tile(str(row.path), f"miss_{i:04d}", lines))
    page.tiles(tiles)
