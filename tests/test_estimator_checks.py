"""scikit-learn's own estimator checks, with every expected failure and its reason."""

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from skpatchcore import CoresetSampler, FeatureExtractor, PatchCoreDetector

_SAMPLER_XFAIL = {
    "check_transformer_general": (
        "by design fit_transform returns the memory bank (a subset of rows) while transform "
        "passes features through, like imbalanced-learn's samplers"
    ),
    "check_transformer_preserve_dtypes": "fit_transform returns a subset of rows",
    "check_transformer_data_not_an_array": "fit_transform returns a subset of rows",
}


def _expected_failures(estimator):
    if isinstance(estimator, CoresetSampler):
        return _SAMPLER_XFAIL
    return {}


@parametrize_with_checks(
    [
        PatchCoreDetector(),
        PatchCoreDetector(n_reweight_neighbors=1, contamination=0.1),
        PatchCoreDetector(n_neighbors=3),
        CoresetSampler(sampling_ratio=0.5, random_state=0),
        FeatureExtractor(),
    ],
    expected_failed_checks=_expected_failures,
)
@pytest.mark.usefixtures("sklearn_check_labels")  # the checks' 0/1/2 labels: see conftest
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
