"""The ``skpatchcore`` command: fit, predict, evaluate and a built-in demo.

Exit codes: 0 success; 2 bad input (missing path, empty folder, unreadable image or model,
bad option), with one ``error: ...`` line on stderr and no traceback; 130 interrupted.
Every option and path is checked before any image is read (docs/cli.md lists the
guarantees).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from ._utils import check_writable

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


def _model_destination(output):
    """The file ``fit -o`` will write (``.npz`` appended when missing), checked before the
    fit: its folder must exist or be creatable and be writable, and it must not be a
    folder."""
    if not str(output).strip():
        raise ValueError("-o/--output is empty; give the model file to write, e.g. -o "
                         "model.npz.")
    path = Path(output)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    if path.is_dir() or Path(output).is_dir():
        raise ValueError(f"-o {output}: {str(path)!r} is a folder; give a file name such as "
                         f"{str(Path(output) / 'model.npz')!r}.")
    check_writable(path.parent, f"-o {output}")
    return path


def _save_or_keep(model, path, args):
    """Save the fitted model; when that fails, save it to a fallback file instead of
    losing the fit, and say where."""
    from .persistence import save_model

    try:
        return save_model(model, path)
    except (OSError, ValueError) as exc:
        fallback = Path(tempfile.gettempdir()) / f"skpatchcore-model-{os.getpid()}.npz"
        try:
            save_model(model, fallback)
        except (OSError, ValueError):
            raise exc from None
        raise OSError(f"could not write {str(path)!r} ({exc}); the fitted model was saved "
                      f"to {str(fallback)!r} instead: move it where you want it.") from None


def _cmd_fit(args):
    from ._base import check_fpr
    from ._options import model_params
    from .methods import check_model, make_model

    # everything that can be wrong is found before the first image is read
    train = _collect_images(args.train_dir)
    normal = _collect_images(args.calibrate) if args.calibrate else None
    if normal is not None:
        try:
            check_fpr(args.fpr)
        except ValueError:
            raise ValueError(f"--fpr {args.fpr}: the target false-positive rate must lie "
                             "strictly between 0 and 1, e.g. --fpr 0.01.") from None
    if args.scheduler and args.method != "patchcore":
        raise ValueError(f"--scheduler fits --method patchcore only (got {args.method}); "
                         "fit other methods on this machine.")
    if args.scheduler and args.ensemble:
        raise ValueError("--scheduler fits one PatchCore model, not --ensemble; drop one of "
                         "them.")
    path = _model_destination(args.output)
    pipe = make_model(args.method, **model_params(args), contamination=args.contamination,
                      verbose=not args.quiet)
    check_model(pipe)  # the options (network, sizes, patch, border...) before any image
    start = time.perf_counter()
    if args.scheduler:  # the same model, fitted on the cluster's workers
        from .distributed import connect, fit

        with connect(args.scheduler) as client:
            fit(pipe, train, client=client, verbose=not args.quiet)
    else:
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", UserWarning)
            pipe.fit(train)
        for note in notes:  # one line each, without the warning's source line
            print(f"note: {note.message}", file=sys.stderr)
    seconds = time.perf_counter() - start
    if normal is not None:
        pipe.calibrate(normal, fpr=args.fpr)
        _say(args, f"threshold calibrated on {len(normal)} normal images for FPR {args.fpr}")
    path = _save_or_keep(pipe, path, args)
    what = f"an ensemble of {len(pipe.members)} {args.method} models" if args.ensemble \
        else args.method
    _say(args, f"fitted {what} on {len(train)} images in {seconds:.1f} s; "
               f"model written to {path}")
    return 0


def _contamination(text):
    """``--contamination``: 'auto' or a fraction in (0, 0.5]."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 0.5:
        raise argparse.ArgumentTypeError(
            f"--contamination must be 'auto' or a fraction in (0, 0.5] (the share of good "
            f"training images to flag), got {text!r}")
    return value


