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
    extractor's options, the coreset ratio, the training options of the trained methods, the
    random state and the device. Options left out take the method's own defaults (shown in
    the help for PatchCore)."""
    from .features import FeatureExtractor
    from .methods import METHODS
    from .pipeline import DEFAULT_SAMPLING_RATIO

    defaults = FeatureExtractor().get_params()
    parser.add_argument("--method", choices=list(METHODS), default="patchcore",
                        help="patchcore (default), spade, padim: on frozen features; students "
                             "(Uninformed Students), mkd (Multiresolution Knowledge "
                             "Distillation), fyd (Focus Your Distribution): trained on the good "
                             "images (docs/estimators.md)")
    parser.add_argument("--backbone", help=f"feature methods (default {defaults['backbone']})")
    parser.add_argument("--image-size", type=int,
                        help=f"network frame in pixels (default {defaults['image_size']}; the "
                             "trained methods have their own)")
    parser.add_argument("--resize-mode", choices=["letterbox", "stretch", "pad"],
                        help=f"default {defaults['resize_mode']}")
    parser.add_argument("--patch-size", type=int,
                        help=f"feature methods (default {defaults['patch_size']})")
    parser.add_argument("--scales", type=float, nargs="+",
                        help="feature methods: image pyramid, e.g. 1 0.75 0.5 (default: one "
                             "scale)")
    parser.add_argument("--border", type=_border,
                        help="feature methods: edge cell rings given inner features ('auto' or "
                             f"an integer; default {defaults['border']!r})")
    parser.add_argument("--sampling-ratio", "--coreset-ratio", dest="sampling_ratio",
                        type=float,
                        help="patchcore and spade: fraction of training patches kept in the "
                             f"memory bank (default {DEFAULT_SAMPLING_RATIO})")
    parser.add_argument("--max-epochs", type=int, help="trained methods: epochs of training")
    parser.add_argument("--learning-rate", type=float, help="trained methods: Adam's step size")
    parser.add_argument("--batch-size", type=int,
                        help="images per network batch (for the trained methods, per training "
                             "step)")
    parser.add_argument("--ensemble", action="store_true",
                        help="patchcore: fit two models, EfficientNet-Lite2 at 320 px and "
                             "EfficientNet-Lite1 at 384 px, and average their standardised "
                             "scores and maps (better maps on both development sets; about "
                             "2.5x the time; the other feature options apply to both)")
    parser.add_argument("--random-state", type=int, default=0)
    parser.add_argument("--device", default="auto")


_FEATURE_OPTIONS = {"backbone": "--backbone", "patch_size": "--patch-size",
                    "scales": "--scales", "border": "--border",
                    "sampling_ratio": "--sampling-ratio"}
_TRAINING_OPTIONS = {"max_epochs": "--max-epochs", "learning_rate": "--learning-rate"}


def model_params(args):
    """:func:`~skpatchcore.methods.make_model` parameters from the options of
    :func:`add_model_arguments`; ValueError for an option the method does not take."""
    from .methods import TRAINED_METHODS

    trained = args.method in TRAINED_METHODS
    given = {key: getattr(args, key) for key in
             ("backbone", "image_size", "resize_mode", "patch_size", "scales", "border",
              "sampling_ratio", "max_epochs", "learning_rate", "batch_size")
             if getattr(args, key) is not None}
    wrong = _FEATURE_OPTIONS if trained else _TRAINING_OPTIONS
    if args.method == "padim":
        wrong = {**wrong, "sampling_ratio": "--sampling-ratio"}
    refused = [option for key, option in wrong.items() if key in given]
    if refused:
        verb, it = ("do", "them") if len(refused) > 1 else ("does", "it")
        raise ValueError(f"{', '.join(refused)} {verb} not apply to --method {args.method}; "
                         f"drop {it} (see --help for which options each method takes).")
    if getattr(args, "ensemble", False):
        if args.method != "patchcore":
            raise ValueError(f"--ensemble combines PatchCore models; drop --method "
                             f"{args.method} or --ensemble.")
        own = [option for key, option in (("backbone", "--backbone"),
                                          ("image_size", "--image-size")) if key in given]
        if own:
            raise ValueError(f"--ensemble sets each member's backbone and frame itself; drop "
                             f"{' and '.join(own)}.")
        given["ensemble"] = True
    if "scales" in given:
        given["scales"] = tuple(given["scales"])
    return {**given, "random_state": args.random_state, "device": args.device}


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
