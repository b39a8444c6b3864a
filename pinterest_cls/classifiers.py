"""Kept so that pipelines pickled before the estimators moved to :mod:`pinterest_cls.estimators` still load."""

from .estimators import FaissKNN, TorchMLP  # noqa: F401
