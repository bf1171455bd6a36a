"""Peak memory and time of ``skpatchcore predict`` on one very large image.

Writes a smooth synthetic texture with a drawn defect (a dark scratch) as an RGB PNG of each
``--sizes`` (default 640, the baseline of a normal image, 6000 and 12000 pixels square; at
most a few hundred KB on disk), fits a small model on six 640 x 640 images of the same
texture, then runs ``skpatchcore predict`` on each image alone in a fresh subprocess, with
overlays, masks and report (the default) and with ``--no-images``, and reports the child's
peak resident memory (its own ``ru_maxrss``, from ``os.wait4``: imports, network and
everything included) and wall time. 12000 x 12000 is 144 million pixels, above Pillow's
default limit, so predict gets ``--max-image-pixels none``.

Example::

    python benchmarks/bench_predict_memory.py --sizes 640 6000 12000

The images and the model are cached in ``--work`` (default: a folder in the temporary
directory) and reused by later runs. Every run uses 2 torch threads (``OMP_NUM_THREADS=2``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# period of the texture, in units of the image side: the same content at every size
_PERIODS = (0.11, 0.07)


def _texture_rows(y0, y1, side, phase=0.0):
    """Rows [y0, y1) of a smooth RGB texture on a ``side`` x ``side`` image (uint8).

    Slow waves across and down, in steps of 3 grey levels: every row repeats the one above
    except where the vertical wave steps, so the PNG stays small (its 'Up' filter)."""
    u = (np.arange(side, dtype=np.float32) + 0.5) / side
    v = (np.arange(y0, y1, dtype=np.float32) + 0.5) / side
    a = 3 * np.round(10 * np.sin(2 * np.pi * (u / _PERIODS[0] + phase)))
    b = 3 * np.round(8 * np.cos(2 * np.pi * (v / _PERIODS[1] - phase)))
    base = 120 + a[None, :] + b[:, None]  # (rows, side)
    out = np.empty((y1 - y0, side, 3), np.uint8)
    for ch, gain in enumerate((1.0, 0.9, 0.75)):
        out[..., ch] = np.clip(base * gain, 0, 255).round()
    return out


def _draw_scratch(img, y0, side):
    """A dark diagonal scratch about 1% of the side wide, in rows [y0, y0 + len(img))."""
    rows = np.arange(y0, y0 + len(img))[:, None]
    cols = np.arange(side)[None, :]
    width = max(2, side // 100)
    on = (np.abs((cols - 0.3 * side) - 0.6 * (rows - 0.35 * side)) < width) & (
        rows > 0.35 * side) & (rows < 0.6 * side)
    img[on] = (40, 30, 25)


def write_texture(path, side, *, phase=0.0, defect=False):
    """Write a ``side`` x ``side`` RGB PNG of the texture (and the scratch)."""
    from PIL import Image

    img = np.empty((side, side, 3), np.uint8)
    step = max(1, 2_000_000 // side)
    for y0 in range(0, side, step):
        y1 = min(side, y0 + step)
        img[y0:y1] = _texture_rows(y0, y1, side, phase)
        if defect:
            _draw_scratch(img[y0:y1], y0, side)
    Image.fromarray(img).save(path, compress_level=9)
    return path


def _run(cmd, env):
    """Run ``cmd``; return (exit code, peak RSS of the child in MB, wall seconds, stderr)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    return proc.returncode, usage.ru_maxrss / 1024, seconds, err.decode(errors="replace")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[640, 6000, 12000],
                        help="sides of the square test images (640: the baseline)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "bench_predict_mem"))
    parser.add_argument("--modes", nargs="+", default=["images", "no-images"],
                        choices=["images", "no-images"])
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    work = Path(args.work)
    (work / "train").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    cli = [sys.executable, "-m", "skpatchcore.cli"]

    for k in range(6):
        p = work / "train" / f"good{k}.png"
        if not p.exists():
            write_texture(p, 640, phase=0.013 * k)
    model = work / "model.npz"
    if not model.exists():
        code, rss, sec, err = _run(cli + ["fit", str(work / "train"), "-o", str(model),
                                          "--quiet"], env)
        if code:
            sys.exit(f"fit failed ({code}):\n{err}")
        print(f"fitted the model on 6 images of 640 x 640 in {sec:.1f} s ({rss:.0f} MB)")

    results = []
    print("| image | PNG on disk | mode | peak RSS MB | wall s | exit |")
    print("|---|---|---|---|---|---|")
    for side in args.sizes:
        image = work / f"texture_{side}.png"
        if not image.exists():
            write_texture(image, side, defect=True)
        kb = image.stat().st_size / 1024
        for mode in args.modes:
            out = work / f"out_{side}_{mode}"
            cmd = cli + ["predict", str(model), str(image), "--out", str(out), "--overwrite",
                         "--quiet", "--max-image-pixels", "none"]
            if mode == "no-images":
                cmd.append("--no-images")
            code, rss, sec, err = _run(cmd, env)
            row = {"side": side, "png_kb": round(kb), "mode": mode, "peak_rss_mb": round(rss),
                   "wall_s": round(sec, 1), "exit": code}
            if code == 0:
                import csv

                with open(out / "scores.csv") as fh:
                    r = next(csv.DictReader(fh))
                row["score"], row["label"] = float(r["score"]), int(r["label"])
            else:
                row["error"] = err.strip().splitlines()[-1:] if err.strip() else []
            results.append(row)
            print(f"| {side} x {side} | {kb:.0f} KB | {mode} | {rss:.0f} | {sec:.1f} | "
                  f"{code} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
