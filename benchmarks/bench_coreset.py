"""Benchmark the greedy k-center coreset kernel against the plain reference.

Generates synthetic patch features (or loads real ones), applies a seeded Gaussian random
projection to ``--proj-dim`` dimensions, then times ``greedy_kcenter`` and
``greedy_kcenter_reference`` on the same projected points, checks that they select the same
indices, and prints one markdown table. Each timed run happens in a fresh subprocess, so
its peak resident memory (``ru_maxrss``, a process-wide high-water mark) is its own.

Data (``--data``):

- ``clustered`` (default): a mixture of ``--clusters`` anisotropic Gaussian clusters with
  heavy-tailed sizes and log-normal spreads, cluster centres in 32 groups, each cluster
  varying mostly along a few (2-16) directions, on a decaying spectrum, as CNN patch
  features do (few dominant directions, many small clusters, a long tail).
- ``uniform``: independent uniform features, no cluster structure (the worst case for
  triangle-inequality pruning).
- ``--features FILE.npy``: real features of shape (n, d), projected if d > proj-dim.

The reference costs one full pass over the data per selected center. Above
``--skip-reference-above`` it runs only ``--reference-iters`` iterations and its time is
extrapolated linearly (every iteration does the same work), marked "(est.)"; the indices
are then compared on that prefix (the greedy selection of k centers is the prefix of any
longer one).

Example::

    python benchmarks/bench_coreset.py --n 300000 --dim 1024 --ratios 0.01 0.1
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_features(n, dim, n_clusters, seed):
    """Synthetic CNN-like patch features, float32 of shape (n, dim); see the module doc."""
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, dim + 1, dtype=torch.float32).pow(-0.5)  # decaying scales
    groups = 3.0 * torch.randn(32, dim, generator=gen) * spectrum
    centres = groups[torch.randint(0, 32, (n_clusters,), generator=gen)]
    centres += 1.5 * torch.randn(n_clusters, dim, generator=gen) * spectrum
    weights = torch.from_numpy(np.random.default_rng(seed).dirichlet(np.full(n_clusters, 0.5)))
    labels = torch.multinomial(weights, n, replacement=True, generator=gen)
    sizes = torch.bincount(labels, minlength=n_clusters).tolist()
    spread = torch.exp(torch.randn(n_clusters, generator=gen) * 0.5 - 1.0)
    rank = torch.randint(2, 17, (n_clusters,), generator=gen).tolist()
    out = torch.empty(n, dim)
    row = 0
    for k, size in enumerate(sizes):
        if size == 0:
            continue
        basis = torch.randn(rank[k], dim, generator=gen) * spectrum
        coef = torch.randn(size, rank[k], generator=gen)
        block = centres[k] + spread[k] * (coef @ basis) * (3.0 / rank[k] ** 0.5)
        block += 0.15 * spread[k] * torch.randn(size, dim, generator=gen)
        out[row : row + size] = block
        row += size
    return out[torch.randperm(n, generator=gen)]


def random_projection(F, proj_dim, seed, chunk=65536):
    """Seeded Gaussian random projection (entries N(0, 1/proj_dim)), float32."""
    gen = torch.Generator().manual_seed(seed + 1)
    P = torch.randn(F.shape[1], proj_dim, generator=gen) / proj_dim**0.5
    F = torch.as_tensor(F, dtype=torch.float32)
    return torch.cat([F[i : i + chunk] @ P for i in range(0, F.shape[0], chunk)])


def load_points(args):
    if args.features:
        F = torch.from_numpy(np.load(args.features).astype(np.float32, copy=False))
        if args.n and args.n < F.shape[0]:
            F = F[: args.n]
        description = f"features from {args.features}"
    elif args.data == "uniform":
        F = torch.rand(args.n, args.dim, generator=torch.Generator().manual_seed(args.seed))
        description = "uniform (no cluster structure: worst case for triangle pruning)"
    else:
        F = make_features(args.n, args.dim, args.clusters, args.seed)
        description = f"clustered ({args.clusters} anisotropic Gaussian clusters)"
    if F.shape[1] > args.proj_dim:
        X = random_projection(F, args.proj_dim, args.seed)
        description += f", {F.shape[1]} -> {args.proj_dim} Gaussian random projection"
    else:
        X = F.contiguous()
    return X.numpy(), F.shape[1], description


def memory_mb(field):
    """VmRSS (current) or VmHWM (peak) of this process in MB; ru_maxrss if /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_memory():
    """Reset this process's VmHWM (Linux), so the peak seen is the timed call's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def worker(spec):
    """Run one timed selection in this (fresh) process and write its results."""
    import gc

    from skpatchcore._kcenter import greedy_kcenter, greedy_kcenter_reference

    X = torch.from_numpy(np.load(spec["data"])).to(spec["device"])
    gc.collect()
    reset_peak_memory()
    baseline = memory_mb("VmRSS")
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    if spec["method"] == "ours":
        indices, radius = greedy_kcenter(X, spec["n_centers"], start_index=0)
    else:
        indices, radius = greedy_kcenter_reference(X, spec["n_centers"], start_index=0)
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    np.save(spec["indices"], np.asarray(indices))
    result = {
        "seconds": seconds,
        "radius": radius,
        "peak_mb": memory_mb("VmHWM"),
        "baseline_mb": baseline,
    }
    Path(spec["result"]).write_text(json.dumps(result))


def run_worker(spec):
    subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True)
    result = json.loads(Path(spec["result"]).read_text())
    result["indices"] = np.load(spec["indices"])
    return result


def cpu_name():
    """The CPU model from /proc/cpuinfo, else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def print_markdown_table(header, rows):
    """Print a Markdown table of string cells, framed by blank lines."""
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def machine_line(device):
    cpu = cpu_name()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return (f"Machine: {os.cpu_count()} cores ({cpu}), torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, device {device}{gpu}; load average {load}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300_000, help="number of patches")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension")
    parser.add_argument("--proj-dim", type=int, default=128, help="projected dimension")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed runs of ours (best is reported); the reference runs once")
    parser.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--features", help="a .npy file of real features, instead of --data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--skip-reference-above", type=float, default=0.02, metavar="RATIO",
                        help="above this ratio, extrapolate the reference from a prefix")
    parser.add_argument("--reference-iters", type=int, default=2000,
                        help="iterations timed when the reference is extrapolated")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return

    print(machine_line(args.device))
    start = time.perf_counter()
    torch.set_num_threads(1)  # data generation only; the timed runs are other processes
    X, source_dim, description = load_points(args)
    n, d = X.shape
    print(f"Data: {description}; N = {n}, d = {d}, float32 "
          f"(generated in {time.perf_counter() - start:.1f} s)")
    rows = []
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        data_path = str(Path(tmp) / "X.npy")
        np.save(data_path, X)
        del X
        for ratio in args.ratios:
            n_centers = max(1, int(round(ratio * n)))

            def spec(method, k, tag, tmp=tmp, n_centers=n_centers):
                return {"data": data_path, "device": args.device, "method": method,
                        "n_centers": k, "indices": f"{tmp}/{tag}-{n_centers}.npy",
                        "result": f"{tmp}/{tag}-{n_centers}.json"}

            ours = [run_worker(spec("ours", n_centers, f"ours{i}"))
                    for i in range(max(1, args.repeat))]
            best = min(ours, key=lambda r: r["seconds"])
            baseline = best["baseline_mb"]
            ref_cell, speedup, same, ref_mem = "skipped", "-", "-", "-"
            if not args.skip_reference:
                partial = ratio > args.skip_reference_above and args.reference_iters < n_centers
                k = args.reference_iters if partial else n_centers
                ref = run_worker(spec("reference", k, "ref"))
                ref_seconds = ref["seconds"] * n_centers / k
                ref_cell = f"{ref_seconds:.1f}" + (f" (est. from {k} iters)" if partial else "")
                speedup = f"{ref_seconds / best['seconds']:.1f}"
                same = np.array_equal(ref["indices"], best["indices"][:k])
                same = ("yes" if same else "NO") + (f" (first {k})" if partial else "")
                ref_mem = f"{ref['peak_mb']:.0f} (+{ref['peak_mb'] - ref['baseline_mb']:.0f})"
            times = ", ".join(f"{r['seconds']:.2f}" for r in ours)
            rows.append([f"{n}", f"{d}", f"{ratio:g}", f"{n_centers}", ref_cell,
                         f"{best['seconds']:.2f}" + (f" (runs: {times})" if len(ours) > 1 else ""),
                         speedup, f"{best['peak_mb']:.0f} (+{best['peak_mb'] - baseline:.0f})",
                         ref_mem, same])
    header = ["N", "d", "ratio", "centers", "reference s", "ours s", "speed-up ×",
              "peak RSS MB (ours)", "peak RSS MB (reference)", "identical"]
    print_markdown_table(header, rows)
    print(f"Peak RSS of the process during the call (in brackets: above its RSS just before "
          f"the call, {baseline:.0f} MB with Python, torch and the points, which alone take "
          f"{n * d * 4 / 2**20:.0f} MB). Each run in its own process. Features of dimension "
          f"{source_dim}.")


if __name__ == "__main__":
    main()