def _finite(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _check_out_folder(out, overwrite):
    """``predict --out``: a new or empty folder, or (with --overwrite) one of our runs."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file of that name exists; give a folder name.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out}: the folder is not empty; choose a new folder, or "
                         "pass --overwrite to replace the results of an earlier run in it.")
    return out


_RESULTS = ("scores.csv", "overlays", "masks", "report.html")


def _publish(staging, out, overwrite):
    """Move a finished run from ``staging`` into ``out``: whole, or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    clashes = [name for name in _RESULTS if (out / name).exists()]
    others = [p.name for p in out.iterdir() if p.name not in _RESULTS]
    if clashes and not overwrite or others and not overwrite:
        raise ValueError(f"--out {out} was filled by something else during this run; the "
                         f"results are in {str(staging)!r}.")
    for name in clashes:  # only our own earlier results are replaced
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for name in _RESULTS:
        if (staging / name).exists():
            (staging / name).replace(out / name)
    staging.rmdir()


def _load_for_predict(path):
    """The model ``predict`` scores with: an :class:`~skpatchcore._onnx.OnnxModel` for an
    '.onnx' file (onnxruntime, no torch), else the pipeline in a .npz model file."""
    from ._onnx import OnnxModel, is_onnx_file

    if is_onnx_file(path):
        return OnnxModel(path)
    from ._trained import TrainedDetector
    from .ensemble import AnomalyEnsemble
    from .persistence import load_model
    from .pipeline import PatchCorePipeline

    model = load_model(path, require_detector=True)
    if not isinstance(model, TrainedDetector | AnomalyEnsemble | PatchCorePipeline):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a model made by "
                         "'skpatchcore fit'")
    _quiet(model)  # one progress bar per phase instead (_predict_into)
    return model


def _quiet(model):
    """Turn off a model's own progress bars: every step of a pipeline, every member of an
    ensemble."""
    if hasattr(model, "members_"):
        for member in model.members_:
            _quiet(member)
    elif hasattr(model, "steps"):
        for _, step in model.steps:
            _quiet(step)
    elif hasattr(model, "verbose"):
        model.verbose = False


def _cmd_predict(args):
    out = _check_out_folder(args.out, args.overwrite)
    if args.embed and args.no_report:
        raise ValueError("--embed puts the overlays into report.html, which --no-report turns "
                         "off; drop one of them.")
    model = _load_for_predict(args.model)
    if args.scheduler and not hasattr(model, "steps"):
        from .methods import is_trained

        if hasattr(model, "members_"):
            raise ValueError(f"--scheduler scores single patchcore, spade and padim models on "
                             f"a Dask cluster; {args.model} holds an ensemble, which predict "
                             "scores on this machine: drop --scheduler.")
        if is_trained(model):
            raise ValueError(f"--scheduler scores patchcore, spade and padim models on a Dask "
                             f"cluster; {args.model} holds a {type(model).__name__}, which "
                             "predict scores on this machine: drop --scheduler.")
        raise ValueError(f"--scheduler scores .npz models on a Dask cluster; {args.model} is "
                         "an exported ONNX model, which predict scores with onnxruntime on "
                         "this machine: drop --scheduler, or pass the .npz model.")
    paths = _collect_images(args.inputs)
    # the run is written into a fresh folder beside --out and moved in when complete
    out.parent.mkdir(parents=True, exist_ok=True)
    final, staging = out, Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        n_bad = _predict_into(model, paths, staging, args)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, final, args.overwrite)
    _say(args, f"scored {len(paths)} images: {n_bad} flagged defective (label -1). "
               f"Wrote {final / 'scores.csv'}" + ("" if args.no_images else
                                                  f", {final / 'overlays'}, {final / 'masks'}")
         + ("" if args.no_report else f"; open {final / 'report.html'} in a browser"))
    return 0


_SCHEDULER_HELP = ("address of a Dask scheduler (tcp://host:8786): run the work on its "
                   "workers, with the results of this machine (default: this machine)")
#: Gaussian smoothing of predict's maps, in network-input pixels.
_SIGMA = 4.0
#: Values of each image's map kept for the overlays' shared colour scale.
_SCALE_SAMPLE = 1024
#: Frames per onnxruntime call in ``predict MODEL.onnx`` (batches of 8 were as fast as or
#: faster than one frame per call in docs/benchmarks.md).
_ONNX_BATCH = 8


