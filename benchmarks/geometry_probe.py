"""Do image scores depend on the image's shape, and would correcting for it help? A measurement.

    python benchmarks/geometry_probe.py [--root ../shared/datasets/mtd ...] [--threads N]

For each dataset root (MVTec layout), fits the default PatchCore pipeline
(``make_model('patchcore', random_state=0)``) and prints:

- the lowest-scored defective and the highest-scored good test images with their size
  (height x width) and type: where the image-level errors are;
- the correlation of each test image's score with its width, height, aspect and area, over
  the good and over the defective test images;
- a geometry correction learnt from the good training images alone: their leave-one-out
  image scores (each against the bank without its own rows, as the fit computes them for
  ``offset_``) fitted by least squares on log(content area in the frame); every test image's
  score and map is then shifted by its predicted score. Image AUROC, pixel AUROC and
  AUPRO@0.3 before and after, and the R² of the fit on the training scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from trained_subset import use_threads  # benchmarks/, this folder

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def content_area(sizes, frame):
    """Pixels of each (height, width) image inside a letterbox ``frame`` (its longer side
    scaled to the frame's)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    scale = np.min(np.asarray(frame, np.float64) / sizes, axis=1)
    return sizes.prod(axis=1) * scale**2


def design(sizes, frame):
    """Least-squares design: a constant and log(content area)."""
    return np.column_stack([np.ones(len(sizes)), np.log(content_area(sizes, frame))])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/geometry_probe.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", action="append", default=[])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--show", type=int, default=20, help="images listed per end")
    args = parser.parse_args(argv)
    use_threads(args.threads)
    from skpatchcore._images import check_images
    from skpatchcore.datasets import load_masks, load_mvtec
    from skpatchcore.methods import make_model
    from skpatchcore.metrics import aupro, image_auroc, pixel_auroc

    for root in args.root or [str(DATASETS / "mtd")]:
        data = load_mvtec(root)
        pipe = make_model("patchcore", random_state=0).fit(data.train)
        extractor, detector = pipe[0], pipe[-1]
        loo = detector._loo_anomaly(extractor.transform(data.train))
        scores, grids = detector.score_and_map(extractor.transform(data.test))
        anomaly = -scores
        sizes = np.array(check_images(data.test).sizes())
        maps = extractor.maps_to_images(grids, [tuple(s) for s in sizes], 4.0)
        masks = load_masks(data.mask_paths, [m.shape for m in maps])
        types = np.asarray(data.defect_type)
        good = types == "good"
        y = ~good
        print(f"\n{Path(root).name}: {len(data.train)} training images, {len(data.test)} test")
        order = np.argsort(anomaly)
        for title, picks in (("lowest-scored defective", [i for i in order if y[i]]),
                             ("highest-scored good", [i for i in order[::-1] if good[i]])):
            print(f"{title} (score, height x width, type, file):")
            for i in picks[: args.show]:
                print(f"  {anomaly[i]:.3f}  {sizes[i][0]} x {sizes[i][1]}  {types[i]}  "
                      f"{Path(data.test[i]).name}")
        h, w = sizes[:, 0].astype(float), sizes[:, 1].astype(float)
        for name, v in (("width", w), ("height", h), ("aspect w/h", w / h), ("area", h * w)):
            print(f"correlation of the score with {name}: good "
                  f"{np.corrcoef(v[good], anomaly[good])[0, 1]:+.2f}, defective "
                  f"{np.corrcoef(v[y], anomaly[y])[0, 1]:+.2f}")

        frame = np.broadcast_to(extractor.image_size, 2)
        train = design(check_images(data.train).sizes(), frame)
        coef, *_ = np.linalg.lstsq(train, loo, rcond=None)
        fitted = train @ coef
        r2 = 1 - ((loo - fitted) ** 2).sum() / ((loo - loo.mean()) ** 2).sum()
        base = design(sizes, frame) @ coef
        shifted = [m - b for m, b in zip(maps, base, strict=True)]
        print(f"geometry correction (R² on the training scores {r2:.3f}):")
        print("| scores | image AUROC | pixel AUROC | AUPRO@0.3 |\n|---|---|---|---|")
        for name, s, m in (("as fitted", anomaly, maps), ("minus the predicted score",
                                                          anomaly - base, shifted)):
            print(f"| {name} | {image_auroc(y, s):.3f} | {pixel_auroc(masks, m):.3f} | "
                  f"{aupro(masks, m, fpr_limit=0.3):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
