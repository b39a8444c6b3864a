"""The package's scikit-learn estimators pass scikit-learn's own estimator checks. A check that cannot apply to
an estimator is listed, with the reason, in its EXPECTED_FAILED_CHECKS, and runs as an expected failure."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from pinterest_cls.estimators import FaissKMeans, FaissKNN, TorchMLP


def expected_failed_checks(estimator) -> dict:
    return getattr(estimator, "EXPECTED_FAILED_CHECKS", {})


@parametrize_with_checks([FaissKNN(k=3), TorchMLP(lr=0.01), FaissKMeans(n_clusters=3, n_init=1)],
                         expected_failed_checks=expected_failed_checks)
def test_sklearn_compatible_estimator(estimator, check):
    check(estimator)
