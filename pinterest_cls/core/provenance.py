"""What made a result: the package's version, the git commit of the checkout it runs from (and whether the tree
had uncommitted changes), and the versions of the libraries it uses. Read from package metadata and git, so
nothing heavy is imported to learn them."""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
import sys
from pathlib import Path

from pinterest_cls.core.version import __version__

#: The libraries whose versions every run records (distribution names), when installed.
LIBRARIES = ("torch", "torchvision", "timm", "numpy", "pillow", "scikit-learn", "faiss-cpu", "mlflow", "hydra-core",
             "pandas", "cleanlab", "skops", "openvino", "torchcodec")


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """``{"pinterest_cls": ..., "python": ..., <library>: <version>}`` for each of ``names`` that is installed."""
    out = {"pinterest_cls": __version__, "python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, str]:
    """``{"git_commit": sha, "git_dirty": "true" | "false"}`` when the package runs from a git checkout of this
    project (an editable install), else ``{}`` (an installed wheel has no commit to name)."""
    here = Path(__file__).resolve().parents[2]  # the folder above the package: a checkout's root
    if not (here / ".git").exists() or not (here / "pyproject.toml").is_file():
        return {}
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    if commit.returncode != 0:
        return {}
    return {"git_commit": commit.stdout.strip(), "git_dirty": "true" if status.stdout.strip() else "false"}


def provenance() -> dict[str, str]:
    """Everything above in one flat mapping: what a run records as its code version."""
    return {**library_versions(), **git_state()}
