"""One method on a random subset of an MVTec-layout dataset: quick comparisons of settings.

    python benchmarks/trained_subset.py ROOT --method mkd [--n-train 150] [--n-test 100]
        [--param NAME=VALUE ...] [--threads 1]

Draws ``--n-train`` images of ``ROOT/train/good`` and ``--n-test`` of ``ROOT/test`` (half
good, half defective where there are enough, the rest from the other kind) with
``numpy.random.RandomState(0)``, fits ``make_model(method, random_state=0, **params)`` on
the training draw and prints one line: the settings, image AUROC, pixel AUROC (maps at
``sigma`` 4 on each image's pixels), fit seconds and ms per test image. The same draw for
every setting, so settings compare; a subset has fewer training steps than the whole set,
so its absolute figures are not the whole set's (``benchmarks/methods_table.py`` runs
those). Parameter values are Python literals (``direction_weight=20``,
``"teacher_layers=('blocks.3',)"``).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time

import numpy as np


def parse_param(text):
    """'NAME=VALUE' -> (name, value): a Python literal, else the string itself."""
    name, _, value = text.partition("=")
    if not name.isidentifier() or not value:
        raise argparse.ArgumentTypeError(f"parameters are NAME=VALUE, got {text!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value  # a plain string, e.g. resize_mode=stretch


def use_threads(threads):
    """Run torch (and OpenMP, for what starts later) on ``threads`` threads; None leaves
    torch's default. Call it first, before any work."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/trained_subset.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--method", required=True)
    parser.add_argument("--n-train", type=int, default=150)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--param", type=parse_param, action="append", default=[])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    use_threads(args.threads)
    from skpatchcore.datasets import load_masks, load_mvtec
    from skpatchcore.methods import make_model
    from skpatchcore.metrics import image_auroc, pixel_auroc

    data = load_mvtec(args.root)
    rng = np.random.RandomState(0)
    train = [data.train[i] for i in np.sort(rng.choice(len(data.train),
                                                       min(args.n_train, len(data.train)),
                                                       replace=False))]
    y = np.asarray(data.y_test)
    good, bad = np.flatnonzero(y == 1), np.flatnonzero(y == -1)
    n_good = min(len(good), args.n_test // 2)
    n_bad = min(len(bad), args.n_test - n_good)
    n_good = min(len(good), args.n_test - n_bad)
    pick = np.sort(np.r_[rng.choice(good, n_good, replace=False),
                         rng.choice(bad, n_bad, replace=False)])
    test = [data.test[i] for i in pick]
    params = dict(args.param)
    model = make_model(args.method, random_state=0, **params)
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores, maps = model.score_and_map(test)
    ms = 1000.0 * (time.perf_counter() - start) / len(test)
    maps = list(maps)
    masks = load_masks([data.mask_paths[i] for i in pick], [m.shape for m in maps])
    img = image_auroc(y[pick] == -1, -scores)
    pix = pixel_auroc(masks, maps)  # load_mvtec has checked that every defect has a mask
    shown = " ".join(f"{k}={v!r}" for k, v in params.items()) or "defaults"
    print(f"{os.path.basename(os.path.normpath(args.root))} {args.method} {shown}: "
          f"image AUROC {img:.3f}, pixel AUROC {pix:.3f}, fit {fit_s:.0f} s, {ms:.0f} ms/img "
          f"({len(train)} train, {n_good} good + {n_bad} defective test)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
