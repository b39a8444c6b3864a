"""The backbone x classifier results table from the train runs in MLflow (what ``report`` writes): one protocol's
runs, the best run per cell by the training side's CV score, with 95 % intervals, as CSV, Markdown, heatmap PNGs
and an HTML page."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pinterest_cls.analysis.pages import ReportPage, write_report_page
from pinterest_cls.core import config
from pinterest_cls.core.errors import UserError
from pinterest_cls.learn.board_rules import RULES
from pinterest_cls.learn.protocol import NO_PROTOCOL, default_protocol_settings, protocol_without_rows
from pinterest_cls.track.plots import heatmap_plot
from pinterest_cls.track.tracking import experiment_id


def train_runs(cfg: DictConfig) -> pd.DataFrame:
    """Finished ``train`` runs of experiment ``mlflow.experiment``: one row per run."""
    import mlflow

    exp = experiment_id(cfg)
    runs = mlflow.search_runs(experiment_ids=[exp], filter_string="tags.verb = 'train' and status = 'FINISHED'",
                              output_format="pandas")
    return runs


def choose_protocol(cfg: DictConfig, runs: pd.DataFrame) -> tuple[str, pd.DataFrame, pd.Series, str]:
    """(protocol, its runs, counts of the runs of every other protocol, a note on the choice). ``report.protocol=
    default``: the default settings on the rows of the newest such run, or the one protocol present when no run
    used the defaults (the note says so; with several, none is chosen for the user); else the protocol given (as
    printed or in runs.csv)."""
    runs = runs.copy()
    col = "params.protocol"
    runs[col] = runs[col].fillna(NO_PROTOCOL) if col in runs.columns else NO_PROTOCOL
    wanted = str(config.select(cfg, "report.protocol"))
    counts = runs[col].value_counts()
    listing = "; ".join(f"'{p}' ({n} runs)" for p, n in counts.items())
    note = ""
    if wanted == "default":
        options = default_protocol_settings(cfg)  # on a calibrated store, then on one that is not
        bare = runs[col].map(protocol_without_rows)
        settings = next((o for o in options if (bare == o).any()), options[0])
        ours = runs[bare == settings]
        if ours.empty and len(counts) == 1:
            wanted = str(counts.index[0])
            note = f"No train run used the default protocol ({settings}); every run shown used this one."
        elif ours.empty:
            raise UserError(f"no train run used the default protocol ({settings}) and several protocols compete; "
                            f"the runs used: {listing}. Choose one with report.protocol='<protocol>'")
        else:
            wanted = str(ours.sort_values("start_time").iloc[-1][col])
    elif wanted not in counts.index:
        raise UserError(f"report.protocol='{wanted}' matches no train run; the runs used: {listing}")
    return wanted, runs[runs[col] == wanted], counts.drop(wanted), note


def test_side(protocol: str) -> str:
    """A protocol without how its runs chose hyper-parameters (the inner CV of ``train``, the validation slice of
    ``finetune``): what makes the test scores of two runs comparable."""
    return "; ".join(part for part in str(protocol).split("; ") if not part.startswith("inner CV "))


#: The column of the report's tables that holds ``finetune`` runs, and the metric that picks each model's run.
FINETUNE, FINETUNE_SELECT_BY = "finetune", "best_val_accuracy"


def finetune_runs(cfg: DictConfig, protocol: str) -> pd.DataFrame:
    """Finished ``finetune`` runs of the experiment whose test side is that of ``protocol`` (``test_side``)."""
    import mlflow

    runs = mlflow.search_runs(experiment_ids=[experiment_id(cfg)],
                              filter_string="tags.verb = 'finetune' and status = 'FINISHED'", output_format="pandas")
    if runs.empty or "params.protocol" not in runs.columns:
        return runs.iloc[0:0]
    return runs[runs["params.protocol"].fillna("").map(test_side) == test_side(protocol)].reset_index(drop=True)


def best_finetune(runs: pd.DataFrame) -> pd.DataFrame:
    """One cell per fine-tuned model (rows: the model, column ``finetune``): its run with the highest validation
    accuracy (``FINETUNE_SELECT_BY``; no test data picks it), latest on ties."""
    col = f"metrics.{FINETUNE_SELECT_BY}"
    best = runs.sort_values([col, "start_time"], ascending=[False, False]).groupby("params.model").head(1)
    return pd.DataFrame({
        "backbone": best["params.model"].to_numpy(), "classifier": FINETUNE,
        "test_f1_macro": best["metrics.test_f1_macro"].to_numpy(),
        "test_accuracy": best["metrics.test_accuracy"].to_numpy(),
        "split": best["params.split"].to_numpy(), "run_id": best["run_id"].to_numpy(),
        "protocol": best["params.protocol"].to_numpy(), "inner_cv": "validation slice by board",
    })


def best_per_cell(runs: pd.DataFrame, select_by: str) -> pd.DataFrame:
    """For each (backbone, classifier), the run with the highest ``select_by`` metric (latest on ties)."""
    col = f"metrics.{select_by}"
    if col not in runs.columns:
        raise UserError(f"report.select_by={select_by!r}: no train run has that metric "
                        f"(they have: {', '.join(sorted(c[8:] for c in runs.columns if c.startswith('metrics.')))})")
    runs = runs.sort_values([col, "start_time"], ascending=[False, False], na_position="last")
    best = runs.groupby(["params.backbone", "params.classifier"], sort=True).head(1)
    def metric(name):
        return best[f"metrics.{name}"] if f"metrics.{name}" in best.columns else np.nan

    out = pd.DataFrame({
        "backbone": best["params.backbone"], "classifier": best["params.classifier"],
        "test_f1_macro": best["metrics.test_f1_macro"], "test_accuracy": best["metrics.test_accuracy"],
        **{f"{m}_ci_{side}": metric(f"{m}_ci_{side}") for m in ("test_f1_macro", "test_accuracy")
           for side in ("low", "high")},
        **{f"{m}{suffix}": metric(f"{m}{suffix}") for m in BOARD_METRICS for suffix in ("", "_ci_low", "_ci_high")},
        select_by: best[col], "split": best.get("params.split"), "run_id": best["run_id"],
        "protocol": best.get("params.protocol"), "inner_cv": best.get("params.inner_cv"),
    })
    return out.sort_values(["backbone", "classifier"]).reset_index(drop=True)


#: The board-level metrics the report shows beside the pin-level table: board accuracy by each rule.
BOARD_METRICS = tuple(f"test_board_{rule}_accuracy" for rule in RULES)


def board_cells(best: pd.DataFrame) -> pd.DataFrame:
    """(backbone, classifier) x board rule: each cell's board accuracy by each rule, as text with its interval
    over test boards; empty where no run evaluated boards."""
    def text(row, m):
        low, high = row.get(f"{m}_ci_low"), row.get(f"{m}_ci_high")
        if pd.isna(row.get(m)):
            return ""
        return f"{row[m]:.4f}" + (f" [{low:.4f}, {high:.4f}]" if pd.notna(low) and pd.notna(high) else "")

    have = best[[m for m in BOARD_METRICS if m in best.columns]].notna().any(axis=1) if len(best) else []
    rows = best[have] if len(best) else best
    out = pd.DataFrame({"backbone": rows["backbone"], "classifier": rows["classifier"],
                        **{rule: [text(r, f"test_board_{rule}_accuracy") for _, r in rows.iterrows()]
                           for rule in RULES}})
    return out.reset_index(drop=True)


def with_intervals(best: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Backbone x classifier cells as text: ``0.9123 [0.8810, 0.9402]`` (the interval where the run has one)."""
    def cell(row):
        low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
        value = f"{row[metric]:.4f}"
        return value + (f" [{low:.4f}, {high:.4f}]" if pd.notna(low) and pd.notna(high) else "")

    text = best.assign(cell=best.apply(cell, axis=1)).pivot(index="backbone", columns="classifier", values="cell")
    text.columns.name = None
    return text.fillna("")


