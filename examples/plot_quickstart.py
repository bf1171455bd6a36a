"""
Quick start: fit PatchCore on good parts, score new parts, see where the defect is
===================================================================================

Fits the standard three-step pipeline on synthetic textured parts (generated here, no
download), scores unseen good and defective parts, and writes a heat-map figure.

Run: ``python examples/plot_quickstart.py [--out DIR]``
"""

# %%
import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline

from skpatchcore import CoresetSampler, FeatureExtractor, PatchCoreDetector
from skpatchcore.datasets import make_defect_images

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument("--out", default="demo_output", help="folder for the heat-map figure")
args, _ = parser.parse_known_args()

# %%
# Data: 40 good parts for training; 10 good and 10 defective parts to test.
X, y, masks = make_defect_images(n_normal=50, n_anomalous=10, image_size=128, random_state=0)
X_train, X_test, y_test, masks_test = X[:40], X[40:], y[40:], masks[40:]

# %%
# Fit on good parts only.
pipe = Pipeline([
    ("features", FeatureExtractor(image_size=128)),
    ("coreset", CoresetSampler(sampling_ratio=0.1, random_state=0)),
    ("detector", PatchCoreDetector()),
])
start = time.perf_counter()
pipe.fit(X_train)
print(f"fitted on {len(X_train)} good images in {time.perf_counter() - start:.1f} s; "
      f"memory bank {pipe['detector'].memory_bank_.shape}")

# %%
# Scores follow IsolationForest: lower = more abnormal; predict gives +1 good / -1 defect.
scores = pipe.score_samples(X_test)
labels = pipe.predict(X_test)
print(f"image AUROC (defect = positive): {roc_auc_score(y_test == -1, -scores):.3f}")
print(f"predicted defective: {int((labels == -1).sum())} of {len(labels)} "
      f"(truly defective: {int((y_test == -1).sum())})")

# %%
# Where: patch anomaly maps, upsampled to the image and overlaid in red.
features = pipe[:-1].transform(X_test)
maps = pipe["detector"].predict_map(features, output_size=X_test.shape[1:3], sigma=4)
lo, hi = np.percentile(maps, 1), maps.max()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
tiles = []
for image, amap, mask in zip(X_test[-4:], maps[-4:], masks_test[-4:], strict=True):
    heat = np.clip((amap - lo) / (hi - lo), 0, 1)[..., None]
    overlay = (image * (1 - 0.6 * heat) + np.array([255, 0, 0]) * 0.6 * heat).astype(np.uint8)
    truth = image.copy()
    truth[mask] = [0, 255, 0]
    tiles.append(np.concatenate([image, truth, overlay], axis=1))
path = out / "quickstart_maps.png"
Image.fromarray(np.concatenate(tiles, axis=0)).save(path)
print(f"wrote {path}: per row the part, the true defect in green, the anomaly map in red")