class _PipelineScores:
    """Pass 1 of ``predict`` with a fitted pipeline or trained detector: every image's
    score and patch grid (or the method's own map), images a chunk at a time
    (``iter_score_and_grids``). Maps are made per image on demand: at network-input
    resolution, then on the image's pixels a band of rows at a time."""

    def __init__(self, model, images, quiet, chunks=None):
        from ._utils import progress
        from .methods import final_estimator, map_geometry, pixel_threshold

        self.description = model
        self.offset = final_estimator(model).offset_
        self.pixel_threshold = pixel_threshold(model)
        self._geometry = map_geometry(model)
        self._images = images
        n = len(images)
        self.scores = np.empty(n, dtype=np.float64)
        self._grids = None
        bar = progress(total=n, desc="scoring", unit="img", disable=quiet)
        if chunks is None:  # else the same, from a cluster (_cluster_chunks)
            chunks = model.iter_score_and_grids(images)
        for first, chunk_scores, chunk_grids in chunks:
            if self._grids is None:
                self._grids = np.empty((n,) + chunk_grids.shape[1:], dtype=np.float32)
            self.scores[first : first + len(chunk_scores)] = chunk_scores
            self._grids[first : first + len(chunk_grids)] = chunk_grids
            bar.update(len(chunk_scores))
        bar.close()
        self._sizes = None

    def _input_map(self, i):  # image i's map over the network input, smoothed
        from ._geometry import upsample_maps

        if self._sizes is None:
            self._sizes = self._images.sizes()
        return upsample_maps(self._grids[i][None], self._geometry.input_size, _SIGMA)[0]

    def scale_sample(self, i):
        """Values of image i's map for the shared colour scale (before its resize to the
        image's pixels)."""
        from ._visualize import colour_scale_sample

        amap = self._input_map(i)
        return colour_scale_sample(self._geometry.image_region(amap, self._sizes[i]),
                                   _SCALE_SAMPLE)

    def map_rows(self, i):
        """``rows(y0, y1)`` of image i's map on its own pixels (made band by band)."""
        return self._geometry.image_rows(self._input_map(i), self._sizes[i]).rows


def _cluster_chunks(model, paths, scheduler):
    """``model.iter_score_and_grids(paths)`` on the Dask cluster at ``scheduler``: the same
    scores and grids; the workers read the images."""
    from .distributed import connect, iter_score_and_grids

    with connect(scheduler) as client:
        yield from iter_score_and_grids(model, paths, client=client)


class _OnnxScores:
    """Pass 1 of ``predict`` with an exported model (:class:`~skpatchcore._onnx.OnnxModel`,
    no torch): scores from onnxruntime, ``_ONNX_BATCH`` frames per call. The graph's map at
    frame resolution is kept only as a colour-scale sample; :meth:`map_rows` runs the graph
    again for one image, so that memory does not grow with the number of images."""

    def __init__(self, model, images, quiet, with_maps):
        from ._onnx import read_frame
        from ._utils import progress

        self.description = model.description()
        self.offset = model.offset_
        self.pixel_threshold = -model.offset_
        self._model = model
        self._images = images
        H, W = model.frame_size
        for i, size in enumerate(images.sizes()):  # before any image is decoded
            if tuple(size) != (H, W):
                raise ValueError(
                    f"{images.name(i)} is {size[0]} x {size[1]} pixels (height x width), but "
                    f"{model.path} was exported for {H} x {W} frames; export the model again "
                    f"for this size (skpatchcore export MODEL.npz --frame-size {size[0]} "
                    f"{size[1]}), or score with the .npz model.")
        n = len(images)
        self.scores = np.empty(n, dtype=np.float64)
        self._samples = []
        bar = progress(total=n, desc="scoring", unit="img", disable=quiet)
        for first in range(0, n, _ONNX_BATCH):
            frames = np.stack([read_frame(images, i)
                               for i in range(first, min(n, first + _ONNX_BATCH))])
            out = model.run(frames)
            self.scores[first : first + len(frames)] = out["score"]
            if with_maps:
                self._samples += [self._sample(m) for m in out["anomaly_map"]]
            bar.update(len(frames))
        bar.close()

    @staticmethod
    def _sample(amap):
        from ._visualize import colour_scale_sample

        return colour_scale_sample(amap, _SCALE_SAMPLE)

    def scale_sample(self, i):
        return self._samples[i]

    def map_rows(self, i):
        from ._onnx import read_frame

        amap = self._model.run(read_frame(self._images, i)[None])["anomaly_map"][0]
        return lambda y0, y1: amap[y0:y1]


