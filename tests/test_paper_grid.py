"""experiments/paper_grid: the study's grid as a command sequence, end to end on the demo export with the tiny
grid (experiment=paper_grid_tiny), and the full grid's config for every verb."""

import re

import mlflow
import pandas as pd
import pytest
from omegaconf import OmegaConf

from pinterest_cls.embed.registry import STUDY_BACKBONES, backbone_configs, timm_model_of

from .helpers import make_cfg, run_verb

STUDY = list(STUDY_BACKBONES)


def test_paper_grid_config_for_every_verb():
    for verb in ("scan", "extract", "status", "train", "report"):
        cfg = make_cfg(verb, ["+experiment=paper_grid", "data.root=/data/pins"], return_hydra_config=True)
        assert list(cfg.grid.backbones) == [*STUDY, "efficientnet_lite0", "pixels"]
        assert cfg.mlflow.experiment == "pins-paper_grid"
        assert cfg.hydra.sweeper.params.backbone == ",".join(cfg.grid.backbones)
    bcfgs = backbone_configs(make_cfg("extract", ["+experiment=paper_grid"]))
    assert [timm_model_of(b) for b in bcfgs[:13]] == [
        "convnext_tiny.fb_in1k", "convnext_small.fb_in1k", "convnext_base.fb_in22k_ft_in1k",
        "convnext_large.fb_in22k_ft_in1k", "convnext_xlarge.fb_in22k_ft_in1k", "tf_efficientnetv2_b0.in1k",
        "tf_efficientnetv2_b1.in1k", "tf_efficientnetv2_b2.in1k", "tf_efficientnetv2_b3.in1k",
        "tf_efficientnetv2_s.in1k", "tf_efficientnetv2_m.in1k", "tf_efficientnetv2_l.in1k",
        "legacy_xception.tf_in1k"]
    assert all(OmegaConf.select(b, "pretrained", default=True) for b in bcfgs)  # never random in the paper grid
    tiny = make_cfg("train", ["+experiment=paper_grid_tiny"])
    assert list(tiny.grid.backbones) == ["test_convnext", "test_efficientnet", "efficientnet_lite0", "pixels"]
    assert tiny.mlflow.experiment == "demo-paper_grid_tiny"


@pytest.mark.slow  # a 12-job CLI sweep (about 85 s): run with the slurm tests, after the main suite
def test_paper_grid_tiny_end_to_end_on_the_demo(tmp_path):
    work = tmp_path / "work"
    e = ["+experiment=paper_grid_tiny", f"paths.work={work}"]
    proc = run_verb("scan", *e, cwd=tmp_path)
    assert proc.returncode == 0 and "ok 147" in proc.stdout, proc.stderr
    proc = run_verb("status", *e, "status.require_complete=true", cwd=tmp_path)
    assert proc.returncode == 1 and "0 of 4 stores complete" in proc.stdout
    # extract as a sweep over the grid needs backbones=null (else each job would extract all four)
    proc = run_verb("extract", "-m", *e, cwd=tmp_path)
    assert proc.returncode != 0 and "add backbones=null for one backbone per job" in proc.stderr
    proc = run_verb("extract", *e, cwd=tmp_path)  # every grid backbone from one decode of each pin
    assert proc.returncode == 0, proc.stderr
    proc = run_verb("status", *e, "status.require_complete=true", cwd=tmp_path)
    assert proc.returncode == 0 and "4 of 4 stores complete" in proc.stdout
    # (the served pipeline's logging is checked for warnings in tests/test_use.py)
    proc = run_verb("train", "-m", *e, "classifier=svm,knn,mlp", "hydra/launcher=local", "train.n_jobs=1",
                    "train.log_pipeline=false", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # only the project's own output: no warnings of other libraries, no colour codes
    assert "warn" not in (proc.stdout + proc.stderr).lower() and "\x1b[" not in proc.stdout + proc.stderr, \
        proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_sweep_runs(work)
    proc = run_verb("report", *e, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = work / "demo" / "report" / "demo-paper_grid_tiny"
    table = pd.read_csv(out / "test_f1_macro.csv", index_col=0)
    assert sorted(table.index) == ["efficientnet_lite0", "pixels", "test_convnext", "test_efficientnet"]
    assert sorted(table.columns) == ["knn", "mlp", "svm"]
    assert table.notna().all().all() and ((table > 0.25) & (table <= 1)).all().all()  # 4 classes: above chance
    assert len(pd.read_csv(out / "runs.csv")) == 12
    assert (out / "test_f1_macro.png").stat().st_size > 10_000 and (out / "report.md").is_file()
    _check_report_page(out, work)


def _check_sweep_runs(work):
    """The sweep's 12 runs are nested under one parent run named after the sweep, each with its command line."""
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["demo-paper_grid_tiny"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags["verb"] == "sweep"]
    jobs = [r for r in runs if r.data.tags["verb"] == "train"]
    assert len(jobs) == 12 and parent.info.status == "FINISHED"
    assert parent.data.tags["sweep"].startswith("train-multirun/") and parent.data.tags["sweep_of"] == "train"
    assert parent.info.run_name == "train sweep " + parent.data.tags["sweep"].split("/")[1]
    assert parent.data.tags["mlflow.note.content"].startswith("python -m pinterest_cls.train -m +experiment=")
    for r in jobs:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["sweep"] == parent.data.tags["sweep"]
        note = r.data.tags["mlflow.note.content"]  # the job's own command: one value per swept key
        args = note.split(" ")
        assert args[:3] == ["python", "-m", "pinterest_cls.train"] and "+experiment=paper_grid_tiny" in args
        assert {f"classifier={r.data.tags['classifier']}", f"backbone={r.data.tags['backbone']}"} <= set(args)
        assert parent.info.start_time <= r.info.start_time and r.info.end_time <= parent.info.end_time


def _check_report_page(out, work):
    """report.html: every picture is a file beside it, each of the 12 cells links to its run, and the gallery
    shows the best run's mistakes; the report is an MLflow run with the page among its artifacts."""
    page = (out / "report.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert {"test_f1_macro.png", "test_accuracy.png", "per_class_f1.png"} <= set(sources)
    assert all((out / s).is_file() and not s.startswith(("/", "http")) for s in sources)
    runs = pd.read_csv(out / "runs.csv")
    links = re.findall(r'href="http://127.0.0.1:5000/#/experiments/(\d+)/runs/(\w+)"', page)
    assert sorted(r for _, r in links) == sorted(list(runs["run_id"]) * 2)  # two tables
    best = runs.sort_values("cv_f1_macro", ascending=False).iloc[0]
    preds = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=best["run_id"], artifact_path="predictions.csv"))
    wrong = int((preds["truth"] != preds["prediction"]).sum())
    assert f"Misclassified test pins of the best run ({wrong} of {len(preds)})" in page
    assert len(re.findall(r'src="thumbs/miss_\d+\.jpg"', page)) == min(wrong, 48)
    (report_run,) = mlflow.search_runs(experiment_names=["demo-paper_grid_tiny"], output_format="list",
                                       filter_string="tags.verb = 'report'")
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(report_run.info.run_id, "report")}
    assert {"report/report.html", "report/per_class_f1.png", "report/runs.csv"} <= arts
