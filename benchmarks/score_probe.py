"""Which image score, which map smoothing, and does a flipped memory bank help? A measurement.

    python benchmarks/score_probe.py [--root ../shared/datasets/mtd ...] [--threads N]
                                     [--seed S] [--augment none|flips] [--sampling-ratio R]
                                     [--backbone NAME] [--image-size N]

For each dataset root (MVTec layout), fits the PatchCore pipeline once with the paper's
reweighting (``make_model('patchcore', n_reweight_neighbors=9, random_state=S)``, 1%
coreset, or the backbone and size given) and computes, from the same test patch-score grids
(no refit, no test label used to set anything):

- image scores: the detector's own (reweighted grid maximum, b = 9); the plain grid maximum
  (what b = 1 gives); the mean of the k highest cells (k = 2, 4, 8); the maximum of the grid
  smoothed by a Gaussian of 0.5 and of 1 cell; the maximum of the final image-resolution
  map (sigma 4);
- maps: Gaussian smoothing sigma 4 (the default), 8, 12 and 16 network pixels, the mean of
  the sigma 4 and 16 maps, and sigma proportional to the input size (4 at 320 px) when the
  input is not 320 px.

``--augment flips`` adds each good training image flipped left-right and top-bottom to the
training set and divides the coreset ratio by 3, so the memory bank keeps the size (and the
search its cost) of the plain fit. Prints one table per dataset: image AUROC (and each
defect type's against the good test images) for every image score, pixel AUROC and AUPRO@0.3
for every smoothing, fit seconds and milliseconds per test image of the plain pipeline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from trained_subset import use_threads  # benchmarks/, this folder

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def flipped(paths):
    """The images at ``paths`` plus each one flipped left-right and top-bottom (RGB)."""
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(path) as img:
            img = img.convert("RGB")
        out += [img, img.transpose(Image.FLIP_LEFT_RIGHT), img.transpose(Image.FLIP_TOP_BOTTOM)]
    return out


def image_scores(default, grids, maps):
    """name -> (n,) image scores (higher = more anomalous)."""
    flat = grids.reshape(len(grids), -1)
    top = -np.sort(-flat, axis=1)
    def smooth_max(sigma):
        return np.array([gaussian_filter(g, sigma, mode="nearest").max() for g in grids])

    return {
        "detector (reweighted maximum, b = 9)": default,
        "grid maximum": top[:, 0],
        "mean of top 2 cells": top[:, :2].mean(1),
        "mean of top 4 cells": top[:, :4].mean(1),
        "mean of top 8 cells": top[:, :8].mean(1),
        "maximum of grid smoothed 0.5 cell": smooth_max(0.5),
        "maximum of grid smoothed 1 cell": smooth_max(1.0),
        "maximum of the image map (sigma 4)": np.array([m.max() for m in maps]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/score_probe.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", action="append", default=[])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--augment", choices=["none", "flips"], default="none")
    parser.add_argument("--sampling-ratio", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    from skpatchcore._images import check_images
    from skpatchcore.datasets import load_masks, load_mvtec
    from skpatchcore.methods import make_model
    from skpatchcore.metrics import aupro, image_auroc, image_auroc_by_type, pixel_auroc

    options = {}
    if args.backbone:
        options["backbone"] = args.backbone
    if args.image_size:
        options["image_size"] = args.image_size
    for root in args.root or [str(DATASETS / "mtd"), str(DATASETS / "tire")]:
        data = load_mvtec(root)
        train, ratio = data.train, args.sampling_ratio
        if args.augment == "flips":
            train, ratio = flipped(data.train), ratio / 3
        pipe = make_model("patchcore", sampling_ratio=ratio, random_state=args.seed,
                          n_reweight_neighbors=9, **options)
        start = time.perf_counter()
        pipe.fit(train)
        fit_s = time.perf_counter() - start
        extractor, detector = pipe[0], pipe[-1]
        start = time.perf_counter()
        default, grids = detector.score_and_map(extractor.transform(data.test))
        sizes = check_images(data.test).sizes()
        maps = extractor.maps_to_images(grids, sizes, 4.0)
        ms = 1000 * (time.perf_counter() - start) / len(data.test)
        masks = load_masks(data.mask_paths, [m.shape for m in maps])
        y = np.asarray(data.y_test) == -1
        types = np.asarray(data.defect_type)
        kinds = sorted(set(types) - {"good"})
        print(f"\n{Path(root).name} ({args.augment}, ratio {ratio:.4f}, seed {args.seed}, "
              f"{options or 'defaults'}): fit {fit_s:.0f} s, {ms:.0f} ms per test image, "
              f"bank {len(detector.memory_bank_)} rows")
        print("| image score | image AUROC | " + " | ".join(kinds) + " |")
        print("|---|---|" + "---|" * len(kinds))
        for name, score in image_scores(-np.asarray(default), grids, maps).items():
            by_type = image_auroc_by_type(types, score).values()
            print(f"| {name} | {image_auroc(y, score):.3f} | "
                  + " | ".join(f"{v:.3f}" for v in by_type) + " |", flush=True)
        side = max(np.broadcast_to(extractor.image_size, 2))  # the frame's longer side
        print("| map smoothing | pixel AUROC | AUPRO@0.3 |\n|---|---|---|")
        for sigma in [4.0, 8.0, 12.0, 16.0] + ([4.0 * side / 320] if side != 320 else []):
            smoothed = maps if sigma == 4.0 else extractor.maps_to_images(grids, sizes, sigma)
            print(f"| sigma {sigma:g} | {pixel_auroc(masks, smoothed):.3f} | "
                  f"{aupro(masks, smoothed, fpr_limit=0.3):.3f} |", flush=True)
            if sigma == 16.0:
                both = [(a + b) / 2 for a, b in zip(maps, smoothed, strict=True)]
                print(f"| mean of sigma 4 and 16 | {pixel_auroc(masks, both):.3f} | "
                      f"{aupro(masks, both, fpr_limit=0.3):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
