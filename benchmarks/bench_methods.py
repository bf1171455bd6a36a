"""PatchCore, SPADE and PaDiM on one MVTec-layout dataset, on the same features.

    python benchmarks/bench_methods.py [--root ../shared/datasets/mtd] [--image-size 320]
        [--methods patchcore spade padim] [--spade-ratio R] [--features-dir DIR]

Patch features are extracted once with :class:`skpatchcore.FeatureExtractor` (letterbox, so
every image of any aspect ratio gives the same grid and PaDiM applies) and written to .npy
files; each method then runs in its own subprocess, so that the peak resident memory
(VmHWM, or ``ru_maxrss``) is that method's own. A method fits on ``train/good`` and scores
every image under ``test``; the metrics are image AUROC, pixel AUROC and AUPRO@0.3 of
:mod:`skpatchcore.metrics`, with maps taken back to each image's own pixels as
:mod:`skpatchcore.evaluate` does. Times exclude feature extraction, which is reported once.

Prints one markdown table with the command line on top.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "datasets" / "mtd"
METHODS = ("patchcore", "spade", "padim")
# Test images per scoring call; their features are read from disk one block at a time.
_SCORE_BATCH = 32


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench_methods.py",
        description="Compare PatchCore, SPADE and PaDiM on shared patch features.",
    )
    parser.add_argument("--root", default=str(DEFAULT_ROOT),
                        help="MVTec-layout dataset folder (default: ../shared/datasets/mtd)")
    parser.add_argument("--category", help="sub-folder of ROOT holding train/ and test/")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--patch-size", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--sampling-ratio", type=float, default=0.01,
                        help="PatchCore coreset fraction (default 0.01)")
    parser.add_argument("--spade-ratio", type=float, default=None,
                        help="SPADE coreset fraction; default: the full bank")
    parser.add_argument("--padim-features", type=int, default=100,
                        help="PaDiM channels kept (default 100; 0 keeps all)")
    parser.add_argument("--padim-reg", type=float, default=0.01)
    parser.add_argument("--sigma", type=float, default=4.0, help="map smoothing (px)")
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--features-dir",
                        help="keep the extracted features here and reuse them when the "
                             "settings match (default: a temporary folder, deleted)")
    parser.add_argument("--json", help="also write all results to this file")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _peak_rss_mb():
    """Peak resident memory of this process, in MiB.

    Linux's VmHWM belongs to the process image, whereas ``ru_maxrss`` of a child started by
    fork/exec also counts the parent's peak at the time of the exec; ru_maxrss is only the
    fallback where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _extractor(args):
    from skpatchcore import FeatureExtractor

    return FeatureExtractor(args.backbone, image_size=args.image_size,
                            patch_size=args.patch_size, device=args.device)


def _feature_settings(args, data):
    return {
        "root": str(Path(data.root).resolve()), "n_train": len(data.train),
        "n_test": len(data.test), "backbone": args.backbone, "image_size": args.image_size,
        "patch_size": args.patch_size, "resize_mode": "letterbox",
    }


# ---------------------------------------------------------------------- feature extraction
def _extract(extractor, paths, out_path):
    """Features of ``paths`` written to a .npy file batch by batch; returns seconds."""
    h, w = extractor.grid_shape_
    out = np.lib.format.open_memmap(
        out_path, mode="w+", dtype=np.float32,
        shape=(len(paths), h, w, extractor.feature_dim_),
    )
    start = time.perf_counter()
    for i in range(0, len(paths), _SCORE_BATCH):
        out[i : i + _SCORE_BATCH] = extractor.transform(paths[i : i + _SCORE_BATCH])
    seconds = time.perf_counter() - start
    out.flush()
    del out
    return seconds


def _prepare_features(args, data, folder):
    """Extract (or reuse) train/test features in ``folder``; return the metadata."""
    meta_path = folder / "meta.json"
    wanted = _feature_settings(args, data)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            meta["cached"] = True
            return meta
    extractor = _extractor(args).fit()
    meta = dict(wanted)
    meta["grid_shape"] = list(extractor.grid_shape_)
    meta["feature_dim"] = int(extractor.feature_dim_)
    meta["extract_train_s"] = _extract(extractor, data.train, folder / "train.npy")
    meta["extract_test_s"] = _extract(extractor, data.test, folder / "test.npy")
    meta["extract_peak_rss_mb"] = _peak_rss_mb()
    meta_path.write_text(json.dumps(meta, indent=2))
    meta["cached"] = False
    return meta


# ---------------------------------------------------------------------- one method (worker)
def _build(method, args, n_channels):
    from skpatchcore import CoresetSampler, PatchCoreDetector
    from skpatchcore.padim import PaDiMDetector
    from skpatchcore.spade import SPADEDetector

    sampler = None
    if method == "patchcore":
        sampler = CoresetSampler(args.sampling_ratio, random_state=args.random_state,
                                 device=args.device)
        detector = PatchCoreDetector(device=args.device)
        settings = f"coreset {100 * args.sampling_ratio:g}%, b=9"
    elif method == "spade":
        if args.spade_ratio is not None:
            sampler = CoresetSampler(args.spade_ratio, random_state=args.random_state,
                                     device=args.device)
        detector = SPADEDetector(device=args.device)
        bank = "full bank" if sampler is None else f"coreset {100 * args.spade_ratio:g}%"
        settings = (f"{bank}, kappa={detector.n_neighbors}, "
                    f"K={detector.n_image_neighbors} pooled")
    else:
        n_features = args.padim_features or None
        detector = PaDiMDetector(n_features=n_features, reg=args.padim_reg,
                                 random_state=args.random_state, device=args.device)
        kept = n_channels if n_features is None else min(n_features, n_channels)
        settings = f"{kept} of {n_channels} channels, reg={args.padim_reg:g}"
    return sampler, detector, settings


