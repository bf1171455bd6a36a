"""
Anomaly maps and masks at each image's own size
===============================================

``PatchCorePipeline.predict_map`` undoes the extractor's resize and letterbox padding, so maps
line up with the input pixels whatever their size; ``predict_mask`` thresholds them at the
detector's threshold, learned from good images only.
"""

# %%
import numpy as np

from skpatchcore import make_patchcore
from skpatchcore.datasets import make_defect_images

X, y, masks = make_defect_images(n_normal=20, n_anomalous=4, image_size=(96, 160),
                                 random_state=0)
pipe = make_patchcore(image_size=128, sampling_ratio=0.1, random_state=0).fit(X[:16])

maps = pipe.predict_map(X[20:])          # (4, 96, 160), higher = more anomalous
pred = pipe.predict_mask(X[20:])         # boolean, same shape
for amap, truth, mask in zip(maps, masks[20:], pred, strict=True):
    r, c = np.unravel_index(amap.argmax(), amap.shape)
    overlap = (mask & truth).sum() / max(truth.sum(), 1)
    print(f"hottest pixel ({r:3d}, {c:3d}) on the defect: {bool(truth[r, c])}; "
          f"{overlap:.0%} of the defect inside the predicted mask")
