"""pinterest_cls: thematic classification of Pinterest-style image collections (pins grouped in boards, each
board labelled with a category).

From the command line, every verb is a Hydra app: ``python -m pinterest_cls.<verb> key=value ...`` (``scan``,
``extract``, ``train``, ``report``, ``status``, ``audit``, ``cluster``, ``search``, ``predict``, ``finetune``).

From Python (a notebook), the few things a researcher uses, each loaded on first use so that ``import
pinterest_cls`` stays cheap:

- ``open_store``: an embedding store's vectors, pins and metadata (``Store``);
- ``build_backbone``, ``Embedder`` and ``embed_images``: embed image files with a backbone;
- ``load_pipeline``: a train run's end-to-end model (``EndToEnd``: image files in, categories out);
- the estimators ``FaissKNN``, ``TorchMLP`` and ``FaissKMeans`` (scikit-learn compatible).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pinterest_cls.core.version import __version__

#: The public names and the modules that define them.
_API = {
    "open_store": "pinterest_cls.data.store", "Store": "pinterest_cls.data.store",
    "StoreMeta": "pinterest_cls.data.metadata",
    "build_backbone": "pinterest_cls.embed.backbones", "Embedder": "pinterest_cls.embed.embedder",
    "embed_images": "pinterest_cls.embed.embedder",
    "load_pipeline": "pinterest_cls.serving.end_to_end", "EndToEnd": "pinterest_cls.serving.end_to_end",
    "FaissKNN": "pinterest_cls.learn.estimators", "TorchMLP": "pinterest_cls.learn.estimators",
    "FaissKMeans": "pinterest_cls.learn.estimators",
}
__all__ = ["__version__", "open_store", "Store", "StoreMeta", "build_backbone", "Embedder", "embed_images",
           "load_pipeline", "EndToEnd", "FaissKNN", "TorchMLP", "FaissKMeans"]

if TYPE_CHECKING:  # what static tools (type checkers, the API reference) read
    from pinterest_cls.data.metadata import StoreMeta
    from pinterest_cls.data.store import Store, open_store
    from pinterest_cls.embed.backbones import build_backbone
    from pinterest_cls.embed.embedder import Embedder, embed_images
    from pinterest_cls.learn.estimators import FaissKMeans, FaissKNN, TorchMLP
    from pinterest_cls.serving.end_to_end import EndToEnd, load_pipeline


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'pinterest_cls' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