def to_markdown(table: pd.DataFrame, floatfmt: str = "{:.4f}") -> str:
    cols = [str(c) for c in table.columns]
    lines = ["| " + " | ".join([table.index.name or ""] + cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for idx, row in table.iterrows():
        cells = [floatfmt.format(v) if isinstance(v, (float, np.floating)) and np.isfinite(v)
                 else ("" if isinstance(v, float) else str(v)) for v in row]
        lines.append("| " + " | ".join([str(idx)] + cells) + " |")
    return "\n".join(lines) + "\n"


def run_predictions(run_id: str) -> pd.DataFrame | None:
    """The test predictions a train run logged (predictions.csv), or None if it has none."""
    import mlflow

    try:
        with tempfile.TemporaryDirectory() as tmp:
            return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.csv",
                                                                   dst_path=tmp))
    except Exception:  # a run logged without its predictions
        return None


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI's page of a run (``ui``: the UI's address, e.g. http://127.0.0.1:5000)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def per_class_f1(runs: pd.DataFrame, best: pd.DataFrame, select_by: str) -> pd.DataFrame:
    """Backbone x category: the test F1 of each category (in sorted order, as the confusion matrices have them),
    from the best run of each backbone (the cell with the highest ``select_by`` in its row of ``best``), which the
    first column, ``run``, names (classifier and run id)."""
    top = best.sort_values(select_by, ascending=False).groupby("backbone", sort=True).head(1)
    cols = sorted(c for c in runs.columns if c.startswith("metrics.test_f1_") and c != "metrics.test_f1_macro"
                  and not c.endswith(("_std", "_ci_low", "_ci_high")))
    chosen = runs.set_index("run_id").loc[top["run_id"], cols]
    chosen.index = top["backbone"].to_numpy()
    chosen.columns = [c.removeprefix("metrics.test_f1_") for c in cols]
    chosen.index.name = "backbone"
    chosen = chosen.dropna(axis=1, how="all")
    chosen.insert(0, "run", [f"{c} ({r})" for c, r in zip(top["classifier"], top["run_id"])])
    return chosen.sort_index()


