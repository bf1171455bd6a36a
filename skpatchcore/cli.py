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


def _border(text):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--border must be 'auto' or an integer, got "
                                         f"{text!r}") from None


def add_model_arguments(parser):
    """The model options shared by ``fit`` and ``evaluate``: the method, the feature
    extractor's options (defaults read from :class:`FeatureExtractor`), the coreset ratio,
    the random state and the device."""
    from .features import FeatureExtractor

    defaults = FeatureExtractor().get_params()
    parser.add_argument("--method", choices=["patchcore", "spade", "padim"], default="patchcore")
    parser.add_argument("--backbone", default=defaults["backbone"])
    parser.add_argument("--image-size", type=int, default=defaults["image_size"])
    parser.add_argument("--resize-mode", choices=["letterbox", "stretch"],
                        default=defaults["resize_mode"])
    parser.add_argument("--patch-size", type=int, default=defaults["patch_size"])
    parser.add_argument("--scales", type=float, nargs="+", default=list(defaults["scales"]),
                        help="image pyramid, e.g. 1 0.75 0.5 (default: one scale)")
    parser.add_argument("--border", type=_border, default=defaults["border"],
                        help="edge cell rings given inner features ('auto' or an integer)")
    parser.add_argument("--sampling-ratio", "--coreset-ratio", dest="sampling_ratio",
                        type=float, default=0.01,
                        help="fraction of training patches kept in the memory bank (default "
                             "0.01; ignored by padim)")
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--device", default="auto")


def model_params(args):
    """make_anomaly_pipeline parameters from the options of :func:`add_model_arguments`."""
    params = {"backbone": args.backbone, "image_size": args.image_size,
              "resize_mode": args.resize_mode, "patch_size": args.patch_size,
              "border": args.border, "scales": tuple(args.scales),
              "random_state": args.random_state, "device": args.device}
    if args.method != "padim":  # PaDiM keeps every training grid: no coreset step
        params["sampling_ratio"] = args.sampling_ratio
    return params


def _cmd_fit(args):
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
    from .persistence import load_model
    from .pipeline import PatchCorePipeline
    from .visualize import save_overlays

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
    features = model[:-1].transform(paths)
    detector = model[-1]
    scores, grids = detector.score_and_map(features)
    decision = scores - detector.offset_
    labels = np.where(decision < 0, -1, 1)
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "decision", "label"])
        for p, s, d, lab in zip(paths, scores, decision, labels, strict=True):
            writer.writerow([str(p), f"{s:.6f}", f"{d:.6f}", int(lab)])
    from ._images import check_images
    from .pipeline import _extractor_of, _grids_to_images

    maps = _grids_to_images(grids, check_images(paths).sizes(), _extractor_of(model), 4.0)
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
    from .demo import run_demo

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
