"""Image data sets: synthetic defects and MVTec-AD style folders.

Two kinds of data are provided:

- :func:`make_defect_images` draws a small, fully in-memory data set of textured images, some
  with one drawn defect, together with the exact defect masks. It is meant for tests, examples
  and quick experiments; nothing is written to disk.
- :func:`load_mvtec` indexes a folder in the MVTec AD layout (``train/good``,
  ``test/<defect type>``, ``ground_truth/<defect type>/<stem>_mask.png``) and returns file
  paths and labels; :func:`load_mask` and :func:`load_masks` read the ground-truth masks as
  boolean arrays.

Labels follow the scikit-learn outlier convention: ``+1`` for a normal (inlier) image and
``-1`` for an anomalous (outlier) image. Masks are boolean with ``True`` marking defect pixels.
"""

import numbers
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.utils import Bunch, check_random_state

from ._images import IMAGE_EXTENSIONS, check_images, list_images

__all__ = [
    "IMAGE_EXTENSIONS",
    "image_shapes",
    "list_images",
    "load_mask",
    "load_masks",
    "load_mvtec",
    "make_defect_images",
]


# Grey levels of the clean texture are clipped to this range; defects only use values outside
# it, so every defect pixel differs from the clean texture in at least one channel.
_TEXTURE_RANGE = (40.0, 215.0)
_DARK_RANGE = (0, 30)
_BRIGHT_RANGE = (225, 255)
_DEFECT_KINDS = ("scratch", "blob", "spot")
_MIN_IMAGE_SIDE = 16


# --------------------------------------------------------------------------------------------
# Synthetic defects
# --------------------------------------------------------------------------------------------


def _check_image_size(image_size):
    """Return ``(H, W)`` from an int or a pair of ints, or raise a clear ValueError."""
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        shape = (int(image_size), int(image_size))
    else:
        try:
            shape = tuple(int(s) for s in image_size)
            ok = len(shape) == 2 and all(
                isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in image_size
            )
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(
                f"image_size must be an int or a pair of ints (H, W); got {image_size!r}."
            )
    if min(shape) < _MIN_IMAGE_SIDE:
        raise ValueError(
            f"image_size must be at least {_MIN_IMAGE_SIDE} pixels on each side so that a "
            f"defect fits inside the image; got {image_size!r}."
        )
    return shape


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int; got {value!r}.")
    return int(value)


def _texture_family(rng, n_channels):
    """Draw the parameters shared by every image of one data set."""
    return {
        "period": rng.uniform(6.0, 10.0),
        "angle": rng.uniform(-0.3, 0.3),
        "tint": rng.uniform(0.85, 1.1, size=n_channels),
    }