#: The metrics of the report's tables.
METRICS = ("test_f1_macro", "test_accuracy")


@dataclass
class Report:
    """A report's content: the protocol shown, its runs, the other protocols' run counts, and the best run per
    cell (``best``: one row per backbone and classifier) chosen by ``select_by``."""

    protocol: str
    runs: pd.DataFrame  # every finished train run of the experiment
    mine: pd.DataFrame  # those of ``protocol``
    others: pd.Series  # run counts of the other protocols
    best: pd.DataFrame
    select_by: str
    choice: str = ""  # why this protocol, where it is not the one asked for
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # metric -> backbone x classifier values
    boards: pd.DataFrame = field(default_factory=pd.DataFrame)  # board accuracy by rule (``board_cells``)
    cells: dict[str, pd.DataFrame] = field(default_factory=dict)  # ... as text with their intervals

    @property
    def note(self) -> str:
        """Why this protocol (where it was not the one asked for) and what is left out: the runs of other
        protocols; or ""."""
        left_out = ("" if not len(self.others) else f"{int(self.others.sum())} runs of other protocols are not shown: "
                    + "; ".join(f"'{p}' ({n})" for p, n in self.others.items())
                    + ". Choose one with report.protocol='...'.")
        return " ".join(part for part in (self.choice, left_out) if part)

    def run_ids(self) -> pd.DataFrame:
        """Backbone x classifier: the train run behind each cell (what ``predict run_id=`` takes)."""
        ids = self.best.pivot(index="backbone", columns="classifier", values="run_id")
        ids.columns.name = None
        return ids.fillna("")


