"""
PatchCoreDetector as a drop-in for IsolationForest on tabular data
==================================================================

The same snippet, with the estimator swapped: 2-D rows are one feature vector per sample.
"""

# %%
import numpy as np
from sklearn.datasets import make_blobs
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score

from skpatchcore import PatchCoreDetector

rng = np.random.RandomState(0)
X, _ = make_blobs(n_samples=500, centers=3, n_features=4, random_state=0)
X = np.vstack([X, rng.uniform(X.min(0) - 2, X.max(0) + 2, size=(55, 4))])
y = np.r_[np.ones(500), -np.ones(55)]  # +1 inlier, -1 outlier

for Estimator in (IsolationForest, PatchCoreDetector):
    labels = Estimator(contamination=0.1).fit(X).predict(X)  # the unchanged snippet
    scores = Estimator(contamination=0.1).fit(X).decision_function(X)
    print(f"{Estimator.__name__:>18}: {np.mean(labels == -1):.1%} flagged, "
          f"ROC AUC {roc_auc_score(y, scores):.3f}")
