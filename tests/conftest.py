"""Fixtures shared by the test files (helpers live in tests/helpers.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pinterest_cls.extract import extract

from .helpers import TINY, make_cfg


@pytest.fixture
def work(tmp_path) -> Path:
    return tmp_path / "work"


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A work folder with the demo export embedded once by the tiny random-init test model (real decodes, a real
    store, float16 rows). Shared by the whole session: copy it (:func:`demo_work`) before writing beside it."""
    work = tmp_path_factory.mktemp("tiny_demo") / "work"
    extract(make_cfg("extract", [f"paths.work={work}", *TINY, "mlflow.enabled=false", "extract.workers=0"]),
            progress=False)
    return work


@pytest.fixture(scope="module")
def demo_work(tiny_demo, tmp_path_factory) -> Path:
    """This test module's own copy of :func:`tiny_demo` (its MLflow store and outputs are its own)."""
    work = tmp_path_factory.mktemp("demo_work") / "work"
    shutil.copytree(tiny_demo, work)
    return work
