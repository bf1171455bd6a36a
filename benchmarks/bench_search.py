"""Benchmark nearest-neighbour search over a memory bank: exact and approximate.

Compares, on the same data in the same run:

- scikit-learn ``NearestNeighbors(algorithm="brute")``, the reference;
- :class:`skpatchcore.neighbors.ExactIndex` (``knn_backend='exact'``);
- :class:`skpatchcore.neighbors.NNDescentIndex` (``knn_backend='pynndescent'``);
- with ``--pynndescent-defaults``, also a bare ``pynndescent.NNDescent`` with its own
  defaults (``epsilon=0.1``, one search-tree leaf, k candidates), re-measured the same way.

Data: synthetic clustered float32 patch features (``make_features`` of
``bench_coreset.py``: ``--clusters`` anisotropic Gaussian clusters with heavy-tailed sizes
on a decaying spectrum). The bank and the normal queries are disjoint draws of the same
mixture; a fraction ``--anomalous`` of the queries comes from a different mixture (new
cluster centres), standing in for defect patches. The defaults, a 10 000-row bank of 152-d
features (a 1% coreset of ~1M patches, EfficientNet-Lite0 blocks.2 + blocks.4) and 16 000
queries (10 images of 40 x 40 patches), are PatchCore's usual case; ``--bank 200000
--queries 3200`` is a large bank.

With ``--mtd PATH`` (an MVTec-layout folder such as ``../shared/datasets/mtd``) the data are
real instead: the bank is every patch of ``--mtd-train`` seeded-random training images (the
full, SPADE-style bank; EfficientNet-Lite0, 320 px letterbox, 40 x 40 x 152 grids) and the
queries are ``--queries`` random patches of ``--mtd-test`` test images, half of them
defect-free ("normal" column) and half defective ("anomalous" column: every patch of a
defective image, most of which show intact surface).

Ground truth is a float64 brute force. Columns: build seconds (for NNDescentIndex without
the one-off numba compilation, which is reported above the table); query time per 1000
queries and per image of 1600 patches (best of ``--repeat``); recall@1 on normal and on
anomalous queries (a returned row counts when its float64 distance equals the true nearest
distance, so exact ties count), with the mean and the largest excess of the returned nearest
distance over the true one (relative: 0.5 means 50% too large); and the largest absolute
error of the returned nearest distance against the float64 distance to the returned row.
Only the first neighbour is scored when ``--k`` is above 1.

Example::

    python benchmarks/bench_search.py
    python benchmarks/bench_search.py --bank 200000 --queries 3200
"""

import argparse
import os
import shlex
import sys
import time

import numpy as np
import torch
from bench_coreset import cpu_name, make_features, print_markdown_table

PATCHES_PER_IMAGE = 1600


def machine_line():
    cpu = cpu_name()
    import numba
    import pynndescent
    import sklearn

    return (f"Machine: {os.cpu_count()} cores ({cpu}); torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads; numba {numba.__version__} with "
            f"{numba.get_num_threads()} threads; pynndescent {pynndescent.__version__}; "
            f"scikit-learn {sklearn.__version__}")


