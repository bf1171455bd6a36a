"""
Grid search over coreset ratio and patch size
=============================================

``GridSearchCV`` with ``scoring="roc_auc"`` and labels +1 (good) / -1 (defective): every fold,
and the final refit, trains on the good images only, because samples labelled -1 are left out
of the memory bank.
"""

# %%
import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from skpatchcore import make_patchcore
from skpatchcore.datasets import make_defect_images

X, y, _ = make_defect_images(n_normal=24, n_anomalous=12, image_size=64, random_state=0)

search = GridSearchCV(
    make_patchcore(image_size=64, random_state=0),
    {"coreset__sampling_ratio": [0.01, 0.1], "features__patch_size": [1, 3]},
    scoring="roc_auc",  # uses decision_function: +1 = good is the positive class
    cv=StratifiedKFold(n_splits=3, shuffle=True, random_state=0),
).fit(X, y)

# %%
for params, score in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"],
                         strict=True):
    print(f"{params}  mean ROC AUC {score:.3f}")
print("best:", search.best_params_)
bank_images = search.best_estimator_["coreset"].sample_indices_ // (8 * 8)
print("refit memory bank uses only good images:", bool(np.all(y[bank_images] == 1)))
