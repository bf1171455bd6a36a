"""Would normalising patch scores per grid position help? A measurement, not a feature.

    python benchmarks/position_probe.py [--root ../shared/datasets/mtd ...] [--threads N]

For each dataset root (MVTec layout), fits the default PatchCore pipeline
(``make_model('patchcore', sampling_ratio=0.01, random_state=0)``), then scores every good
training image *leave-one-out* (each against the memory bank without the rows that came
from it, a full search of every cell; the detector's internals, as its own fit does for
the image scores) to get one patch-score grid per training image. From these grids alone
(no test label) it takes per-position statistics: mean, standard deviation, 95th and 99th
percentiles. The test images' grids are then divided by (or shifted by) them, and the image
score is the grid's maximum (no reweighting); the maps are the normalised grids through the
usual geometry (sigma 4). Prints, per variant, image AUROC (with each defect type's against
the good test images), pixel AUROC and AUPRO@0.3, and the share of the training grids'
variance that the position explains (R², the variance of the per-position means over the
variance of all cells).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from trained_subset import use_threads  # benchmarks/, this folder

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def leave_one_out_grids(detector, features, n):
    """Patch-score grids of the ``n`` training images, each against the bank without the
    rows that came from it (every cell searched)."""
    bank_groups = detector.bank_sample_index_
    return detector._map_chunks(
        lambda chunk, groups: detector._search(chunk, groups, bank_groups),
        features, np.arange(n))[1]


def variants(grids, loo):
    """name -> normalised test grids, from the leave-one-out training grids ``loo``."""
    mean, std = loo.mean(0), loo.std(0)
    q95, q99 = np.quantile(loo, [0.95, 0.99], axis=0)
    tiny = 1e-6
    return {
        "none (the grid's maximum, b = 1)": grids,
        "g - mean": grids - mean,
        "g / mean": grids / (mean + tiny),
        "(g - mean) / std": (grids - mean) / (std + tiny),
        "g / q95": grids / (q95 + tiny),
        "g / q99": grids / (q99 + tiny),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/position_probe.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", action="append", default=[])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    from skpatchcore._images import check_images
    from skpatchcore.datasets import load_masks, load_mvtec
    from skpatchcore.methods import make_model
    from skpatchcore.metrics import aupro, image_auroc, image_auroc_by_type, pixel_auroc

    for root in args.root or [str(DATASETS / "mtd"), str(DATASETS / "tire")]:
        data = load_mvtec(root)
        pipe = make_model("patchcore", sampling_ratio=0.01, random_state=0)
        start = time.perf_counter()
        pipe.fit(data.train)
        fit_s = time.perf_counter() - start
        extractor, detector = pipe[0], pipe[-1]
        start = time.perf_counter()
        train = extractor.transform(data.train)
        loo = leave_one_out_grids(detector, train, len(data.train))
        loo_s = time.perf_counter() - start
        _, grids = detector.score_and_map(extractor.transform(data.test))
        y = np.asarray(data.y_test) == -1
        types = np.asarray(data.defect_type)
        sizes = check_images(data.test).sizes()
        masks = None
        r2 = float(loo.mean(0).var() / loo.var())
        print(f"\n{Path(root).name}: fit {fit_s:.0f} s, leave-one-out grids of "
              f"{len(data.train)} training images {loo_s:.0f} s; position R² {r2:.3f}")
        kinds = sorted(set(types) - {"good"})
        print("| normalisation | image AUROC | " + " | ".join(kinds)
              + " | pixel AUROC | AUPRO@0.3 |")
        print("|---|---|" + "---|" * len(kinds) + "---|---|")
        for name, normalised in variants(grids, loo).items():
            maps = extractor.maps_to_images(normalised.astype(np.float32), sizes, 4.0)
            if masks is None:
                masks = load_masks(data.mask_paths, [m.shape for m in maps])
            score = normalised.reshape(len(normalised), -1).max(axis=1)
            by_type = image_auroc_by_type(types, score).values()
            print(f"| {name} | {image_auroc(y, score):.3f} | "
                  + " | ".join(f"{v:.3f}" for v in by_type)
                  + f" | {pixel_auroc(masks, maps):.3f} | "
                  f"{aupro(masks, maps, fpr_limit=0.3):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