def build_report(cfg: DictConfig) -> Report:
    """The finished train runs of ``mlflow.experiment``, one protocol of them (``report.protocol``), and the best
    run per cell by ``report.select_by``."""
    runs = train_runs(cfg)
    if runs.empty:
        raise UserError(f"no finished train runs in MLflow experiment {cfg.mlflow.experiment!r} at "
                        f"{cfg.mlflow.tracking_uri}; run python -m pinterest_cls.train first")
    chosen, mine, others, choice = choose_protocol(cfg, runs)
    select_by = str(cfg.report.select_by)
    best = best_per_cell(mine, select_by)
    if bool(config.select(cfg, "report.finetune")):
        fine = finetune_runs(cfg, chosen)
        if not fine.empty:
            best = pd.concat([best, best_finetune(fine)], ignore_index=True)
            runs = pd.concat([runs, fine], ignore_index=True)
    rep = Report(chosen, runs, mine, others, best, select_by, choice=choice)
    for metric in METRICS:
        table = best.pivot(index="backbone", columns="classifier", values=metric)
        table.columns.name = None
        rep.tables[metric], rep.cells[metric] = table, with_intervals(best, metric)
    rep.boards = board_cells(best)
    return rep


def write_report(cfg: DictConfig, rep: Report, out: Path) -> Path:
    """``runs.csv``, ``<metric>.csv|png``, ``report.md`` and ``report.html`` in ``out``; returns the page."""
    out.mkdir(parents=True, exist_ok=True)
    rep.best.to_csv(out / "runs.csv", index=False)
    for metric, table in rep.tables.items():
        table.to_csv(out / f"{metric}.csv")
        heatmap_plot(table, out / f"{metric}.png", title=f"{cfg.data.name}: {metric}, 95% bootstrap interval (best "
                                                         f"run per cell by {rep.select_by})\n{rep.protocol}",
                     labels=rep.cells[metric], xlabel="classifier", ylabel="backbone")
    md = [f"# {cfg.data.name}: backbone x classifier\n\n", f"Protocol: `{rep.protocol}`.\n\n",
          f"Best run per cell by `{rep.select_by}` among the {len(rep.mine)} train runs of this protocol.\n"]
    if rep.note:
        md.append(f"\n{rep.note}\n")
    for metric, text in rep.cells.items():
        md += [f"\n## {metric} [95% bootstrap interval]\n\n", to_markdown(text)]
    if not rep.boards.empty:
        rep.boards.to_csv(out / "board_accuracy.csv", index=False)
        md += [f"\n## {BOARD_TITLE}\n\n", to_markdown(rep.boards.set_index("backbone"))]
    (out / "report.md").write_text("".join(md))
    return write_report_page(out, _page(cfg, rep))


BOARD_TITLE = ("test board accuracy by rule (the same runs; vote, mean pin probability, mean embedding) "
               "[95% bootstrap interval over test boards]")


def _page(cfg: DictConfig, rep: Report) -> ReportPage:
    """report.html's content: the tables with links to the runs, the heatmaps, per-class F1 and the best run's
    mistakes."""
    exp = experiment_id(cfg)
    uri = str(cfg.mlflow.tracking_uri)
    ui = uri if uri.startswith(("http://", "https://")) else str(config.select(cfg, "report.mlflow_ui"))
    best = rep.best
    links = best.assign(url=[run_url(ui, exp, r) for r in best["run_id"]]).pivot(
        index="backbone", columns="classifier", values="url")
    top = best.sort_values(rep.select_by, ascending=False).iloc[0]
    return ReportPage(f"{cfg.data.name}: backbone x classifier", rep.protocol, rep.note, rep.cells, links,
                      {m: f"{m}.png" for m in rep.cells}, per_class_f1(rep.runs, best, rep.select_by),
                      run_predictions(str(top["run_id"])), f"{top['backbone']}-{top['classifier']} ({top['run_id']})",
                      int(config.select(cfg, "report.gallery")), rep.boards, BOARD_TITLE)