def _run_method(method, args, folder):
    from skpatchcore.datasets import image_shapes, load_masks, load_mvtec
    from skpatchcore.metrics import aupro, image_auroc, pixel_auroc

    data = load_mvtec(args.root, args.category, allow_missing_masks=True)
    baseline_rss = _peak_rss_mb()  # interpreter, torch and skpatchcore, before any data
    train = np.load(folder / "train.npy")
    sampler, detector, settings = _build(method, args, train.shape[-1])

    start = time.perf_counter()
    bank = train if sampler is None else sampler.fit_transform(train)
    detector.fit(bank)
    fit_s = time.perf_counter() - start
    del train, bank

    n_test = np.load(folder / "test.npy", mmap_mode="r").shape[0]
    scores, grids = [], []
    score_s = map_s = 0.0
    for i in range(0, n_test, _SCORE_BATCH):
        disk = np.load(folder / "test.npy", mmap_mode="r")
        block = np.array(disk[i : i + _SCORE_BATCH])
        del disk  # unmap, so that resident memory holds one block of test features
        start = time.perf_counter()
        scores.append(detector.score_samples(block))
        score_s += time.perf_counter() - start
        start = time.perf_counter()
        grids.append(detector.predict_map(block))
        map_s += time.perf_counter() - start
    peak_rss = _peak_rss_mb()
    scores, grids = np.concatenate(scores), np.concatenate(grids)

    sizes = image_shapes(data.test)
    maps = _extractor(args).fit().maps_to_images(grids, sizes, args.sigma)
    masks = load_masks(data.mask_paths, sizes)
    is_anomalous = np.asarray(data.y_test) == -1
    return {
        "method": method, "settings": settings,
        "image_auroc": image_auroc(is_anomalous, -scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "aupro": aupro(masks, maps, fpr_limit=0.3),
        "fit_s": fit_s,
        "score_ms_per_image": 1000.0 * score_s / n_test,
        "map_ms_per_image": 1000.0 * map_s / n_test,
        "peak_rss_mb": peak_rss,
        "baseline_rss_mb": baseline_rss,
        "flagged_normal": float(np.mean(scores[~is_anomalous] < detector.offset_)),
        "flagged_defective": float(np.mean(scores[is_anomalous] < detector.offset_)),
        "params": detector.get_params(),
    }


# ---------------------------------------------------------------------- report
def _table(results):
    head = ("| method | settings | image AUROC | pixel AUROC | AUPRO@0.3 | fit s "
            "| score ms/img | map ms/img | peak RSS MB | -1 rate normal / defective |")
    rows = [head, "|" + "---|" * 10]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['method']} | failed: {r['error']} |" + " |" * 8)
            continue
        rows.append(
            f"| {r['method']} | {r['settings']} | {r['image_auroc']:.4f} "
            f"| {r['pixel_auroc']:.4f} | {r['aupro']:.4f} | {r['fit_s']:.1f} "
            f"| {r['score_ms_per_image']:.1f} | {r['map_ms_per_image']:.1f} "
            f"| {r['peak_rss_mb']:.0f} "
            f"| {r['flagged_normal']:.2f} / {r['flagged_defective']:.2f} |"
        )
    return "\n".join(rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    if args.features_dir is None and args.worker is None:
        with tempfile.TemporaryDirectory(prefix="bench_methods_") as tmp:
            return _main(args, argv, Path(tmp))
    return _main(args, argv, Path(args.features_dir))


def _main(args, argv, folder):
    if args.worker is not None:
        print(json.dumps(_run_method(args.worker, args, folder)))
        return 0

    from skpatchcore.datasets import load_mvtec

    data = load_mvtec(args.root, args.category, allow_missing_masks=True)
    folder.mkdir(parents=True, exist_ok=True)
    meta = _prepare_features(args, data, folder)
    worker_argv = list(argv)
    if args.features_dir is None:
        worker_argv += ["--features-dir", str(folder)]
    results = []
    for method in args.methods:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *worker_argv, "--worker", method],
            capture_output=True, text=True, cwd=str(REPO),
        )
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            print(proc.stderr, file=sys.stderr)
            results.append({"method": method, "error": tail[0]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    import torch

    n_train, n_test = meta["n_train"], meta["n_test"]
    h, w = meta["grid_shape"]
    extraction = (
        f"{meta['extract_train_s']:.0f} s for {n_train} train images "
        f"({1000 * meta['extract_train_s'] / n_train:.0f} ms/img), "
        f"{meta['extract_test_s']:.0f} s for {n_test} test images "
        f"({1000 * meta['extract_test_s'] / n_test:.0f} ms/img)"
        + (" (cached from an earlier run with the same settings)" if meta["cached"] else "")
    )
    print(f"$ python benchmarks/bench_methods.py {shlex.join(argv)}")
    print()
    print(f"Data: {meta['root']} ({n_train} train/good, {n_test} test). Features: "
          f"{args.backbone}, {args.image_size} px letterbox, patch {args.patch_size}, grid "
          f"{h}x{w}x{meta['feature_dim']}; extraction {extraction}. Machine: "
          f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), cuda={torch.cuda.is_available()}. Fit and "
          "ms/img exclude extraction; peak RSS is each method's own process, with the "
          "training features it loads for fit (a worker peaks at "
          f"{min(r.get('baseline_rss_mb', np.inf) for r in results):.0f} MB after its "
          "imports, before any data).")
    print()
    print(_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv, "features": meta,
                                               "results": results}, indent=2, default=str))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
