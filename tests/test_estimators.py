"""The package's scikit-learn estimators pass scikit-learn's own estimator checks. A check that cannot apply to
an estimator is listed, with the reason, in its EXPECTED_FAILED_CHECKS, and runs as an expected failure."""

import numpy as np
from sklearn.utils.estimator_checks import parametrize_with_checks

from pinterest_cls.learn.estimators import FaissKMeans, FaissKNN, TorchMLP


def expected_failed_checks(estimator) -> dict:
    return getattr(estimator, "EXPECTED_FAILED_CHECKS", {})


@parametrize_with_checks([FaissKNN(k=3), TorchMLP(lr=0.01), FaissKMeans(n_clusters=3, n_init=1)],
                         expected_failed_checks=expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)


def test_kmeans_on_few_points_fits_quietly(capfd):
    """faiss' C++ warning ("please provide at least ... training points") goes to the process's stderr: a
    145-pin demo clustered into 4 groups must not print it."""
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(4, 16))[rng.integers(0, 4, 145)] + rng.normal(scale=0.1, size=(145, 16))).astype(np.float32)
    km = FaissKMeans(n_clusters=4, n_init=2).fit(X)
    assert len(np.unique(km.labels_)) == 4
    assert "please provide" not in capfd.readouterr().err
