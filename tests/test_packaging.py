"""The package installs as a wheel with its configs inside, and every verb runs from it outside the repository."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .helpers import TINY, make_pinterest_export

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_the_configs_and_every_verb_runs_from_anywhere(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("pinterest_cls", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("pinterest_cls-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert {f"pinterest_cls/conf/{c}" for c in configs} <= names  # every config, groups included
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "pinterest_cls").rglob("*.py")}
    assert modules <= names  # every module of every subpackage

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    boards = {(f"u{u}", f"{c}{u}"): c for u in range(3) for c in ("cats", "dogs")}  # three boards per category
    export = make_pinterest_export(tmp_path / "export", boards, pins_per_board=4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not the checkout
    where = subprocess.run([sys.executable, "-c", "import pinterest_cls.core.config as c; print(c.CONF_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(site / "pinterest_cls" / "conf"), where.stderr
    work = tmp_path / "work"
    common = [f"data.root={export}", f"paths.work={work}"]

    def verb(name: str, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", f"pinterest_cls.{name}", *common, *args], cwd=elsewhere,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
        return proc

    assert "ok 24" in verb("scan").stdout
    assert (work / "export" / "manifest.parquet").is_file()
    verb("extract", *TINY, "extract.workers=0")
    assert "1 of 1 stores complete" in verb("status").stdout
    verb("train", *TINY, "classifier=logreg", "classifier.grid.C=[1]", "train.n_jobs=1")
    verb("report")
    verb("audit", *TINY, "audit.folds=2")
    verb("cluster", *TINY, "cluster.projection=pca")
    assert "2 nearest pins to pin u0/cats0/p0" in verb("search", *TINY, "pin=u0/cats0/p0", "k=2").stdout
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("export").experiment_id], "tags.verb = 'train'")
    verb("predict", f"run_id={run.info.run_id}", f"inputs={export}", "predict.workers=0")
    verb("finetune", "model=simple_cnn", "epochs=1", "image_size=32", "workers=0", "batch_size=8")