def _render_texture(rng, shape, family):
    """Render one clean texture image as float64 ``(H, W, C)``, with per-image jitter.

    A woven grid: two crossing sinusoidal thread families, a diagonal twill component, a random
    sub-period shift, a brightness jitter and mild Gaussian noise. Values are clipped to
    ``_TEXTURE_RANGE``.
    """
    height, width = shape
    period = family["period"]
    angle = family["angle"]
    shift_y, shift_x = rng.uniform(0.0, period, size=2)
    brightness = rng.uniform(-6.0, 6.0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    u = np.cos(angle) * (xx + shift_x) - np.sin(angle) * (yy + shift_y)
    v = np.sin(angle) * (xx + shift_x) + np.cos(angle) * (yy + shift_y)
    k = 2.0 * np.pi / period
    grey = (
        128.0 + 35.0 * np.sin(k * u) * np.sin(k * v) + 15.0 * np.cos(0.5 * k * (u - v)) + brightness
    )
    n_channels = family["tint"].shape[0]
    image = grey[:, :, None] * family["tint"][None, None, :]
    image = image + rng.normal(0.0, 3.0, size=(height, width, n_channels))
    return np.clip(image, *_TEXTURE_RANGE)


def _defect_mask_and_values(rng, shape, n_channels):
    """Draw one defect: its boolean mask and the values its pixels take, ``(H, W, C)``.

    The defect (scratch, blob or spot of different texture) lies fully inside the image, spans
    about 5-30% of the shorter side and uses only grey levels outside ``_TEXTURE_RANGE``.
    """
    height, width = shape
    side = min(height, width)
    kind = _DEFECT_KINDS[rng.randint(len(_DEFECT_KINDS))]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    if kind == "scratch":
        half_length = 0.5 * rng.uniform(0.15, 0.3) * side
        half_width = 0.5 * max(2.0, rng.uniform(0.03, 0.05) * side)
        reach = half_length + half_width + 1.0
        cy = rng.uniform(reach, height - 1 - reach)
        cx = rng.uniform(reach, width - 1 - reach)
        theta = rng.uniform(0.0, np.pi)
        dy, dx = np.sin(theta), np.cos(theta)
        along = (yy - cy) * dy + (xx - cx) * dx
        across = -(yy - cy) * dx + (xx - cx) * dy
        mask = (np.abs(along) <= half_length) & (np.abs(across) <= half_width)
    else:
        # Diameters of 8-20% of the side, at least 4 pixels.
        ry, rx = 0.5 * np.maximum(4.0, rng.uniform(0.08, 0.2, size=2) * side)
        if kind == "spot":
            rx = ry  # a round spot
        reach = max(rx, ry) + 1.0  # the ellipse is rotated: keep its longer radius inside
        cy = rng.uniform(reach, height - 1 - reach)
        cx = rng.uniform(reach, width - 1 - reach)
        theta = rng.uniform(0.0, np.pi)
        dy, dx = np.sin(theta), np.cos(theta)
        along = (yy - cy) * dy + (xx - cx) * dx
        across = -(yy - cy) * dx + (xx - cx) * dy
        mask = (along / rx) ** 2 + (across / ry) ** 2 <= 1.0
    if not mask.any():  # cannot happen with the sizes above; keep the guarantee explicit
        mask[int(round(cy)), int(round(cx))] = True

    dark = rng.randint(*_DARK_RANGE, size=n_channels)
    bright = rng.randint(_BRIGHT_RANGE[0], _BRIGHT_RANGE[1] + 1, size=n_channels)
    if kind == "spot":
        # A fine checkerboard of dark and bright: a different texture (and, in colour, a
        # different hue since the channels are drawn independently).
        checker = ((yy.astype(int) // 2 + xx.astype(int) // 2) % 2).astype(bool)
        values = np.where(checker[:, :, None], bright[None, None, :], dark[None, None, :])
    else:
        colour = dark if rng.rand() < 0.5 else bright
        values = np.broadcast_to(colour, (height, width, n_channels))
    return mask, values.astype(np.float64), kind


def _generate_defect_images(
    n_normal=20, n_anomalous=10, *, image_size=64, grayscale=False, random_state=None
):
    """Implementation of :func:`make_defect_images` that also returns the clean images.

    Returns ``(X, y, masks, X_clean, kinds)`` where ``X_clean`` is ``X`` without the defects
    (identical to ``X`` for the normal images) and ``kinds`` is an array of str, ``"none"`` for
    normal images and ``"scratch"``, ``"blob"`` or ``"spot"`` for anomalous ones.
    """
    n_normal = _check_count(n_normal, "n_normal")
    n_anomalous = _check_count(n_anomalous, "n_anomalous")
    if n_normal + n_anomalous == 0:
        raise ValueError("n_normal + n_anomalous must be at least 1; both are 0.")
    shape = _check_image_size(image_size)
    rng = check_random_state(random_state)
    n_channels = 1 if grayscale else 3
    family = _texture_family(rng, n_channels)

    n_samples = n_normal + n_anomalous
    X = np.empty((n_samples, *shape, n_channels), dtype=np.uint8)
    X_clean = np.empty_like(X)
    masks = np.zeros((n_samples, *shape), dtype=bool)
    kinds = np.full(n_samples, "none", dtype=object)
    for i in range(n_samples):
        clean = np.rint(_render_texture(rng, shape, family)).astype(np.uint8)
        X_clean[i] = clean
        X[i] = clean
        if i >= n_normal:
            mask, values, kind = _defect_mask_and_values(rng, shape, n_channels)
            X[i][mask] = values[mask].astype(np.uint8)
            masks[i] = mask
            kinds[i] = kind
    y = np.ones(n_samples, dtype=np.int64)
    y[n_normal:] = -1
    if grayscale:
        X, X_clean = X[..., 0], X_clean[..., 0]
    return X, y, masks, X_clean, kinds.astype(str)


def make_defect_images(
    n_normal=20, n_anomalous=10, *, image_size=64, grayscale=False, random_state=None
):
    """Generate textured images, some with one drawn defect, and their defect masks.

    All images share one woven-grid texture (its period, orientation and colour tint are drawn
    once from ``random_state``); each image gets a random sub-period shift, a brightness jitter
    of up to +/-6 grey levels and Gaussian noise (sigma 3), so the normal images look alike but
    are not identical. Each anomalous image carries exactly one defect drawn at random among

    - a *scratch*: a straight line 2 px or more wide, 15-30% of the shorter image side long;
    - a *blob*: a filled ellipse with diameters of 8-20% of the shorter side;
    - a *spot*: a disc of a different texture (a fine dark/bright checkerboard, whose colour
      differs from the texture in RGB images).

    Defects lie fully inside the image and use only grey levels far outside the range of the
    texture (at least 10 levels beyond it, usually far more), so they are easy to detect with
    ImageNet features and a nearest-neighbour method.

    Parameters
    ----------
    n_normal : int, default=20
        Number of defect-free images.
    n_anomalous : int, default=10
        Number of images with one defect.
    image_size : int or tuple of (int, int), default=64
        Image height and width; an int gives a square image. At least 16 on each side.
    grayscale : bool, default=False
        If True, return single-channel images of shape ``(n, H, W)`` instead of RGB images of
        shape ``(n, H, W, 3)``. Estimators refuse 3-D arrays as ambiguous: pass them as
        ``X[..., None]`` (``(n, H, W, 1)``).
    random_state : int, RandomState instance or None, default=None
        Controls the texture family, the jitter, the noise and the defects. Pass an int for
        reproducible output across calls.

    Returns
    -------
    X : ndarray of shape (n_normal + n_anomalous, H, W, 3) or (n_normal + n_anomalous, H, W)
        The images, dtype uint8. The first ``n_normal`` images are normal and the remaining
        ``n_anomalous`` are anomalous (the order is not shuffled).
    y : ndarray of shape (n_normal + n_anomalous,)
        Labels, dtype int64, in the scikit-learn outlier convention: ``+1`` for normal images
        and ``-1`` for anomalous images. Use ``y == -1`` as the ``is_anomalous`` argument of
        the functions in :mod:`skpatchcore.metrics`.
    masks : ndarray of shape (n_normal + n_anomalous, H, W)
        Boolean defect masks: ``True`` exactly at the pixels changed by the defect, all False
        for normal images.

    Notes
    -----
    Every pixel under a mask differs from the clean texture (in at least one channel) and no
    pixel outside it does, so the masks are exact pixel-level ground truth.

    Examples
    --------
    >>> from skpatchcore.datasets import make_defect_images
    >>> X, y, masks = make_defect_images(4, 2, image_size=32, random_state=0)
    >>> X.shape, X.dtype, y.tolist()
    ((6, 32, 32, 3), dtype('uint8'), [1, 1, 1, 1, -1, -1])
    >>> [bool(m.any()) for m in masks]
    [False, False, False, False, True, True]
    """
    X, y, masks, _, _ = _generate_defect_images(
        n_normal,
        n_anomalous,
        image_size=image_size,
        grayscale=grayscale,
        random_state=random_state,
    )
    return X, y, masks


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _find_mask(gt_dir, stem):
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        candidate = gt_dir / name
        if candidate.is_file():
            return candidate
    return None


def load_mvtec(root, category=None, *, allow_missing_masks=False):
    """Index a data set folder in the MVTec AD layout.

    The expected layout is::

        <category folder>/
            train/good/*.png|jpg|...
            test/good/...
            test/<defect type>/...
            ground_truth/<defect type>/<image stem>_mask.png

    Parameters
    ----------
    root : str or path-like
        The category folder (the one holding ``train/`` and ``test/``), or, when ``category``
        is given, the folder that holds the category folders.
    category : str, default=None
        Name of a category folder inside ``root`` (for example ``"bottle"`` in the MVTec AD
        root folder). If None, ``root`` itself is the category folder.
    allow_missing_masks : bool, default=False
        If False, a test image of a defect type without a ground-truth mask raises a
        FileNotFoundError. If True, its entry in ``mask_paths`` is None instead (then its mask
        reads as all False in :func:`load_masks`).

    Returns
    -------
    data : sklearn.utils.Bunch
        With the keys

        train : list of pathlib.Path
            The training images, ``train/good``, sorted by name.
        test : list of pathlib.Path
            All test images, sorted by defect type (folder name) and then by file name.
        y_test : ndarray of shape (n_test,), dtype int64
            ``+1`` for images in ``test/good`` and ``-1`` for all other test images
            (scikit-learn outlier convention).
        defect_type : ndarray of shape (n_test,), dtype str
            The test sub-folder of each test image, ``"good"`` for normal images.
        mask_paths : list of pathlib.Path or None
            For each test image, its ground-truth mask ``ground_truth/<type>/<stem>_mask.png``
            (or ``<stem>.png`` if that is the file present); None for normal images and for
            missing masks when ``allow_missing_masks=True``.
        root : pathlib.Path
            The category folder that was indexed.

    Raises
    ------
    FileNotFoundError
        If a required folder (the category folder, ``train/good`` or ``test``) or, unless
        ``allow_missing_masks=True``, a mask file is missing.
    ValueError
        If an image folder contains no image.

    Notes
    -----
    Only paths are collected; images are not opened, so any size and any format readable by
    Pillow is accepted. Read the masks at the images' sizes with
    ``load_masks(data.mask_paths, image_shapes(data.test))``.

    Examples
    --------
    >>> from skpatchcore.datasets import load_mvtec  # doctest: +SKIP
    >>> data = load_mvtec("mvtec_anomaly_detection", category="bottle")  # doctest: +SKIP
    >>> len(data.train), int((data.y_test == -1).sum())  # doctest: +SKIP
    (209, 63)
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data set folder {str(root)!r} does not exist.")
    if category is not None:
        root = root / str(category)
        if not root.is_dir():
            raise FileNotFoundError(
                f"Category folder {str(root)!r} does not exist; check the category name."
            )
    for sub in ("train", "test"):
        if not (root / sub).is_dir():
            hint = (
                " Pass category=<name> if this is the folder that holds the category folders."
                if category is None
                else ""
            )
            raise FileNotFoundError(
                f"Folder {str(root / sub)!r} does not exist: {str(root)!r} is not in the MVTec "
                f"AD layout (train/good, test/<type>, ground_truth/<type>).{hint}"
            )
    train_dir = root / "train" / "good"
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"Folder {str(train_dir)!r} does not exist: the training images must be in train/good."
        )
    train = list_images(train_dir)

    test, y_test, defect_type, mask_paths = [], [], [], []
    type_dirs = sorted((d for d in (root / "test").iterdir() if d.is_dir()), key=lambda d: d.name)
    if not type_dirs:
        raise FileNotFoundError(
            f"Folder {str(root / 'test')!r} has no sub-folder; expected test/good and "
            "test/<defect type>."
        )
    for type_dir in type_dirs:
        images = list_images(type_dir)
        is_good = type_dir.name == "good"
        gt_dir = root / "ground_truth" / type_dir.name
        for path in images:
            mask_path = None
            if not is_good:
                mask_path = _find_mask(gt_dir, path.stem)
                if mask_path is None and not allow_missing_masks:
                    raise FileNotFoundError(
                        f"No ground-truth mask for test image {str(path)!r}: expected "
                        f"{str(gt_dir / (path.stem + '_mask.png'))!r}. Pass "
                        "allow_missing_masks=True to index it without a mask."
                    )
            test.append(path)
            y_test.append(1 if is_good else -1)
            defect_type.append(type_dir.name)
            mask_paths.append(mask_path)
    return Bunch(
        train=train,
        test=test,
        y_test=np.asarray(y_test, dtype=np.int64),
        defect_type=np.asarray(defect_type, dtype=str),
        mask_paths=mask_paths,
        root=root,
    )


def image_shapes(paths):
    """Read the ``(H, W)`` size of image files without decoding their pixels.

    Parameters
    ----------
    paths : list of str or path-like
        Image files.

    Returns
    -------
    shapes : list of tuple of (int, int)
        ``(height, width)`` of each image.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> from skpatchcore.datasets import image_shapes
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"
    >>> Image.new("RGB", (5, 3)).save(p)
    >>> image_shapes([p])
    [(3, 5)]
    """
    return check_images(list(paths)).sizes()


def _check_shape(shape, name="shape"):
    try:
        out = tuple(int(s) for s in shape)
    except TypeError:
        out = ()
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"{name} must be a pair of positive ints (H, W); got {shape!r}.")
    return out


def _mask_array(image):
    """Threshold an opened PIL image into a boolean array."""
    mode = image.mode
    if mode == "1":
        return np.asarray(image, dtype=bool)
    if mode.startswith("I;16") or mode == "I":
        # 16-bit masks: threshold at the middle of the 16-bit range.
        return np.asarray(image).astype(np.int64) >= 32768
    if mode == "F":
        return np.asarray(image, dtype=np.float64) >= 128.0
    if mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "HSV", "LAB", "La", "RGBa", "RGBX"):
        image = image.convert("L" if mode in ("LA", "La") else "RGB")
    elif mode not in ("L", "RGB"):
        image = image.convert("RGB")
    values = np.asarray(image)
    if values.ndim == 3:
        values = values.max(axis=2)
    return values >= 128


def load_mask(path, shape=None):
    """Read a ground-truth mask image as a boolean array.

    Parameters
    ----------
    path : str, path-like or None
        The mask file. None stands for "no defect": an all-False mask of ``shape``.
    shape : tuple of (int, int), default=None
        If given, the ``(H, W)`` to resize the mask to, with nearest-neighbour interpolation.
        Required when ``path`` is None.

    Returns
    -------
    mask : ndarray of shape (H, W), dtype bool
        True where the mask is set (a defect pixel).

    Notes
    -----
    A pixel is set when its 8-bit value is at least 128: grey-level ('L') masks are compared
    directly, colour ('RGB', 'RGBA') and palette ('P') masks use their largest colour channel
    (alpha ignored), 1-bit masks are used as they are, and 16-bit masks ('I;16', 'I') are
    compared with 32768, the middle of their range.

    Examples
    --------
    >>> from skpatchcore.datasets import load_mask
    >>> load_mask(None, shape=(2, 3))
    array([[False, False, False],
           [False, False, False]])
    """
    if path is None:
        if shape is None:
            raise ValueError("load_mask needs shape=(H, W) when path is None.")
        return np.zeros(_check_shape(shape), dtype=bool)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mask file {str(path)!r} does not exist.")
    with Image.open(path) as image:
        mask = _mask_array(image)
    if shape is not None:
        height, width = _check_shape(shape)
        if mask.shape != (height, width):
            resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
                (width, height), resample=Image.Resampling.NEAREST
            )
            mask = np.asarray(resized) >= 128
    return mask


def load_masks(mask_paths, shapes=None):
    """Read several ground-truth masks as boolean arrays.

    Parameters
    ----------
    mask_paths : list of (str, path-like or None)
        One entry per image, for example ``load_mvtec(...).mask_paths``; None for an image
        without defect.
    shapes : tuple of (int, int), list of tuple of (int, int) or None, default=None
        The ``(H, W)`` of each image (one pair for all images, or one pair per image, as
        returned by :func:`image_shapes`). Each mask is resized to it with nearest-neighbour
        interpolation and a None path gives an all-False mask of that shape. If None, masks keep
        their own size and every path must be given.

    Returns
    -------
    masks : list of ndarray of shape (H_i, W_i), dtype bool
        One mask per entry of ``mask_paths``.

    See Also
    --------
    load_mask : Read one mask; describes the thresholding.

    Examples
    --------
    >>> from skpatchcore.datasets import load_masks
    >>> [m.shape for m in load_masks([None, None], [(2, 3), (4, 5)])]
    [(2, 3), (4, 5)]
    """
    mask_paths = list(mask_paths)
    n = len(mask_paths)
    if shapes is None:
        shapes = [None] * n
        missing = [i for i, p in enumerate(mask_paths) if p is None]
        if missing:
            raise ValueError(
                f"mask_paths[{missing[0]}] is None and shapes is None: pass shapes (for "
                "example image_shapes(image_paths)) to get all-False masks for such images."
            )
    else:
        shapes = list(shapes)
        if len(shapes) == 2 and all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shapes
        ):
            shapes = [tuple(shapes)] * n
        if len(shapes) != n:
            raise ValueError(
                f"shapes has {len(shapes)} entries but mask_paths has {n}; pass one (H, W) per "
                "mask, or a single (H, W) for all."
            )
    return [load_mask(path, shape) for path, shape in zip(mask_paths, shapes, strict=True)]
