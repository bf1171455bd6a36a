"""Exact search time against the size of its distance blocks (``neighbors._BLOCK_ELEMENTS``).

A (queries x bank) block is computed by one matrix product and read by the top-k; a block
small enough to stay in cache between the two is faster. Random float32 rows; results are
checked to be identical for every block size.

Example::

    python benchmarks/bench_blocks.py --threads 2
"""

import argparse
import os
import sys
import time

import numpy as np
import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=6272, help="bank rows (default: the 1%% "
                        "coreset of 392 images at 320 px)")
    parser.add_argument("--dim", type=int, default=168)
    parser.add_argument("--queries", type=int, default=6400, help="4 images of 1,600 cells")
    parser.add_argument("--mib", type=int, nargs="+", default=[128, 64, 16, 8, 4, 2])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from skpatchcore import neighbors

    rng = np.random.RandomState(0)
    bank = rng.randn(args.bank, args.dim).astype(np.float32)
    queries = rng.randn(args.queries, args.dim).astype(np.float32)
    print(f"python {' '.join(sys.argv)}")
    print(f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}\n")
    print("| block MiB | ms per 1,600 queries | same results |\n|---|---|---|")
    first = None
    for mib in args.mib:
        neighbors._BLOCK_ELEMENTS = mib * 2**20 // 4
        index = neighbors.ExactIndex(bank)
        index.query(queries[:500])
        times, result = [], None
        for _ in range(3):
            start = time.perf_counter()
            result = index.query(queries)
            times.append(time.perf_counter() - start)
        first = first or result
        same = all(np.array_equal(a, b) for a, b in zip(first, result, strict=True))
        print(f"| {mib} | {1000 * min(times) * 1600 / args.queries:.1f} | {same} |")


if __name__ == "__main__":
    main()
