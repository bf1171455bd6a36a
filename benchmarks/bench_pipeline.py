"""Benchmark the whole PatchCore fit and per-image scoring against a reference pipeline.

Writes ``--n-train`` training and ``--n-test`` test images of ``--size`` x ``--size`` pixels
to a temporary folder (real photos from ``--mtd`` resized, or synthetic textures), then, each
in its own subprocess so that peak resident memory (``ru_maxrss``) is its own, fits and
scores:

- ``reference``: the public implementations' recipe with the same network (``--backbone``,
  EfficientNet-Lite0 unless told otherwise): resize 256 / centre crop 224, each layer's 3x3
  patches unfolded and pooled to 1024 channels, averaged over the two layers (1024-d patch
  features), all training features held in memory, Gaussian projection to 128, plain
  greedy k-center (one full distance update per selected centre), and per-image scoring by
  exact nearest neighbour over the bank (``torch.cdist``, like a flat L2 index);
- ``ours``: ``make_patchcore(sampling_ratio=..., backbone=...)`` with its other defaults
  (streamed fit, leave-one-out training scores for ``offset_`` included);
- ``plain Pipeline``: the same three steps in scikit-learn's own ``Pipeline`` (what the
  README shows); it must fit the same model in the same bounded memory as ``ours``;
- ``ours @224``: the same with the reference's preprocessing (``image_size=256,
  crop_size=224, resize_mode='stretch'``), the like-for-like row.

``--rows`` picks the rows to run (default: all four).

Scoring is timed twice: end to end from image files (decode, features, search, image
score), and for the nearest-neighbour step alone on precomputed features.

Example::

    python benchmarks/bench_pipeline.py --mtd ../shared/datasets/mtd --n-train 400 --size 300
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_coreset import cpu_name, print_markdown_table


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_images(folder, n_train, n_test, size, mtd):
    """PNG files of size x size: MTD photos (train/good, test/*) or synthetic textures."""
    from PIL import Image

    folder = Path(folder)
    (folder / "train").mkdir()
    (folder / "test").mkdir()
    if mtd:
        root = Path(mtd)
        train = sorted((root / "train" / "good").iterdir())[:n_train]
        test = sorted(p for p in (root / "test").rglob("*") if p.is_file())
        test = test[:: max(1, len(test) // n_test)][:n_test]
        if len(train) < n_train:  # cycle, flipped, when the set is smaller than asked
            train = [train[i % len(train)] for i in range(n_train)]
        for split, files in (("train", train), ("test", test)):
            for i, path in enumerate(files):
                img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
                if i >= len(set(files)):
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                img.save(folder / split / f"{i:04d}.png")
    else:
        from skpatchcore.datasets import make_defect_images

        X, _, _ = make_defect_images(n_train + n_test, 0, image_size=size, random_state=0)
        for i, x in enumerate(X):
            split = "train" if i < n_train else "test"
            Image.fromarray(x).save(folder / split / f"{i:04d}.png")
    return sorted(map(str, (folder / "train").iterdir())), sorted(
        map(str, (folder / "test").iterdir()))


# ---------------------------------------------------------------- the reference recipe
class ReferencePatchCore:
    """PatchCore as the public implementations do it (see the module docstring)."""

    def __init__(self, ratio, backbone, dim=1024, proj_dim=128, seed=0):
        from skpatchcore import FeatureExtractor

        self.ratio, self.dim, self.proj_dim, self.seed = ratio, dim, proj_dim, seed
        # our extractor only for decoding, resize 256 and centre crop 224 and the network
        self.fe = FeatureExtractor(backbone, image_size=256, crop_size=224,
                                   resize_mode="stretch", patch_size=1).fit()

    def _features(self, images):
        """1024-d patch features (n, 28 * 28, 1024), float32."""
        import torch.nn.functional as F

        from skpatchcore._geometry import Geometry
        from skpatchcore._images import check_images

        fe, images = self.fe, check_images(images)
        geometry = Geometry(256, "stretch", 224)
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), 16):
                batch = torch.stack([geometry.to_input(images[i])
                                     for i in range(start, min(start + 16, len(images)))])
                maps = fe._network((batch - fe._mean) / fe._std)
                size = maps[0].shape[-2:]
                layers = []
                for fmap in maps:
                    b, c = fmap.shape[:2]
                    patches = F.unfold(fmap, 3, padding=1)  # (b, c*9, h*w)
                    h, w = fmap.shape[-2:]
                    patches = patches.reshape(b, c * 9, h, w)
                    if (h, w) != tuple(size):
                        patches = F.interpolate(patches, size=size, mode="bilinear",
                                                align_corners=False)
                    patches = patches.permute(0, 2, 3, 1).reshape(-1, 1, c * 9)
                    layers.append(F.adaptive_avg_pool1d(patches, self.dim)[:, 0])
                merged = torch.stack(layers, 1).mean(1)
                out.append(merged.reshape(len(batch), -1, self.dim).numpy())
        return np.concatenate(out)

    def fit(self, images):
        from skpatchcore._kcenter import greedy_kcenter_reference

        feats = self._features(images).reshape(-1, self.dim)
        gen = torch.Generator().manual_seed(self.seed)
        matrix = torch.randn(self.dim, self.proj_dim, generator=gen) / self.proj_dim**0.5
        points = torch.from_numpy(feats) @ matrix
        m = max(1, int(np.ceil(self.ratio * len(feats))))
        idx, _ = greedy_kcenter_reference(points, m, start_index=0)
        self.bank = torch.from_numpy(feats[idx])
        return self

    def score_features(self, feats):
        with torch.inference_mode():
            return np.array([float(torch.cdist(torch.from_numpy(f), self.bank).min(1)[0].max())
                             for f in feats])

    def score_samples(self, images):
        return -self.score_features(self._features(images))


# ---------------------------------------------------------------- one measured run
def worker(spec):
    torch.set_num_threads(spec["threads"])
    train, test = spec["train"], spec["test"]
    if spec["name"] == "reference":
        model = ReferencePatchCore(spec["ratio"], spec["backbone"])
    else:
        from skpatchcore import make_patchcore

        model = make_patchcore(sampling_ratio=spec["ratio"], random_state=0,
                               backbone=spec["backbone"],
                               **spec.get("params", {}))
        if spec["name"] == "plain Pipeline":
            from sklearn.pipeline import Pipeline

            model = Pipeline(model.steps)
        model[0].fit()  # load the network outside the timed fit, as the reference does
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    fit_rss = peak_rss_mb()
    model.score_samples(test[:4])  # warm-up
    start = time.perf_counter()
    scores = model.score_samples(test)
    e2e_ms = 1000 * (time.perf_counter() - start) / len(test)
    if spec["name"] == "reference":
        feats = model._features(test)
        start = time.perf_counter()
        model.score_features(feats)
        bank_rows = len(model.bank)
    else:
        feats = model[:-1].transform(test)
        start = time.perf_counter()
        model[-1].score_samples(feats)
        bank_rows = len(model[-1].memory_bank_)
    nn_ms = 1000 * (time.perf_counter() - start) / len(test)
    offset = None if spec["name"] == "reference" else model[-1].offset_
    print(json.dumps({"fit_s": fit_s, "offset": offset, "fit_rss_mb": fit_rss, "e2e_ms": e2e_ms,
                      "nn_ms": nn_ms, "bank": [bank_rows, int(feats.shape[-1])],
                      "finite": bool(np.isfinite(scores).all())}))


def run(spec):
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_data_arguments(parser):
    """The image set and run options shared with bench_scoring.py."""
    parser.add_argument("--mtd", help="MVTec-layout folder with real photos (else synthetic)")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=os.cpu_count())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--rows", default="reference,ours,plain Pipeline,ours @224",
                        help="comma-separated rows to run")
    parser.add_argument("--backbone", default="efficientnet_lite0",
                        help="network of every row (the recorded runs used Lite0)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))

    with tempfile.TemporaryDirectory() as tmp:
        train, test = write_images(tmp, args.n_train, args.n_test, args.size, args.mtd)
        base = {"train": train, "test": test, "ratio": args.ratio, "threads": args.threads,
                "backbone": args.backbone}
        configs = [("reference", {}), ("ours", {}), ("plain Pipeline", {}),
                   ("ours @224", {"image_size": 256, "crop_size": 224, "resize_mode": "stretch"})]
        wanted = set(args.rows.split(",")) - ({"reference"} if args.skip_reference else set())
        configs = [(name, params) for name, params in configs if name in wanted]
        rows = {name: run({**base, "name": name, "params": params})
                for name, params in configs}

    print(f"python {' '.join(sys.argv)}")
    print(f"{cpu_name()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f}; {args.n_train} train / {args.n_test} test images of "
          f"{args.size}x{args.size} ({'MTD photos' if args.mtd else 'synthetic'}), "
          f"{args.ratio:.0%} coreset, {args.backbone}\n")
    ref = rows.get("reference")
    print("In parentheses: the reference's figure divided by ours (higher is better).")

    def cell(r, key, fmt):
        text = format(r[key], fmt)
        if ref is not None and r is not ref:
            text += f" ({ref[key] / r[key]:.1f}×)"
        return text

    header = ["pipeline", "bank (rows x dim)", "fit s", "fit peak RSS MB",
              "score ms/img (end to end)", "search ms/img (features given)"]
    offsets = {name: r["offset"] for name, r in rows.items() if r["offset"] is not None}
    if "ours" in offsets and "plain Pipeline" in offsets:
        same = offsets["ours"] == offsets["plain Pipeline"]
        print(f"plain Pipeline offset_ {'equals' if same else 'DIFFERS from'} make_patchcore's "
              f"({offsets['plain Pipeline']!r} vs {offsets['ours']!r})\n")
    print_markdown_table(header, [
        [name, f"{r['bank'][0]} x {r['bank'][1]}", cell(r, "fit_s", ".1f"),
         cell(r, "fit_rss_mb", ".0f"), cell(r, "e2e_ms", ".1f"), cell(r, "nn_ms", ".1f")]
        for name, r in rows.items()])


if __name__ == "__main__":
    main()
