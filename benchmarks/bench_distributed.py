"""Scoring images on a Dask cluster: images/s with 1 and 2 single-threaded workers.

Writes ``--n-images`` PNG files of ``--size`` x ``--size`` (synthetic textures, or MTD
photos with ``--mtd``, cycled), fits the default pipeline on ``--n-train`` of them on this
machine, then scores all of them with :func:`skpatchcore.distributed.score_images` on a
:class:`distributed.LocalCluster` of 1, then 2, worker processes with one thread each
(``OMP_NUM_THREADS=1`` in the workers, so torch uses one core per worker). Each cluster is
warmed up first (every worker loads the model and builds its network once), so the timing
is the steady state of a long job. Prints images/s, the scaling ratio, and the bytes sent
per image, measured by serialising (pickle, what dask sends) the model once per worker, each
task's arguments (paths and offset) and each task's result (the records). It also checks
that the first ``--check`` scores equal ``pipe.score_samples`` on this machine, bit for bit.

Example::

    cd benchmarks && python bench_distributed.py --n-images 1000
"""

import argparse
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_coreset import cpu_name, print_markdown_table


def write_images(folder, n, size, mtd):
    """n PNG files: ``n_distinct`` synthetic textures (or MTD photos) cycled, each cycle
    flipped so that no two files are identical."""
    from PIL import Image

    from skpatchcore.datasets import make_defect_images

    if mtd:
        sources = sorted(p for p in (Path(mtd) / "train" / "good").iterdir())[:200]
        base = [Image.open(p).convert("RGB").resize((size, size)) for p in sources]
    else:
        X, _, _ = make_defect_images(100, 0, image_size=size, random_state=0)
        base = [Image.fromarray(x) for x in X]
    ops = [None, Image.FLIP_LEFT_RIGHT, Image.FLIP_TOP_BOTTOM, Image.ROTATE_180]
    paths = []
    for i in range(n):
        img = base[i % len(base)]
        op = ops[(i // len(base)) % len(ops)]
        img = img if op is None else img.transpose(op)
        paths.append(os.path.join(folder, f"{i:06d}.png"))
        img.save(paths[-1])
    return paths


def bytes_per_image(model, paths, records, size, n_workers):
    """Bytes that travel, by pickling what dask sends: the model once per worker, and per
    task its paths and offset and its records."""
    model_bytes = len(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))
    tasks = 0
    for start in range(0, len(paths), size):
        tasks += len(pickle.dumps((paths[start:start + size], [start]),
                                  protocol=pickle.HIGHEST_PROTOCOL))
        tasks += len(pickle.dumps(records[start:start + size],
                                  protocol=pickle.HIGHEST_PROTOCOL))
    return model_bytes, tasks / len(paths), (model_bytes * n_workers + tasks) / len(paths)


def run(model, paths, n_workers):
    from skpatchcore import distributed as skd
    from skpatchcore.pipeline import score_chunk_size

    size = score_chunk_size(model[0])
    with skd.connect(n_workers=n_workers, threads_per_worker=1) as client:
        client.wait_for_workers(n_workers)
        threads = set(client.run(torch.get_num_threads).values())
        skd.score_images(model, paths[: 2 * n_workers * size], client=client).compute()
        start = time.perf_counter()
        records = skd.score_images(model, paths, client=client).compute()
        seconds = time.perf_counter() - start
    return records, seconds, threads, size


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=1000)
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--mtd", help="MVTec-layout folder with real photos (else synthetic)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--check", type=int, default=80,
                        help="images whose scores are compared with this machine's")
    args = parser.parse_args(argv)

    from skpatchcore import make_patchcore

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = write_images(tmp, args.n_images, args.size, args.mtd)
        print(f"wrote {len(paths)} images in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        model = make_patchcore(sampling_ratio=0.1, random_state=0).fit(paths[: args.n_train])
        expected = model.score_samples(paths[: args.check])
        rows, rates = [], {}
        for n_workers in (int(w) for w in args.workers.split(",")):
            records, seconds, threads, size = run(model, paths, n_workers)
            scores = np.array([r["score"] for r in records])
            assert [r["index"] for r in records] == list(range(len(paths)))
            same = bool(np.array_equal(scores[: args.check], expected))
            model_bytes, task_bytes, total = bytes_per_image(model, paths, records, size,
                                                             n_workers)
            rates[n_workers] = len(paths) / seconds
            rows.append([str(n_workers), f"{sorted(threads)}", str(len(paths)), str(size),
                         f"{seconds:.1f}",
                         f"{rates[n_workers]:.2f}",
                         f"{rates[n_workers] / rates[min(rates)]:.2f}",
                         f"{task_bytes:.0f}", f"{model_bytes / 1e6:.1f} MB",
                         f"{total:.0f}", "yes" if same else "NO"])
            print(rows[-1], file=sys.stderr)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"{args.n_images} PNG images of {args.size} x {args.size}"
          + (f" from {args.mtd}" if args.mtd else " (synthetic)"))
    print_markdown_table(
        ["workers", "torch threads", "images", "images/task", "seconds", "images/s",
         "scaling", "task bytes/image", "model (once per worker)", "bytes/image (all)",
         f"first {args.check} scores = local"], rows)


if __name__ == "__main__":
    main()
