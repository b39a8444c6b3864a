"""The package installs as a wheel with its configs inside, and a verb runs from outside the repository."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .helpers import make_pinterest_export

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_the_configs_and_a_verb_runs_from_anywhere(tmp_path):
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
    assert "pinterest_cls/finetuning/loop.py" in names

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    export = make_pinterest_export(tmp_path / "export", {("u0", "cats"): "cats", ("u0", "dogs"): "dogs"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not the checkout
    where = subprocess.run([sys.executable, "-c", "import pinterest_cls.core.config as c; print(c.CONF_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(site / "pinterest_cls" / "conf"), where.stderr
    proc = subprocess.run([sys.executable, "-m", "pinterest_cls.scan", f"data.root={export}",
                           f"paths.work={tmp_path / 'work'}"], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "work" / "export" / "manifest.parquet").is_file()
    assert "ok 6" in proc.stdout