def load_line():
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def make_mtd_data(args):
    """Full bank of real training patches and random test patches (see the module doc)."""
    from skpatchcore import FeatureExtractor
    from skpatchcore.datasets import load_mvtec

    data = load_mvtec(args.mtd, allow_missing_masks=True)
    rng = np.random.RandomState(args.seed)
    train = [data.train[i] for i in rng.choice(len(data.train), args.mtd_train, replace=False)]
    good = rng.choice(np.flatnonzero(data.y_test == 1), args.mtd_test // 2, replace=False)
    bad = rng.choice(np.flatnonzero(data.y_test == -1), args.mtd_test - good.size,
                     replace=False)
    test = [data.test[i] for i in np.concatenate([good, bad])]
    extractor = FeatureExtractor("efficientnet_lite0", image_size=320, patch_size=3,
                                 device="cpu").fit()

    def features(paths):
        grids = np.concatenate([extractor.transform(paths[i : i + 16])
                                for i in range(0, len(paths), 16)])
        return grids.reshape(grids.shape[0], -1, grids.shape[-1])

    bank = features(train).reshape(-1, extractor.feature_dim_)
    patches = features(test)
    labels = np.repeat(np.arange(len(test)) >= good.size, patches.shape[1])
    patches = patches.reshape(-1, extractor.feature_dim_)
    pick = np.sort(rng.choice(patches.shape[0], min(args.queries, patches.shape[0]),
                              replace=False))
    description = (f"MTD {args.mtd}: bank = all patches of {len(train)} training images, "
                   f"queries = random patches of {good.size} good + {len(test) - good.size} "
                   f"defective test images")
    return (np.ascontiguousarray(bank), np.ascontiguousarray(patches[pick]), labels[pick],
            description)


def make_data(args):
    n_normal = args.queries - int(round(args.anomalous * args.queries))
    data = make_features(args.bank + n_normal, args.dim, args.clusters, args.seed).numpy()
    bank, queries = data[: args.bank], data[args.bank :]
    if n_normal < args.queries:
        other = make_features(args.queries - n_normal, args.dim, args.clusters, args.seed + 1)
        queries = np.concatenate([queries, other.numpy()])
    is_anomalous = np.arange(args.queries) >= n_normal
    description = (f"synthetic, {args.clusters} clusters, {int(is_anomalous.sum())} "
                   f"queries from another mixture")
    return (np.ascontiguousarray(bank), np.ascontiguousarray(queries), is_anomalous,
            description)


def float64_nearest(bank, queries, chunk_elements=1 << 24):
    """True nearest row and distance of every query, in float64 (brute force)."""
    B = torch.from_numpy(bank).double()
    B_sq = (B**2).sum(1)
    rows = max(1, chunk_elements // bank.shape[0])
    idx = np.empty(queries.shape[0], dtype=np.int64)
    for start in range(0, queries.shape[0], rows):
        q = torch.from_numpy(queries[start : start + rows]).double()
        d2 = torch.addmm(B_sq[None, :], q, B.T, alpha=-2.0)
        idx[start : start + rows] = d2.argmin(1).numpy()
    return idx, exact_distances(bank, queries, idx)


def exact_distances(bank, queries, idx):
    """float64 ||q_i - bank[idx_i]||."""
    diff = bank[idx].astype(np.float64) - queries.astype(np.float64)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def timed(fn, repeat):
    """(best seconds, last result) over ``repeat`` calls."""
    best, result = np.inf, None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=int, default=10_000, help="memory-bank rows")
    parser.add_argument("--dim", type=int, default=152, help="feature dimension")
    parser.add_argument("--queries", type=int, default=16_000, help="query rows (patches)")
    parser.add_argument("--anomalous", type=float, default=0.05,
                        help="fraction of queries from another mixture (default 0.05)")
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--k", type=int, default=1, help="neighbours per query")
    parser.add_argument("--repeat", type=int, default=3, help="timed query runs (best kept)")
    parser.add_argument("--pynndescent-defaults", action="store_true",
                        help="add a row for a bare pynndescent.NNDescent with its defaults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mtd", metavar="PATH",
                        help="use real features of this MVTec-layout data set (see above)")
    parser.add_argument("--mtd-train", type=int, default=80,
                        help="training images whose patches form the bank (default 80)")
    parser.add_argument("--mtd-test", type=int, default=40,
                        help="test images the queries come from (default 40)")
    args = parser.parse_args(argv)

    from sklearn.neighbors import NearestNeighbors

    from skpatchcore.neighbors import ExactIndex, NNDescentIndex

    print("Command: python benchmarks/bench_search.py " + shlex.join(sys.argv[1:]))
    print(machine_line())
    print(f"Start: {load_line()}")
    start = time.perf_counter()
    bank, queries, is_anomalous, description = (make_mtd_data if args.mtd else make_data)(args)
    print(f"Data: {description}; bank {bank.shape[0]} x {bank.shape[1]}, "
          f"{queries.shape[0]} queries ({int(is_anomalous.sum())} anomalous), float32, "
          f"k = {args.k} (prepared in {time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    true_idx, true_dist = float64_nearest(bank, queries)
    print(f"float64 brute-force ground truth: {time.perf_counter() - start:.1f} s")

    # One-off numba compilation of pynndescent (first graph built in the process).
    start = time.perf_counter()
    warm = NNDescentIndex(bank[:2000], random_state=args.seed)
    warm.query(queries[:100], args.k)
    jit_seconds = time.perf_counter() - start
    print(f"First NNDescentIndex in the process (numba compilation, 2000-row graph): "
          f"{jit_seconds:.1f} s")
    del warm


    def sklearn_brute():
        nn = NearestNeighbors(n_neighbors=args.k, algorithm="brute").fit(bank)
        return lambda: nn.kneighbors(queries), nn

    def exact():
        index = ExactIndex(bank)
        return lambda: index.query(queries, args.k), index

    def nndescent():
        index = NNDescentIndex(bank, random_state=args.seed)
        return lambda: index.query(queries, args.k), index

    def bare_pynndescent():
        import pynndescent

        graph = pynndescent.NNDescent(bank, metric="euclidean", random_state=args.seed,
                                      parallel_batch_queries=True)
        graph.prepare()

        def query():
            idx, _ = graph.query(queries, k=args.k)
            d = exact_distances(bank, np.repeat(queries, args.k, 0), idx.reshape(-1))
            d = d.reshape(idx.shape)
            order = np.argsort(d, axis=1)
            return np.take_along_axis(d, order, 1), np.take_along_axis(idx, order, 1)

        return query, graph

    methods = [
        ("sklearn NearestNeighbors(algorithm='brute') (reference)", sklearn_brute),
        ("ExactIndex (knn_backend='exact')", exact),
        ("NNDescentIndex (knn_backend='pynndescent')", nndescent),
    ]
    if args.pynndescent_defaults:
        methods.append(("bare pynndescent.NNDescent, its defaults", bare_pynndescent))

    rows = []
    normal = ~is_anomalous
    for name, build in methods:
        build_seconds, (query, _) = timed(build, 1)
        seconds, (dist, idx) = timed(query, args.repeat)
        dist, idx = np.asarray(dist, dtype=np.float64), np.asarray(idx, dtype=np.int64)
        returned = exact_distances(bank, queries, idx[:, 0])
        hit = (idx[:, 0] == true_idx) | (returned <= true_dist)
        excess = (returned - true_dist) / np.maximum(true_dist, 1e-12)
        dist_error = np.abs(dist[:, 0] - returned).max()
        per_1000 = 1000 * seconds / queries.shape[0] * 1000
        cells = []
        for part in (normal, is_anomalous):
            if not part.any():
                cells.append("-")
                continue
            cells.append(f"{hit[part].mean():.4f} / {excess[part].mean():.2g} / "
                         f"{excess[part].max():.2g}")
        rows.append([
            name, f"{build_seconds:.2f}", f"{per_1000:.1f}",
            f"{per_1000 * PATCHES_PER_IMAGE / 1000:.0f}", *cells, f"{dist_error:.1e}",
        ])
        print(f"  done: {name} ({load_line()})", flush=True)

    header = ["method", "build s", "query ms / 1000", "ms / image (1600)",
              "normal: recall@1 / mean / max excess", "anomalous: recall@1 / mean / max excess",
              "max abs distance error"]
    print_markdown_table(header, rows)
    print(f"End: {load_line()}")


if __name__ == "__main__":
    main()