class _EnsembleScores:
    """Pass 1 of ``predict`` with an :class:`~skpatchcore.AnomalyEnsemble`: scores
    ``_ENSEMBLE_CHUNK`` images at a time, with every member's maps on the images' pixels
    kept only as colour-scale samples (the members' grids have different frames, so there is
    no one grid to keep); :meth:`map_rows` runs the ensemble again for one image, so that
    memory does not grow with the number of images."""

    def __init__(self, model, images, quiet, with_maps):
        from ._utils import progress
        from ._visualize import colour_scale_sample

        self.description = model
        self.offset = model.offset_
        self.pixel_threshold = model.pixel_threshold_
        self._model = model
        self._images = images
        n = len(images)
        self.scores = np.empty(n, dtype=np.float64)
        self._samples = []
        bar = progress(total=n, desc="scoring", unit="img", disable=quiet)
        for first in range(0, n, _ENSEMBLE_CHUNK):
            part = images.take(first, first + _ENSEMBLE_CHUNK)
            if with_maps:
                scores, maps = model.score_and_map(part, sigma=_SIGMA)
                self._samples += [colour_scale_sample(m, _SCALE_SAMPLE) for m in maps]
            else:
                scores = model.score_samples(part)
            self.scores[first : first + len(scores)] = scores
            bar.update(len(scores))
        bar.close()

    def scale_sample(self, i):
        return self._samples[i]

    def map_rows(self, i):
        amap = self._model.predict_map(self._images.take(i, i + 1), sigma=_SIGMA)[0]
        return lambda y0, y1: amap[y0:y1]


#: Images per chunk of ``predict`` with an ensemble.
_ENSEMBLE_CHUNK = 16


def _predict_into(model, paths, out, args):
    """Score ``paths`` and write scores.csv, overlays, masks and report.html into ``out``;
    returns the number of images labelled -1.

    Two passes, in memory that does not grow with the number of images beyond a patch grid
    per image (and 4 KB of map values, for the colour scale): (1) images a chunk at a time
    -> scores (:class:`_PipelineScores`, or :class:`_OnnxScores` for an exported model);
    (2) with ``--no-images`` off, image by image: its map, at full resolution a band of rows
    at a time, written into its mask and overlay as it goes. No full-resolution map of the
    library's ever exists whole; the largest allocation is the decoded image file (see
    docs/cli.md, "Memory"), or, for an exported model, one image's map from the graph, or,
    for an ensemble (:class:`_EnsembleScores`), one chunk's maps."""
    from ._images import check_images
    from ._onnx import OnnxModel
    from ._utils import labels_from_decision, progress
    from ._visualize import colour_scale, overlay_name, write_overlay

    start = time.perf_counter()
    images = check_images(paths)
    n = len(images)
    if isinstance(model, OnnxModel):
        scored = _OnnxScores(model, images, args.quiet, with_maps=not args.no_images)
    elif hasattr(model, "members_"):
        scored = _EnsembleScores(model, images, args.quiet, with_maps=not args.no_images)
    else:
        chunks = _cluster_chunks(model, paths, args.scheduler) if args.scheduler else None
        scored = _PipelineScores(model, images, args.quiet, chunks)
    scores, offset = scored.scores, scored.offset
    decision = scores - offset
    labels = labels_from_decision(decision)  # NaN never says "good"
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "decision", "label"])
        for p, s, d, lab in zip(paths, scores, decision, labels, strict=True):
            writer.writerow([str(p), f"{s:.6f}", f"{d:.6f}", int(lab)])
    threshold = scored.pixel_threshold if args.threshold is None else args.threshold
    overlays = scale = None
    if not args.no_images:
        # the shared colour scale, from a sample of every map
        scale = colour_scale(None, threshold,
                             samples=[scored.scale_sample(i) for i in range(n)])
        (out / "overlays").mkdir()
        (out / "masks").mkdir()
        overlays = []
        bar = progress(total=n, desc="overlays", unit="img", disable=args.quiet)
        for i, p in enumerate(paths):
            map_rows = scored.map_rows(i)  # made band by band
            path = out / "overlays" / overlay_name(i, p.stem, -scores[i])
            with images.pixels(i) as px:
                write_overlay(path, px.rgb8, map_rows, px.shape, vmin=scale[0],
                              vmax=scale[1], threshold=threshold,
                              mask_path=out / "masks" / f"{i:04d}_{p.stem}_mask.png")
            overlays.append(path)
            bar.update(1)
        bar.close()
    if not args.no_report:
        from ._report import predict_report

        predict_report(out, model_file=Path(args.model).resolve(), pipe=scored.description,
                       paths=paths, scores=scores, overlays=overlays,
                       seconds=time.perf_counter() - start,
                       pixel_threshold=threshold,
                       colour_scale=scale, embed=args.embed)
    return int((labels == -1).sum())


