"""Where one image's scoring time goes, and end-to-end scoring against the reference recipe.

Fits our default pipeline and the reference recipe (see ``bench_pipeline.py``) on
``--n-train`` real photos, then scores the same ``--n-test`` photos (PNG files of
``--size`` x ``--size``) with each, decoding included, and prints milliseconds per image and
their ratio. Our time is then broken into stages, each timed on its own over the same
images: decode, preprocess (resize and letterbox), backbone, patch aggregation, border
replacement, search of every cell (maps), image scores (the pruned search and the
reweighting, what ``score_samples`` runs) and maps at each image's pixels (upsampling and
smoothing). Batch throughput (all images at once) and single-image latency (one image per
call) are both reported.

Example::

    cd benchmarks && python bench_scoring.py --mtd ../../shared/datasets/mtd
"""

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
from bench_coreset import cpu_name, print_markdown_table
from bench_pipeline import ReferencePatchCore, add_data_arguments, write_images


def _timed(fn, repeat=1):
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def breakdown(pipe, test):
    """Seconds per stage over ``test`` (paths), each stage timed on its own."""
    from skpatchcore._images import check_images

    fe, det = pipe[0], pipe[-1]
    images = check_images(test)
    geometry = fe._geometry
    stages = dict.fromkeys(["decode", "preprocess", "backbone", "aggregate", "border"], 0.0)
    grids = []
    with torch.inference_mode():
        for start in range(0, len(images), fe.batch_size):
            t = time.perf_counter()
            decoded = [images.decode(i, geometry)
                       for i in range(start, min(start + fe.batch_size, len(images)))]
            stages["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            batch = torch.stack([geometry.to_input(im) for im in decoded])
            stages["preprocess"] += time.perf_counter() - t
            t = time.perf_counter()
            fmaps = fe._run_network((batch - fe._mean) / fe._std)
            stages["backbone"] += time.perf_counter() - t
            t = time.perf_counter()
            g = torch.cat(fe._aggregate(fmaps), dim=1).permute(0, 2, 3, 1)
            stages["aggregate"] += time.perf_counter() - t
            t = time.perf_counter()
            g = fe._replace_border(g, [tuple(im.shape[1:]) for im in decoded]).numpy()
            stages["border"] += time.perf_counter() - t
            grids.append(g)
    G = np.concatenate(grids)
    stages["search, every cell (maps)"] = _timed(lambda: det._search(G, reweight=False))
    stages["image scores (pruned search + reweight)"] = _timed(lambda: det._scores(G))
    patch = det._search(G, reweight=False)[1]
    sizes = images.sizes()
    stages["maps at image pixels"] = _timed(lambda: fe.maps_to_images(patch, sizes, 4.0))
    return stages


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--reference-backbone", default="efficientnet_lite0")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from skpatchcore import make_patchcore

    with tempfile.TemporaryDirectory() as tmp:
        train, test = write_images(tmp, args.n_train, args.n_test, args.size, args.mtd)
        ours = make_patchcore(sampling_ratio=args.ratio, random_state=0).fit(train)
        ref = ReferencePatchCore(args.ratio, args.reference_backbone).fit(train)
        for model in (ours, ref):
            model.score_samples(test[:8])  # warm-up
        e2e = {"ours": _timed(lambda: ours.score_samples(test), 2),
               "reference": _timed(lambda: ref.score_samples(test), 2)}
        single = _timed(lambda: [ours.score_samples(test[i : i + 1]) for i in range(20)])
        maps = _timed(lambda: ours.score_and_map(test))
        stages = breakdown(ours, test)

    n = len(test)
    print(f"python {' '.join(sys.argv)}")
    print(f"network precision {ours[0].precision_}, jit {ours[0].jit}, batch_size "
          f"{ours[0].batch_size}; "
          f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} "
          f"threads, load average {os.getloadavg()[0]:.1f}; {args.n_train} train / {n} test "
          f"images of {args.size}x{args.size} ({'MTD photos' if args.mtd else 'synthetic'}), "
          f"{args.ratio:.0%} coreset; bank {ours[-1].memory_bank_.shape}\n")
    ms = {k: 1000 * v / n for k, v in e2e.items()}
    print_markdown_table(
        ["scoring (decoding included)", "ms per image"],
        [["reference (resize 256, crop 224, " + args.reference_backbone + ")",
          f"{ms['reference']:.1f}"],
         ["ours, default (score_samples, batch)", f"{ms['ours']:.1f}"],
         ["ours, one image per call (latency)", f"{1000 * single / 20:.1f}"],
         ["ours, scores and maps at image pixels (score_and_map)", f"{1000 * maps / n:.1f}"],
         ["ratio reference / ours (batch)", f"{ms['reference'] / ms['ours']:.2f}x"]])
    print()
    print_markdown_table(["stage of ours", "ms per image"],
                         [[k, f"{1000 * v / n:.1f}"] for k, v in stages.items()])


if __name__ == "__main__":
    main()
