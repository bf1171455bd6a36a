"""Milliseconds per image of the feature network alone: fused CPU graphs against eager
PyTorch, float32 and bfloat16, for several batch sizes (what ``FeatureExtractor``'s ``jit``,
``precision`` and ``batch_size`` choose between).

Random 320 x 320 inputs (the network's cost does not depend on the pixels); each
configuration is warmed up (tracing and TorchScript's profiling call) and then timed as the
median of repeated calls.

Example::

    python benchmarks/bench_backbone.py --threads 2
"""

import argparse
import os
import sys
import time

import numpy as np
import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite2")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--images", type=int, default=32, help="images timed per call set")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from skpatchcore import FeatureExtractor

    x = torch.rand(max(args.batches), 3, args.size, args.size,
                   generator=torch.Generator().manual_seed(0))
    print(f"python {' '.join(sys.argv)}")
    print(f"{args.backbone} at {args.size} px, {args.threads} threads, torch "
          f"{torch.__version__}, load average {os.getloadavg()[0]:.1f}\n")
    print("| precision | jit | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
    print("|---|---|" + "---|" * len(args.batches))
    for precision in ("float32", "bfloat16"):
        for jit in (False, True):
            fe = FeatureExtractor(args.backbone, image_size=args.size, precision=precision,
                                  jit=jit).fit()
            fe._ensure_network()
            cells = []
            with torch.inference_mode():
                for b in args.batches:
                    batch = x[:b]
                    for _ in range(2):
                        fe._run_network(batch)
                    times = []
                    for _ in range(max(3, args.images // b)):
                        start = time.perf_counter()
                        fe._run_network(batch)
                        times.append(time.perf_counter() - start)
                    cells.append(f"{1000 * float(np.median(times)) / b:.1f}")
            print(f"| {precision} | {jit} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
