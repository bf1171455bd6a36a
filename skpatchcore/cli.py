"""The ``skpatchcore`` command: fit, predict, evaluate and a built-in demo.

Exit codes: 0 success; 2 bad input (missing path, empty folder, unreadable image or model,
bad option), with one ``error: ...`` line on stderr and no traceback; 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]


def _collect_images(inputs):
    """Files and folders on the command line -> sorted list of image paths."""
    from ._images import IMAGE_EXTENSIONS, list_images

    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            train_good = p / "train" / "good"
            has_images = any(f.suffix.lower() in IMAGE_EXTENSIONS for f in p.iterdir())
            if train_good.is_dir() and not has_images:
                p = train_good  # an MVTec-layout root: its good training images
            paths.extend(list_images(p))
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    if not paths:
        raise ValueError("no input images were given")
    return paths


def _cmd_fit(args):
    from ._options import model_params
    from .persistence import save_model
    from .pipeline import make_anomaly_pipeline

    train = _collect_images(args.train_dir)
    pipe = make_anomaly_pipeline(
        args.method, **model_params(args), contamination=_contamination(args.contamination),
        verbose=not args.quiet,
    )
    start = time.perf_counter()
    pipe.fit(train)
    seconds = time.perf_counter() - start
    if args.calibrate:
        normal = _collect_images(args.calibrate)
        pipe.calibrate(normal, fpr=args.fpr)
        _say(args, f"threshold calibrated on {len(normal)} normal images for FPR {args.fpr}")
    path = save_model(pipe, args.output)
    _say(args, f"fitted {args.method} on {len(train)} images in {seconds:.1f} s; "
               f"model written to {path}")
    return 0


def _contamination(value):
    return value if value == "auto" else float(value)


def _cmd_predict(args):
    from ._visualize import save_overlays
    from .persistence import load_model
    from .pipeline import PatchCorePipeline

    model = load_model(args.model)
    if not isinstance(model, PatchCorePipeline):
        raise ValueError(f"{args.model} holds a {type(model).__name__}, not a pipeline made by "
                         "'skpatchcore fit'")
    for _, step in model.steps:
        if hasattr(step, "verbose"):
            step.verbose = not args.quiet
    paths = _collect_images(args.inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    detector = model[-1]
    scores, maps = model.score_and_map(paths, sigma=4.0)
    decision = scores - detector.offset_
    labels = np.where(decision < 0, -1, 1)
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "decision", "label"])
        for p, s, d, lab in zip(paths, scores, decision, labels, strict=True):
            writer.writerow([str(p), f"{s:.6f}", f"{d:.6f}", int(lab)])
    threshold = -detector.offset_ if args.threshold is None else args.threshold
    if not args.no_images:
        save_overlays(paths, maps, out / "overlays", scores=-scores, threshold=threshold)
        mask_dir = out / "masks"
        mask_dir.mkdir(exist_ok=True)
        from PIL import Image

        for i, (p, amap) in enumerate(zip(paths, maps, strict=True)):
            Image.fromarray(((amap > threshold) * 255).astype(np.uint8)).save(
                mask_dir / f"{i:04d}_{p.stem}_mask.png")
    n_bad = int((labels == -1).sum())
    _say(args, f"scored {len(paths)} images: {n_bad} flagged defective (label -1). "
               f"Wrote {out / 'scores.csv'}" + ("" if args.no_images else
                                                f", {out / 'overlays'}, {out / 'masks'}"))
    return 0


def _cmd_evaluate(args):
    from .evaluate import main as evaluate_main

    return evaluate_main(args.rest)


def _cmd_demo(args):
    from ._demo import run_demo

    run_demo(Path(args.out), verbose=not args.quiet)
    return 0


def _say(args, message):
    if not args.quiet:
        print(message)


def _parser():
    parser = argparse.ArgumentParser(
        prog="skpatchcore",
        description="PatchCore anomaly detection: fit on good images, score new ones.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit a model on a folder of good images")
    fit.add_argument("train_dir", nargs="+", help="folders or files of good images")
    fit.add_argument("-o", "--output", required=True, help="model file to write (.npz)")
    from ._options import add_model_arguments

    add_model_arguments(fit)
    fit.add_argument("--contamination", default="auto")
    fit.add_argument("--calibrate", nargs="+", metavar="DIR",
                     help="held-out good images: set the threshold for --fpr")
    fit.add_argument("--fpr", type=float, default=0.01,
                     help="target false-positive rate for --calibrate (default 0.01)")
    fit.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    fit.set_defaults(func=_cmd_fit)

    pred = sub.add_parser("predict", help="score images with a fitted model")
    pred.add_argument("model", help="model file written by 'skpatchcore fit'")
    pred.add_argument("inputs", nargs="+", help="image files or folders")
    pred.add_argument("--out", required=True, help="output folder")
    pred.add_argument("--threshold", type=float,
                      help="pixel threshold for masks (default: the model's image threshold)")
    pred.add_argument("--no-images", action="store_true", help="write scores.csv only")
    pred.add_argument("--quiet", action="store_true")
    pred.set_defaults(func=_cmd_predict)

    ev = sub.add_parser("evaluate", help="fit on ROOT/train/good and evaluate ROOT/test",
                        add_help=False)
    ev.add_argument("rest", nargs=argparse.REMAINDER)
    ev.set_defaults(func=_cmd_evaluate)

    demo = sub.add_parser("demo", help="the whole job on a built-in synthetic example")
    demo.add_argument("--out", default="demo_output", help="output folder")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
