"""report on real train runs of the demo's tiny-model store in a real SQLite MLflow store: one protocol's runs, the
best run per cell by the training side's CV score, intervals, and the files and page it writes."""

import mlflow
import pandas as pd
import pytest

from pinterest_cls.report import report
from pinterest_cls.train import train

from .helpers import TINY, make_cfg

EXP = ["mlflow.experiment=protocols", "train.log_pipeline=false"]


def train_cfg(work, *extra):
    return make_cfg("train", [f"paths.work={work}", *TINY, "train.n_jobs=1", *EXP, *extra])


@pytest.fixture(scope="module")
def runs(demo_work):
    """Three runs: knn under the default protocol (made weak on purpose, one PCA component, so that the leaky run's
    CV score is the higher one; preprocessing is not part of the protocol), svm under it, and knn under a leaky
    split with a leaky inner CV."""
    fair = train(train_cfg(demo_work, "classifier=knn", "classifier.grid.k=[1,5]", "preprocess.steps=[l2,pca]",
                           "preprocess.pca_components=1"))
    svm = train(train_cfg(demo_work, "classifier=svm", "classifier.grid.C=[1]"))
    leaky = train(train_cfg(demo_work, "classifier=knn", "classifier.grid.k=[1,5]", "split=stratified",
                            "split.inner=stratified"))
    result = report(make_cfg("report", [f"paths.work={demo_work}", "mlflow.experiment=protocols"]))
    return {"work": demo_work, "fair": fair, "svm": svm, "leaky": leaky, "report": result}


def test_each_run_records_how_its_inner_cv_folded(runs):
    fair, leaky = runs["fair"], runs["leaky"]
    assert fair["params"]["inner_cv"] == "2-fold by board" and fair["params"]["split"] == "group"
    assert leaky["params"]["inner_cv"] == "5-fold by pin (split.inner=stratified: board-mates on both sides, leaky)"
    client = mlflow.MlflowClient(f"sqlite:///{runs['work']}/mlflow.db")
    assert client.get_run(leaky["run_id"]).data.tags["leaky_inner_cv"] == "true"
    assert "leaky_inner_cv" not in client.get_run(fair["run_id"]).data.tags


def test_test_metrics_carry_bootstrap_intervals_over_boards(runs):
    m = runs["fair"]["metrics"]
    for key in ("test_accuracy", "test_f1_macro"):
        assert 0 <= m[key + "_ci_low"] <= m[key] <= m[key + "_ci_high"] <= 1  # (the demo is easy: often 1.0)
    assert runs["fair"]["params"]["ci"] == "95% percentile bootstrap, 1000 resamples of the test boards"


def test_a_leaky_run_never_wins_a_cell_of_the_default_protocol(runs):
    fair, leaky, result = runs["fair"], runs["leaky"], runs["report"]
    assert leaky["metrics"]["cv_f1_macro"] > fair["metrics"]["cv_f1_macro"]  # the leaky run would win the cell
    assert result["protocol"] == fair["params"]["protocol"]
    assert result["protocol"].startswith("split=group test_size=0.2 seed=1; cap=3000 seed=1; inner CV by board; "
                                         "repins drop, exact (store not calibrated); rows ")
    best = result["best"].set_index("classifier")
    assert set(best.index) == {"knn", "svm"} and best.loc["knn", "run_id"] == fair["run_id"]
    assert result["tables"]["test_f1_macro"].loc["test_efficientnet", "knn"] == \
        pytest.approx(fair["metrics"]["test_f1_macro"])
    assert dict(result["other_protocols"]) == {leaky["params"]["protocol"]: 1}


def test_the_report_files_name_the_protocol_and_give_each_cell_its_interval(runs):
    fair, result = runs["fair"], runs["report"]
    out = result["dir"]
    for f in ("report.md", "runs.csv", "test_f1_macro.csv", "test_f1_macro.png", "test_accuracy.png", "report.html"):
        assert (out / f).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert f"Protocol: `{fair['params']['protocol']}`" in md
    assert "1 runs of other protocols are not shown" in md and "inner CV by pin, leaky" in md
    m = fair["metrics"]
    knn_f1 = f"{m['test_f1_macro']:.4f} [{m['test_f1_macro_ci_low']:.4f}, {m['test_f1_macro_ci_high']:.4f}]"
    assert f"| test_efficientnet | {knn_f1} |" in md  # the cell with its interval (knn is the first column)
    runs_csv = pd.read_csv(out / "runs.csv")
    assert {"backbone", "classifier", "split", "run_id", "protocol", "test_f1_macro_ci_low"} <= set(runs_csv.columns)


def test_another_protocol_is_shown_on_its_own_by_name(runs, tmp_path):
    leaky = runs["leaky"]
    alone = report(make_cfg("report", [f"paths.work={runs['work']}", "mlflow.experiment=protocols",
                                       f"report.protocol='{leaky['params']['protocol']}'", f"paths.report={tmp_path}"]))
    assert list(alone["best"]["run_id"]) == [leaky["run_id"]]


def test_report_prints_the_run_behind_each_cell(runs, caplog, tmp_path):
    import logging

    with caplog.at_level(logging.INFO, logger="pinterest_cls.report"):
        report(make_cfg("report", [f"paths.work={runs['work']}", "mlflow.experiment=protocols",
                                   f"paths.report={tmp_path}"]))
    text = caplog.text
    assert "the train run behind each cell" in text
    assert runs["fair"]["run_id"] in text and runs["svm"]["run_id"] in text and runs["leaky"]["run_id"] not in text


def test_the_page_names_the_run_of_each_backbones_per_category_scores(runs):
    page = (runs["report"]["dir"] / "report.html").read_text()
    best = runs["report"]["best"].sort_values("cv_f1_macro", ascending=False).iloc[0]
    assert f"{best['classifier']} ({best['run_id']})" in page  # the per-category table's run column
    header = page[page.index("F1 per category, by backbone"):]
    header = header[header.index("<tr>"):header.index("</tr>")]
    cells = [c.split("</th>")[0] for c in header.split("<th>")[1:]]
    assert cells[:2] == ["backbone", "run"] and cells[2:] == sorted(cells[2:]) == ["desert", "forest", "night_sky",
                                                                                     "ocean"]
    gallery = f"The run with the best CV score of all cells: {best['backbone']}-{best['classifier']} ({best['run_id']})"
    assert gallery in page


def test_a_single_protocol_other_than_the_default_is_shown_and_named(demo_work):
    exp = ["mlflow.experiment=single_protocol", "train.log_pipeline=false"]
    run = train(train_cfg(demo_work, "classifier=logreg", "classifier.grid.C=[1]", "split=stratified", *exp))
    result = report(make_cfg("report", [f"paths.work={demo_work}", "mlflow.experiment=single_protocol"]))
    assert result["protocol"] == run["params"]["protocol"] and list(result["best"]["run_id"]) == [run["run_id"]]
    md = (result["dir"] / "report.md").read_text()
    assert "No train run used the default protocol" in md and "every run shown used this one" in md
