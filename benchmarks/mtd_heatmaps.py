"""Make the MTD heat-map pictures of docs/benchmarks.md with the evaluate command's defaults.

    python benchmarks/mtd_heatmaps.py [--root ../shared/datasets/mtd] [--out docs/images]
        [evaluate options, e.g. --backbone efficientnet_lite0]

Runs ``python -m skpatchcore.evaluate ROOT --save-maps TMP --json TMP/results.json`` (any
further options are passed on), then copies, for the good test images and each defect type,
the overlay of the image with the median score of that type (the lower median for an even
count: a typical image, not a chosen success) to ``OUT/mtd_<type>.png``. Prints the metrics
and, per picture, the source image and its score.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "datasets" / "mtd"
# save_overlays names each file <test index>_<stem>_score<score>_overlay.png
_OVERLAY = re.compile(r"^(\d+)_(.+)_score(-?[\d.]+)_overlay\.png$")


def median_overlays(folder, defect_types):
    """{type: (overlay path, score)} for the median-score test image of each type."""
    by_type = {}
    for path in Path(folder).glob("*_overlay.png"):
        match = _OVERLAY.match(path.name)
        if match is None:
            continue
        index, score = int(match.group(1)), float(match.group(3))
        by_type.setdefault(defect_types[index], []).append((score, path))
    picked = {}
    for kind, items in sorted(by_type.items()):
        items.sort()
        score, path = items[(len(items) - 1) // 2]
        picked[kind] = (path, score)
    return picked


def main(argv=None):
    from skpatchcore.datasets import load_mvtec
    from skpatchcore.evaluate import main as evaluate_main

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--out", default=str(REPO / "docs" / "images"))
    args, rest = parser.parse_known_args(argv)
    types = np.asarray(load_mvtec(args.root, allow_missing_masks=True).defect_type)
    with tempfile.TemporaryDirectory() as tmp:
        maps, results = Path(tmp) / "maps", Path(tmp) / "results.json"
        command = [args.root, "--save-maps", str(maps), "--json", str(results), "--quiet", *rest]
        print("python -m skpatchcore.evaluate " + " ".join(command))
        code = evaluate_main(command)
        if code != 0:
            return code
        res = json.loads(results.read_text())
        print("pixel AUROC by type:", json.dumps(res["pixel_auroc_by_type"]))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for kind, (path, score) in median_overlays(maps, types).items():
            shutil.copyfile(path, out / f"mtd_{kind}.png")
            print(f"mtd_{kind}.png  <- {path.name}  (score {score:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
