"""Milliseconds per image: the library (torch) against its ONNX export (onnxruntime).

Fits a PatchCore pipeline on ``--n-train`` photos (MTD with ``--mtd``, else synthetic
textures), exports it with :func:`skpatchcore.export_onnx` for the test frames' size, and
scores the same ``--n-test`` PNG files both ways, end to end: decode, preprocess, network,
search, image scores and the anomaly map at each image's pixels. Both run on the CPU with
``--threads`` threads (torch's intra-op threads; onnxruntime's intra-op pool). Batch
throughput (8 images per call) and single-image latency (one image per call) are reported,
best of ``--repeat`` runs, with the parity of the two (largest relative score difference,
largest map difference over the map's range, labels). ``--bfloat16`` adds the library with
its network in bfloat16 (what ``precision='auto'`` picks on CPUs with native bfloat16).

Example::

    cd benchmarks && python bench_onnx.py --mtd ../../shared/datasets/mtd --threads 2
"""

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_coreset import machine_line, print_markdown_table
from bench_pipeline import add_data_arguments, write_images


def _best(fn, repeat):
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_arguments(parser)
    parser.set_defaults(n_train=100, n_test=40, threads=2)
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bfloat16", action="store_true",
                        help="also time the library with its network in bfloat16")
    args = parser.parse_args(argv)

    from skpatchcore import export_onnx, make_patchcore
    from skpatchcore._images import check_images
    from skpatchcore._onnx import OnnxModel, read_frame

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        train, test = write_images(tmp, args.n_train, args.n_test, args.size, args.mtd)
        pipe = make_patchcore(backbone=args.backbone, image_size=args.image_size,
                              sampling_ratio=args.ratio, precision="float32",
                              random_state=0).fit(train)
        start = time.perf_counter()
        path = export_onnx(pipe, Path(tmp) / "model.onnx", frame_size=(args.size, args.size))
        export_s = time.perf_counter() - start
        size_mib = path.stat().st_size / 2**20
        model = OnnxModel(path, threads=args.threads)
        images = check_images(test)

        def torch_batch():
            return pipe.score_and_map(test)

        def torch_single():
            return [pipe.score_and_map([p]) for p in test]

        def ort_run(batch):
            outs = []
            for a in range(0, len(test), batch):
                frames = np.stack([read_frame(images, i)
                                   for i in range(a, min(len(test), a + batch))])
                outs.append(model.run(frames))
            return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

        torch_batch()  # warm-up: traces, caches
        torch_single()
        ort_run(8)
        ort_run(1)
        rows = []
        t_tb, (scores, maps) = _best(torch_batch, args.repeat)
        t_ob, out = _best(lambda: ort_run(8), args.repeat)
        t_ts, _ = _best(torch_single, args.repeat)
        t_os, _ = _best(lambda: ort_run(1), args.repeat)
        timings = [("torch (library, float32)", t_tb, t_ts),
                   ("onnxruntime (export, float32)", t_ob, t_os)]
        if args.bfloat16:  # the library's network in bfloat16 (CPUs with native support)
            pipe[0].precision_ = "bfloat16"
            torch_batch()
            torch_single()
            timings.insert(1, ("torch (library, bfloat16)", _best(torch_batch, args.repeat)[0],
                               _best(torch_single, args.repeat)[0]))
            pipe[0].precision_ = "float32"
        n = len(test)
        for name, tb, ts in timings:
            rows.append([name, f"{1000 * tb / n:.1f}", f"{1000 * ts / n:.1f}"])
        maps = np.asarray(maps)
        rel = float(np.max(np.abs(out["score"] - scores) / np.abs(scores)))
        map_err = max(float(np.abs(out["anomaly_map"][i] - maps[i]).max() / np.ptp(maps[i]))
                      for i in range(n))
        same = bool((out["label"] == pipe.predict(test)).all())

    print(machine_line("cpu"))
    print(f"{args.backbone} at {args.image_size} px, bank {len(pipe[-1].memory_bank_)} rows "
          f"x {pipe[-1].memory_bank_.shape[1]}, {n} test images of {args.size} x {args.size} "
          f"({'MTD' if args.mtd else 'synthetic'}), {args.threads} threads; export "
          f"{export_s:.1f} s, file {size_mib:.1f} MiB")
    print_markdown_table(["scorer", "ms / image, batches of 8", "ms / image, one at a time"],
                         rows)
    print(f"parity: max relative score difference {rel:.2g}, max map difference "
          f"{map_err:.2g} of the map's range, labels identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