def _cmd_export(args):
    from ._onnx import is_onnx_file

    if is_onnx_file(args.model):
        raise ValueError(f"{args.model} is already an ONNX model; export the .npz model file "
                         "written by 'skpatchcore fit'.")
    if args.like is not None:
        from ._images import check_images

        frame = tuple(check_images([args.like]).sizes()[0])
    else:
        frame = tuple(args.frame_size)
        if min(frame) < 1:
            raise ValueError(f"--frame-size {frame[0]} {frame[1]}: give the frames' height and "
                             "width in pixels, both positive.")
    from .export import export_onnx

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", UserWarning)
        path = export_onnx(args.model, args.output, frame_size=frame, overwrite=args.overwrite)
    for note in notes:
        print(f"note: {note.message}", file=sys.stderr)
    _say(args, f"exported {args.model} for {frame[0]} x {frame[1]} frames (height x width) "
               f"to {path} ({path.stat().st_size / 2**20:.1f} MiB) in "
               f"{time.perf_counter() - start:.1f} s; score it with 'skpatchcore predict "
               f"{path} IMAGES --out DIR' or onnxruntime (docs/deployment.md)")
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


def _parser(command=None):
    """The argument parser; ``command`` (the first argument) leaves out the options of the
    commands not run that need torch to be listed (fit's model options read their defaults
    from FeatureExtractor), so that ``predict MODEL.onnx`` never imports torch."""
    parser = argparse.ArgumentParser(
        prog="skpatchcore",
        description="PatchCore anomaly detection: fit on good images, score new ones.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit a model on a folder of good images")
    fit.add_argument("train_dir", nargs="+", help="folders or files of good images")
    fit.add_argument("-o", "--output", required=True, help="model file to write (.npz)")
    from ._options import add_image_arguments, add_model_arguments

    if command in (None, "fit"):
        add_model_arguments(fit)
    add_image_arguments(fit)
    fit.add_argument("--contamination", type=_contamination, default="auto",
                     help="'auto' or the fraction of good training images to flag, in (0, 0.5]")
    fit.add_argument("--calibrate", nargs="+", metavar="DIR",
                     help="held-out good images: set the threshold for --fpr")
    fit.add_argument("--fpr", type=float, default=0.01,
                     help="target false-positive rate for --calibrate (default 0.01)")
    fit.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    fit.add_argument("--scheduler", metavar="ADDRESS", help=_SCHEDULER_HELP)
    fit.set_defaults(func=_cmd_fit)

    pred = sub.add_parser("predict", help="score images with a fitted model")
    pred.add_argument("model", help="model file written by 'skpatchcore fit'")
    pred.add_argument("inputs", nargs="+", help="image files or folders")
    pred.add_argument("--out", required=True, help="output folder")
    pred.add_argument("--threshold", type=_finite,
                      help="pixel threshold for masks (default: the model's: its image "
                           "threshold, or pixel_threshold_ for the trained methods)")
    pred.add_argument("--no-images", action="store_true",
                      help="no overlays or masks: scores.csv (and report.html without pictures)")
    pred.add_argument("--no-report", action="store_true", help="do not write report.html")
    pred.add_argument("--embed", action="store_true",
                      help="embed the overlays in report.html (one file to send; large)")
    pred.add_argument("--overwrite", action="store_true",
                      help="replace the results of an earlier run in --out")
    add_image_arguments(pred)
    pred.add_argument("--quiet", action="store_true")
    pred.add_argument("--scheduler", metavar="ADDRESS", help=_SCHEDULER_HELP)
    pred.set_defaults(func=_cmd_predict)

    ev = sub.add_parser("evaluate", help="fit on ROOT/train/good and evaluate ROOT/test",
                        add_help=False)
    ev.add_argument("rest", nargs=argparse.REMAINDER)
    ev.set_defaults(func=_cmd_evaluate)

    exp = sub.add_parser("export", help="export a fitted model to ONNX (one graph, for "
                                        "onnxruntime in C++, C# or Python)")
    exp.add_argument("model", help="model file written by 'skpatchcore fit' (.npz)")
    exp.add_argument("-o", "--output", required=True, help="ONNX file to write (.onnx)")
    size = exp.add_mutually_exclusive_group(required=True)
    size.add_argument("--frame-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                      help="height and width of the camera frames the graph will take")
    size.add_argument("--like", metavar="IMAGE",
                      help="take the frame size from this image file")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace an existing file at -o")
    add_image_arguments(exp)
    exp.add_argument("--quiet", action="store_true")
    exp.set_defaults(func=_cmd_export)

    demo = sub.add_parser("demo", help="the whole job on a built-in synthetic example")
    demo.add_argument("--out", default="demo_output", help="output folder")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv=None):
    from ._options import apply_image_arguments

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser(argv[0] if argv else None).parse_args(argv)
    try:
        apply_image_arguments(args)
        return args.func(args)
    except ImportError as exc:
        if "pip install" not in str(exc):  # not our "install this" message: a real bug
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
