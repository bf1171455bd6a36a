"""Command-line options shared by ``skpatchcore fit`` and ``python -m skpatchcore.evaluate``."""

from __future__ import annotations

import argparse

__all__ = ["add_image_arguments", "add_model_arguments", "apply_image_arguments",
           "model_params"]


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


def _max_pixels(text):
    if text == "default":
        return text
    if text.lower() in ("0", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"--max-image-pixels must be a positive number of pixels (H * W), or 'none' for no "
            f"limit, got {text!r}")
    return value


def add_image_arguments(parser):
    """Options about reading image files, shared by every command that reads them."""
    parser.add_argument(
        "--max-image-pixels", type=_max_pixels, default="default", metavar="N",
        help="largest image file to decode, in pixels (H * W), or 'none'; default: "
             "$SKPATCHCORE_MAX_IMAGE_PIXELS, else Pillow's limit (about 89 million)")


def apply_image_arguments(args):
    """Put the options of :func:`add_image_arguments` in force."""
    from ._images import set_max_image_pixels

    value = getattr(args, "max_image_pixels", "default")
    set_max_image_pixels(value)
