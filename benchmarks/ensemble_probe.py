"""Would an ensemble of models beat its members? A measurement, not a product feature yet.

    python benchmarks/ensemble_probe.py [--root ../shared/datasets/mtd ...]
        [--member patchcore:backbone=efficientnet_lite0 ...] [--holdout 0.1] [--threads N]

For each dataset root (MVTec layout), the good training images are split once with
``numpy.random.RandomState(0)``: ``--holdout`` of them (at least two) are held out, every
member is fitted on the rest (``make_model(method, random_state=0, **params)``; a member may
set its own ``random_state``) and scores the held-out images and the test images (maps at
each image's pixels, ``sigma`` 4). Each member's image scores (sign flipped: higher = more
abnormal) and map values are standardised by the mean and std of its *held-out good images*
(maps: over their pixels), so that members in different units can be averaged, and the
ensemble is the mean of the standardised members. Nothing here looks at test labels except
the metrics. Prints, per dataset, each member alone and the ensemble: image AUROC, pixel
AUROC, AUPRO@0.3, and fit and score seconds (the ensemble's are the members' sums). The
members are fitted on the kept part only, so a member's figures can differ from
``evaluate``'s on the whole training set.

A member is ``METHOD[:NAME=VALUE,NAME=VALUE]`` with Python literals (``backbone`` is a
string): the default members are PatchCore on EfficientNet-Lite0, -Lite1 and -Lite2 with
a 1% coreset (given explicitly: ``make_model``'s default before it became 1% was
``CoresetSampler``'s 10%), the paper's best result being an ensemble of three backbones.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
from trained_subset import parse_param, use_threads  # benchmarks/, this folder

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
DEFAULT_MEMBERS = tuple(f"patchcore:backbone=efficientnet_lite{i},sampling_ratio=0.01"
                        for i in (0, 1, 2))


def parse_member(text):
    """'patchcore:backbone=efficientnet_lite0,image_size=384' -> ('patchcore', {...}); a
    value may be a list or tuple (``layers=['blocks.2','blocks.4']``: commas inside brackets
    do not split)."""
    method, _, rest = text.partition(":")
    items = re.split(r",(?![^\[(]*[\])])", rest)
    return method, dict(parse_param(item) for item in filter(None, items))


def standardise(values, reference):
    """``values`` in units of ``reference``'s spread around its mean."""
    ref = np.concatenate([np.ravel(r) for r in reference])
    return [(np.asarray(v, np.float64) - ref.mean()) / max(ref.std(), 1e-12) for v in values]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/ensemble_probe.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", action="append", default=[])
    parser.add_argument("--member", action="append", type=parse_member, default=[])
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    use_threads(args.threads)
    from skpatchcore.datasets import load_masks, load_mvtec
    from skpatchcore.methods import make_model
    from skpatchcore.metrics import aupro, image_auroc, pixel_auroc

    roots = args.root or [str(DATASETS / "mtd"), str(DATASETS / "tire")]
    members = args.member or [parse_member(m) for m in DEFAULT_MEMBERS]
    for root in roots:
        data = load_mvtec(root)
        rng = np.random.RandomState(0)
        order = rng.permutation(len(data.train))
        n_held = max(2, round(args.holdout * len(data.train)))
        held = [data.train[i] for i in np.sort(order[:n_held])]
        kept = [data.train[i] for i in np.sort(order[n_held:])]
        y = np.asarray(data.y_test) == -1
        masks = None  # load_mvtec has checked that every defective image has a mask
        rows, z_scores, z_maps = [], [], []
        total_fit = total_score = 0.0
        for method, params in members:
            model = make_model(method, **{"random_state": 0, **params})
            start = time.perf_counter()
            model.fit(kept)
            fit_s = time.perf_counter() - start
            held_scores, held_maps = model.score_and_map(held)
            start = time.perf_counter()
            scores, maps = model.score_and_map(data.test)
            score_s = time.perf_counter() - start
            maps = list(maps)
            if masks is None:
                masks = load_masks(data.mask_paths, [m.shape for m in maps])
            total_fit += fit_s
            total_score += score_s
            z_scores.append(standardise([-scores], [-held_scores])[0])
            z_maps.append(standardise(maps, list(held_maps)))
            rows.append((f"{method} {params}", -scores, maps, fit_s, score_s))
        n = len(members)
        ensemble_maps = [sum(z[i] for z in z_maps) / n for i in range(len(data.test))]
        rows.append(("ensemble (mean of standardised members)", sum(z_scores) / n,
                     ensemble_maps, total_fit, total_score))
        print(f"\n{Path(root).name}: {len(kept)} training images ({n_held} held out), "
              f"{len(data.test)} test images")
        print("| model | image AUROC | pixel AUROC | AUPRO@0.3 | fit s | ms per image |")
        print("|---|---|---|---|---|---|")
        for name, anomaly, maps, fit_s, score_s in rows:
            print(f"| {name} | {image_auroc(y, anomaly):.3f} | "
                  f"{pixel_auroc(masks, maps):.3f} | "
                  f"{aupro(masks, maps, fpr_limit=0.3):.3f} | {fit_s:.0f} | "
                  f"{1000 * score_s / len(data.test):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
