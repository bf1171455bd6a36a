"""Every method at its defaults on one MVTec-layout dataset, side by side.

    python benchmarks/methods_table.py [--root ../shared/datasets/mtd] [--out DIR]
        [--methods patchcore spade padim students mkd fyd] [--table]

Each method runs as its own ``python -m skpatchcore.evaluate ROOT --method M --json
DIR/M.json --quiet`` process, one after the other, so that its peak resident memory is its
own and no run shares the cores with another. A method whose JSON is already in ``--out``
is not run again (an interrupted table resumes). Prints a markdown table: image AUROC, pixel
AUROC, AUPRO@0.3, fit seconds, ms per test image, peak RSS, and the command of each row.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "datasets" / "mtd"
METHODS = ("patchcore", "spade", "padim", "students", "mkd", "fyd")


def _command(root, method, out):
    return [sys.executable, "-m", "skpatchcore.evaluate", str(root), "--method", method,
            "--json", str(out / f"{method}.json"), "--quiet"]


def _shown(cmd):
    return "python " + shlex.join(cmd[1:])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/methods_table.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--out", default="/tmp/methods_table", help="folder of the JSON files")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--table", action="store_true", help="only print the table")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for method in args.methods:
            if (out / f"{method}.json").exists():
                print(f"skip {method}: {out / f'{method}.json'} exists", flush=True)
                continue
            cmd = _command(args.root, method, out)
            print(f"run  {_shown(cmd)}", flush=True)
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=REPO)
            print(f"{method}: exit {done.returncode} after {time.perf_counter() - start:.0f} s",
                  flush=True)
    print("| method | image AUROC | pixel AUROC | AUPRO@0.3 | fit s | ms per image | "
          "peak RSS MB | command |")
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        path = out / f"{method}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        cmd = _shown(_command("../shared/datasets/" + Path(args.root).name, method,
                              Path("res")))
        print(f"| {method} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | "
              f"{r['aupro@0.3']:.3f} | {r['fit_seconds']:.0f} | {r['ms_per_image']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | `{cmd}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
