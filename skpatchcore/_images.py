"""Anything-image -> float32 RGB tensors in [0, 1], with errors that name the bad item.

Accepted collections (every form gives identical pixels for identical images):

* a list/tuple of file paths (``str`` or ``pathlib.Path``), or one path: a file, or a
  directory whose images are listed by :func:`list_images`;
* a list of ``PIL.Image.Image``;
* a numpy array ``(n, H, W, C)`` with C in {1, 3, 4} (channels last);
* a torch tensor ``(n, C, H, W)`` with C in {1, 3, 4} (channels first);
* a list (or a 1-D object or string array) whose items are each **one** image, in any form:
  a path, a PIL image, a numpy array ``(H, W)`` or ``(H, W, C)``, a torch tensor ``(H, W)``
  or ``(C, H, W)``; sizes may differ and forms may be mixed.

One image or a batch: a numpy array or torch tensor passed as ``X`` itself must have a batch
axis, so it is 4-D. **A 3-D array or tensor is always refused**, because it is ambiguous: numpy
``(H, W, C)`` or ``(C, H, W)`` and torch ``(C, H, W)`` are one image, while ``(n, H, W)`` would
be a batch of grayscale images, and no shape test tells them apart reliably (a batch of 3 or 4
grayscale images looks like one image). Pass one image as ``[X]`` (or ``X[None]``), and a
batch of grayscale images with an explicit channel axis: numpy ``X[..., None]``, shape
``(n, H, W, 1)``, or torch ``X[:, None]``, shape ``(n, 1, H, W)``. A 2-D array is refused as
well (pass one grayscale image as ``[X]``).

Pixel types: ``uint8`` (0..255), ``uint16`` (0..65535) or float in [0, 1] (any byte order).
Grayscale is repeated to three channels; a fourth (alpha) channel is dropped. Images are read
lazily, one at a time, so a list of paths never sits in memory all at once.

Files and PIL images: files are decoded with Pillow (the first frame of a multi-frame file).
Palette, CMYK, YCbCr, 1-bit and other 8-bit modes become RGB; 16-bit grayscale (``I;16``) is
scaled by 65535; Pillow's float mode ``F`` follows the rules of float arrays; 32-bit integer
mode ``I`` is refused (its scale is unknown). Both files and PIL images are turned upright by
their EXIF Orientation tag (values 2 to 8, or an XMP ``tiff:Orientation``), as image viewers
show them, and :meth:`ImageList.sizes` reports the upright ``(H, W)`` (tags 5 to 8 swap height
and width). The tag is read from the metadata that precedes the pixel data, so sizes need no
decoding: for PNG that is an ``eXIf`` chunk before ``IDAT``, where Pillow and libpng write it
(a file's later ``eXIf`` chunk is not looked for); TIFF files are turned upright by Pillow itself.
Truncated or corrupt files raise a ValueError that names the file (unless
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set).

Large images: :meth:`ImageList.decode` with a :class:`~skpatchcore._geometry.Geometry` (what
:class:`~skpatchcore.FeatureExtractor` resizes into) first shrinks an image that is far larger
than its place in the network frame by an integer box filter, in its own pixel type, read a
band of rows at a time, so that no float32 copy of the full image is made (see
:meth:`Geometry.reduction_factor <skpatchcore._geometry.Geometry.reduction_factor>`; images
under about four times the frame are never shrunk). The same rule is applied to every form,
on the upright pixels, so identical pixels still give identical results.
:meth:`ImageList.sizes` always reports the original size, and :meth:`ImageList.pixels` reads
an image at full resolution a band of rows at a time (the overlays of ``skpatchcore
predict``).

Size limit: a file whose image has more pixels (H * W) than a limit is refused before it is
decoded, a guard against decompression bombs. The limit is, in order of precedence, the value
given to :func:`set_max_image_pixels`, the environment variable
``SKPATCHCORE_MAX_IMAGE_PIXELS`` (read each time a file is read; an integer, ``0`` or ``none``
for no limit), or Pillow's ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89 million pixels). Pillow's
own global setting is not changed for other code. PIL images and arrays are already in memory
and have no limit.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import struct
import sys
import threading
import warnings
from pathlib import Path

import numpy as np

ACCEPTED_FORMS = (
    "a list of image file paths (str or Path) or a directory path, a list of PIL images, "
    "a numpy array (n, H, W, C) with C in {1, 3, 4} of uint8, uint16 or floats in [0, 1], "
    "a torch tensor (n, C, H, W), or a list whose items are each one image (a path, a PIL "
    "image, a numpy array (H, W) or (H, W, C), a torch tensor (H, W) or (C, H, W))"
)
#: File extensions (lower case) recognised as images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Environment variable holding the largest number of pixels decoded from one file.
MAX_PIXELS_ENV = "SKPATCHCORE_MAX_IMAGE_PIXELS"

# What Pillow raises for a file it cannot parse or decode (truncated, corrupt, unsupported).
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
# Serialises our short switch-off of Pillow's global size check (see open_image_file).
_PIL_LIMIT_LOCK = threading.Lock()
_ORIENTATION_TAG = 0x0112
_I16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# Pixels read at once when an image is shrunk or read in bands (bounds the temporaries).
_BAND_PIXELS = 1 << 22
_DEFAULT = "default"
_max_pixels_setting: int | None | str = _DEFAULT


def _bad(message):
    return ValueError(f"{message} Accepted inputs: {ACCEPTED_FORMS}.")


def _pil():
    from PIL import Image

    return Image


class _NoTensor:
    """Stands for ``torch.Tensor`` while torch is not imported: no object is an instance."""


def _tensor_type():
    """``torch.Tensor``, or :class:`_NoTensor` when torch is not imported (then no tensor
    exists). torch is imported only to make tensors (:func:`_array_to_tensor`), so that
    reading, checking and writing images works without it (``skpatchcore predict`` with an
    ONNX model)."""
    torch = sys.modules.get("torch")
    return _NoTensor if torch is None else torch.Tensor


# ------------------------------------------------------------------------------ size limit
def set_max_image_pixels(n):
    """Set the largest image, in pixels (H * W), that is decoded from a file.

    Larger files are refused with a ValueError before they are decoded, a guard against
    decompression bombs. This setting takes precedence over the environment variable
    ``SKPATCHCORE_MAX_IMAGE_PIXELS``, which takes precedence over Pillow's
    ``PIL.Image.MAX_IMAGE_PIXELS``. Pillow's own setting is never changed.

    Parameters
    ----------
    n : int, None or "default"
        A positive int: the limit. None: no limit. ``"default"``: drop this setting, so that
        the environment variable (or, without it, Pillow's limit) applies again.

    Returns
    -------
    previous : int, None or "default"
        The setting before this call; pass it back to restore it.

    Examples
    --------
    >>> from skpatchcore._images import set_max_image_pixels
    >>> previous = set_max_image_pixels(200_000_000)
    >>> set_max_image_pixels(previous)
    200000000
    """
    global _max_pixels_setting
    valid = (
        n is None
        or (isinstance(n, str) and n == _DEFAULT)
        or (isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1)
    )
    if not valid:
        raise ValueError(
            f"set_max_image_pixels(n): n must be a positive int, None (no limit) or "
            f"'default' (use {MAX_PIXELS_ENV} or Pillow's limit), got {n!r}."
        )
    previous = _max_pixels_setting
    _max_pixels_setting = n if n is None or isinstance(n, str) else int(n)
    return previous


def _max_image_pixels():
    """The pixel limit in force now and where it comes from: (int or None, str)."""
    if _max_pixels_setting != _DEFAULT:
        return _max_pixels_setting, "set_max_image_pixels"
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if raw:
        if raw.lower() in ("0", "none"):
            return None, MAX_PIXELS_ENV
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 1:
            raise ValueError(
                f"Environment variable {MAX_PIXELS_ENV}={raw!r} is not a pixel limit: set it "
                "to a positive integer, or to 0 or 'none' for no limit."
            )
        return value, MAX_PIXELS_ENV
    return _pil().MAX_IMAGE_PIXELS, "Pillow's PIL.Image.MAX_IMAGE_PIXELS"


def _check_pixel_limit(path, where, height, width):
    limit, source = _max_image_pixels()
    pixels = height * width
    if limit is not None and pixels > limit:
        raise ValueError(
            f"{where}: {str(path)!r} has {width} x {height} = {pixels} pixels, more than the "
            f"limit of {limit} pixels (from {source}) that guards against decompression bombs. "
            "If you trust the file, raise the limit with "
            "skpatchcore._images.set_max_image_pixels(n) (None for no limit) or the "
            f"environment variable {MAX_PIXELS_ENV}=n (0 or 'none' for no limit)."
        )


# --------------------------------------------------------------------- files and PIL images
def _transposes():
    Image = _pil()
    T = getattr(Image, "Transpose", Image)  # Pillow < 9.1 has the constants on Image
    # The table of PIL.ImageOps.exif_transpose: orientation -> operation that makes it upright.
    return {
        2: T.FLIP_LEFT_RIGHT,
        3: T.ROTATE_180,
        4: T.FLIP_TOP_BOTTOM,
        5: T.TRANSPOSE,
        6: T.ROTATE_270,
        7: T.TRANSVERSE,
        8: T.ROTATE_90,
    }


def _orientation(img):
    """EXIF Orientation (1..8) of a PIL image; 1 when absent, invalid or unreadable.

    This is the one place the tag is read, for decoding and for :meth:`ImageList.sizes`. It
    uses only the metadata Pillow has already parsed (the header of a lazily opened file), so
    it decodes no pixels: ``Image.Image.getexif`` is called on purpose rather than the
    image's own method, because ``PngImageFile.getexif`` decodes the whole image to look for
    an eXIf chunk after the pixel data. TIFF images give 1: Pillow's TIFF reader applies their
    Orientation tag itself when loading (and already reports the upright size when opening).
    """
    if getattr(img, "format", None) == "TIFF":
        return 1
    try:
        value = _pil().Image.getexif(img).get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in _transposes() else 1
    except Exception:  # corrupt EXIF: ignored, as image viewers ignore it
        return 1


def _upright_size(img, orientation):
    """(H, W) of a PIL image once turned upright (orientations 5..8 swap the axes)."""
    return (img.width, img.height) if orientation >= 5 else (img.height, img.width)


def _unreadable(where, path, exc):
    what = f"{str(path)!r} is not a readable image" if path is not None else (
        "the PIL image could not be decoded"
    )
    return ValueError(
        f"{where}: {what} ({type(exc).__name__}: {exc}). "
        + ("Remove or replace the file." if path is not None else "Check its source file.")
    )


def open_image_file(path, where):
    """Open an image file lazily (header only), without Pillow's global size check.

    Pillow refuses or warns about large images by its module-global ``MAX_IMAGE_PIXELS``;
    our own limit (:func:`_check_pixel_limit`) replaces it, so the global is switched off for
    the duration of this header read only and restored at once, under a lock so that two of
    our readers never restore each other's value.
    """
    Image = _pil()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{where}: image file {str(path)!r} does not exist.")
    if path.is_dir():
        raise _bad(f"{where}: {str(path)!r} is a directory, not an image file.")
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        except _READ_ERRORS as exc:
            raise _unreadable(where, path, exc) from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _pil_pixels(img, where, orientation, path=None):
    """Decode a PIL image, turn it upright and return its pixels (see _pil_to_array)."""
    try:
        img.load()
    except _READ_ERRORS as exc:
        raise _unreadable(where, path, exc) from None
    method = _transposes().get(orientation)
    if method is not None:
        img = img.transpose(method)
    return _pil_to_array(img, where)


def _stored_box(method, size, box):
    """The box of the stored image that ``img.transpose(method)`` puts at ``box`` of the
    upright image (``size`` is the stored (width, height); boxes are (x0, y0, x1, y1))."""
    W, H = size
    x0, y0, x1, y1 = box
    T = _transposes()
    if method is None:
        return box
    if method == T[2]:  # FLIP_LEFT_RIGHT
        return (W - x1, y0, W - x0, y1)
    if method == T[3]:  # ROTATE_180
        return (W - x1, H - y1, W - x0, H - y0)
    if method == T[4]:  # FLIP_TOP_BOTTOM
        return (x0, H - y1, x1, H - y0)
    if method == T[5]:  # TRANSPOSE
        return (y0, x0, y1, x1)
    if method == T[6]:  # ROTATE_270 (clockwise)
        return (y0, H - x1, y1, H - x0)
    if method == T[7]:  # TRANSVERSE
        return (W - y1, H - x1, W - y0, H - x0)
    return (W - y1, x0, W - y0, x1)  # ROTATE_90 (counter-clockwise)


class _Rows:
    """Mixin of the row readers: ``shape`` (H, W) and ``rows(y0, y1)`` upright pixels."""

    def rgb8(self, y0, y1):
        """Upright rows [y0, y1) as uint8 RGB (y1 - y0, W, 3), the pixels of ``images[i]``
        (at full resolution) scaled to 0..255 and rounded."""
        return _to_rgb8(self.rows(y0, y1), self._where)


class _PILRows(_Rows):
    """A decoded PIL image read as upright pixel rows, a band at a time (no full copy)."""

    def __init__(self, img, where, orientation, path=None):
        try:
            img.load()
        except _READ_ERRORS as exc:
            raise _unreadable(where, path, exc) from None
        if img.mode == "I" or img.mode.startswith("I;") and img.mode not in _I16_MODES:
            _pil_to_array(img, where)  # refused with the whole image's value range
        self._img, self._where = img, where
        self._method = _transposes().get(orientation)
        self.shape = _upright_size(img, orientation)

    def rows(self, y0, y1):
        """Upright rows [y0, y1) as :func:`_pil_to_array` gives them."""
        box = _stored_box(self._method, self._img.size, (0, y0, self.shape[1], y1))
        part = self._img.crop(box)
        if self._method is not None:
            part = part.transpose(self._method)
        return _pil_to_array(part, self._where)


class _ArrayRows(_Rows):
    """In-memory upright pixels (numpy (H, W) or (H, W, 3)) read a band of rows at a time."""

    def __init__(self, arr, where):
        self._arr, self._where = arr, where
        self.shape = tuple(int(v) for v in arr.shape[:2])

    def rows(self, y0, y1):
        return self._arr[y0:y1]


def _pil_to_array(img, where):
    """Upright PIL image -> uint8 (H, W) or (H, W, 3), uint16 (H, W) or float32 (H, W)."""
    mode = img.mode
    if mode in _I16_MODES:
        return np.asarray(img).astype(np.uint16)  # native byte order
    if mode == "F":
        return np.asarray(img, dtype=np.float32)  # checked like a float array
    if mode == "I" or mode.startswith("I;"):
        arr = np.asarray(img)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        raise _bad(
            f"{where}: PIL mode {mode!r} (integer pixels, values {lo}..{hi}) is not supported: "
            "its scale is unknown; convert it to 8-bit ('L' or 'RGB') or to 16-bit ('I;16') "
            "first."
        )
    if mode == "L":
        return np.asarray(img)
    if mode == "LA":
        return np.asarray(img)[..., 0]
    if mode == "RGBA":
        return np.asarray(img)[..., :3]
    if mode in ("P", "PA"):  # via RGBA: palette transparency without Pillow's warning
        return np.asarray(img.convert("RGBA"))[..., :3]
    try:
        return np.asarray(img.convert("RGB"))
    except ValueError as exc:
        raise _bad(
            f"{where}: PIL mode {mode!r} cannot be converted to RGB ({exc}); convert the image "
            "to 'RGB' or 'L' first."
        ) from None


def _read_file(path, where):
    """Image file -> upright pixel array, refused above the pixel limit before decoding."""
    with open_image_file(path, where) as img:
        orientation = _orientation(img)  # from the header, as in ImageList.sizes
        _check_pixel_limit(path, where, img.height, img.width)
        return _pil_pixels(img, where, orientation, path=path)


# ------------------------------------------------------------------------- in-memory arrays
def _check_image_shape(shape, is_torch, where):
    """Check the shape of ONE in-memory image: numpy (H, W[, C]), torch ([C, ]H, W)."""
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    channels = (shape[0] if is_torch else shape[-1]) if ndim == 3 else None
    if not (ndim == 2 or channels in (1, 3, 4)):
        if is_torch:
            layout = "(H, W) or (C, H, W)"
            hint = (" torch images are channels first: pass x.permute(2, 0, 1) for an "
                    "(H, W, C) tensor." if ndim == 3 and shape[-1] in (1, 3, 4) else "")
        else:
            layout = "(H, W) or (H, W, C)"
            hint = (" numpy images are channels last: pass np.moveaxis(x, 0, -1) for a "
                    "(C, H, W) array." if ndim == 3 and shape[0] in (1, 3, 4) else "")
        if ndim == 4:
            hint = " Each list item is one image: pass a batch as X itself, not in a list."
        raise _bad(f"{where}: expected one image of shape {layout} with C in {{1, 3, 4}}, "
                   f"got shape {shape}.{hint}")
    height, width = shape[-2:] if is_torch else shape[:2]
    if height < 1 or width < 1:
        raise _bad(f"{where}: image of shape {shape} has no pixels.")


def _check_dtype(x, where):
    """Check the pixel dtype of a numpy array or torch tensor (before any conversion)."""
    if isinstance(x, _tensor_type()):
        import torch

        ok = x.dtype == torch.uint8 or x.is_floating_point() or (
            x.dtype == getattr(torch, "uint16", None)
        )
        name = str(x.dtype).removeprefix("torch.")
    else:
        ok = (x.dtype.kind == "u" and x.dtype.itemsize in (1, 2)) or x.dtype.kind == "f"
        name = str(x.dtype)
    if not ok:
        raise _bad(f"{where}: pixel dtype {name} is not supported; use uint8, uint16 or floats "
                   "in [0, 1].")


def _as_pixels(item, where):
    """One in-memory image (numpy channels last, torch channels first) -> numpy (H, W[, 3])."""
    is_torch = isinstance(item, _tensor_type())
    _check_image_shape(item.shape, is_torch, where)
    _check_dtype(item, where)
    if is_torch:
        import torch

        if item.dtype == torch.bfloat16:  # numpy has no bfloat16
            item = item.float()
        arr = item.detach().cpu().numpy()
        if arr.ndim == 3:
            arr = np.moveaxis(arr, 0, -1)
    else:
        arr = np.asarray(item)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    return arr


def _array_to_tensor(arr, where):
    """numpy pixels (H, W) or (H, W, 3) -> float32 tensor (3, H, W) in [0, 1]."""
    import torch

    _check_image_shape(arr.shape, False, where)
    _check_dtype(arr, where)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        arr = arr.copy()
    if arr.dtype == np.uint8:
        out = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(255.0)
    elif arr.dtype == np.uint16:
        out = torch.from_numpy(arr.astype(np.float32)).div_(65535.0)
    else:
        if not np.isfinite(arr).all():
            raise _bad(f"{where}: image contains NaN or infinite values.")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise _bad(
                f"{where}: float images must lie in [0, 1], got values in [{lo:g}, {hi:g}]; "
                "divide 8-bit data by 255 (or pass it as uint8)."
            )
        out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if out.ndim == 2:
        out = out.unsqueeze(-1).expand(-1, -1, 3)
    return out.permute(2, 0, 1).contiguous()


def _shrink(source, f, where):
    """Shrink upright pixels by an ``f`` x ``f`` box filter, a band of rows at a time.

    Each output pixel is the mean of the pixels of its block; the blocks of the last rows and
    columns hold what is left (``H % f`` rows, ``W % f`` columns), so the output has
    ``(ceil(H / f), ceil(W / f))`` pixels. Integer pixels are summed exactly and rounded
    half up back to their own type; float pixels are averaged in float64, then float32 (and
    checked, over the full image, as :func:`_array_to_tensor` checks them). Every form
    passes its upright pixels through here, so identical pixels give identical output.
    """
    H, W = source.shape
    band = f * max(1, _BAND_PIXELS // (W * f))
    cols = np.arange(0, W, f)
    col_counts = np.minimum(f, W - cols)
    out = None
    lo, hi = np.inf, -np.inf
    for y0 in range(0, H, band):
        px = source.rows(y0, min(H, y0 + band))
        is_float = px.dtype.kind == "f"
        if is_float:
            if not np.isfinite(px).all():
                raise _bad(f"{where}: image contains NaN or infinite values.")
            lo, hi = min(lo, float(px.min())), max(hi, float(px.max()))
            acc = np.float64
        else:
            acc = np.uint32 if px.dtype.itemsize == 1 and f <= 4096 else np.uint64
        starts = np.arange(0, len(px), f)
        sums = np.add.reduceat(px, starts, axis=0, dtype=acc)
        sums = np.add.reduceat(sums, cols, axis=1, dtype=acc)
        counts = np.minimum(f, len(px) - starts)[:, None] * col_counts[None, :]
        if sums.ndim == 3:
            counts = counts[..., None]
        if out is None:
            dtype = np.float32 if is_float else px.dtype.newbyteorder("=")
            out = np.empty((-(-H // f),) + sums.shape[1:], dtype=dtype)
        r0 = y0 // f
        if is_float:
            out[r0 : r0 + len(sums)] = sums / counts
        else:
            counts = counts.astype(acc)
            out[r0 : r0 + len(sums)] = (sums + counts // 2) // counts
    if lo < 0.0 or hi > 1.0:
        raise _bad(
            f"{where}: float images must lie in [0, 1], got values in [{lo:g}, {hi:g}]; "
            "divide 8-bit data by 255 (or pass it as uint8)."
        )
    return out


def _to_rgb8(px, where):
    """Upright pixel rows -> uint8 RGB (r, W, 3), equal to ``(t * 255).round()`` of the
    float32 tensor ``t`` that :func:`_array_to_tensor` makes of them (for uint8 pixels that
    is the pixels themselves: x / 255 * 255 in float32 is within 2e-5 of x)."""
    if px.dtype == np.uint8:
        return px if px.ndim == 3 else np.repeat(px[..., None], 3, axis=2)
    t = _array_to_tensor(px, where)
    return (t.permute(1, 2, 0).numpy() * np.float32(255)).round().astype(np.uint8)


class ImageList:
    """A lazily decoded, indexable collection of images.

    ``images[i]`` returns a float32 tensor (3, H, W) in [0, 1]; ``len(images)`` the count;
    ``images.name(i)`` a human-readable description for messages (the path when there is one).
    Every item is one image: a path, a PIL image, a numpy array (channels last) or a torch
    tensor (channels first).

    A list made by :meth:`for_geometry` shrinks large images for a network frame as
    :meth:`decode` does; :meth:`take` gives a part of the list that keeps the names
    (``X[i]``) of the whole.
    """

    def __init__(self, items, kind, geometry=None, offset=0):
        self._items = items
        self._kind = kind
        self._geometry = geometry
        # each item's place in the collection the user passed: ``offset + i``, or a list of
        # places after :meth:`select`
        self._offset = offset

    def __len__(self):
        return len(self._items)

    def name(self, i):
        item = self._items[i]
        place = self._place(i)
        if isinstance(item, str | os.PathLike):
            return f"X[{place}] ({os.fspath(item)!r})"
        return f"X[{place}]"

    def _place(self, i):
        offset = self._offset
        return offset[i] if isinstance(offset, list) else i + offset

    def for_geometry(self, geometry):
        """The same images, whose ``[i]`` is ``decode(i, geometry)``.

        Parameters
        ----------
        geometry : Geometry or None
            What the images will be resized into (None: no shrinking).

        Returns
        -------
        images : ImageList
        """
        return ImageList(self._items, self._kind, geometry, self._offset)

    def take(self, start, stop):
        """Images ``start`` to ``stop - 1`` as an ImageList whose messages keep their place
        in this one (``X[start]`` ...) and which shrinks as this one does."""
        offset = self._offset
        return ImageList(self._items[start:stop], self._kind, self._geometry,
                         offset[start:stop] if isinstance(offset, list) else offset + start)

    def select(self, indices):
        """The images at ``indices`` (in that order) as an ImageList whose messages keep
        their place in this one and which shrinks as this one does."""
        indices = [int(i) for i in indices]
        return ImageList([self._items[i] for i in indices], self._kind, self._geometry,
                         [self._place(i) for i in indices])

    def __getitem__(self, i):
        return self.decode(i)

    def decode(self, i, geometry=None):
        """Image ``i`` as a float32 tensor (3, h, w) in [0, 1], shrunk for ``geometry``.

        Parameters
        ----------
        i : int
        geometry : Geometry or None, default=None
            The frame the image is about to be resized into (by ``geometry.to_input``).
            An image far larger than its place in that frame is first shrunk by the integer
            factor ``f = geometry.reduction_factor((H, W))`` with a box filter in its own
            pixel type, a band of rows at a time, so that its float32 copy is small: a
            12000 x 12000 RGB PNG costs its decoded file (4 bytes per pixel in Pillow, or
            the array itself) plus a few MB, not 1.7 GB of float32. ``(h, w) =
            (ceil(H / f), ceil(W / f))``, which lands on exactly the place of ``(H, W)`` in
            the frame. Images with ``f == 1`` (every image under about four times the
            frame) are decoded exactly as without a geometry. None: the geometry of
            :meth:`for_geometry`, if any; otherwise no shrinking.

        Returns
        -------
        image : torch.Tensor (3, h, w), float32
        """
        geometry = geometry if geometry is not None else self._geometry
        item = self._items[i]
        where = self.name(i)
        if isinstance(item, str | os.PathLike):
            if geometry is None:
                return _array_to_tensor(_read_file(item, where), where)
            with open_image_file(item, where) as img:
                orientation = _orientation(img)
                _check_pixel_limit(item, where, img.height, img.width)
                f = geometry.reduction_factor(_upright_size(img, orientation))
                if f == 1:
                    pixels = _pil_pixels(img, where, orientation, path=item)
                else:
                    pixels = _shrink(_PILRows(img, where, orientation, path=item), f, where)
            return _array_to_tensor(pixels, where)
        Image = _pil()
        if isinstance(item, Image.Image):
            orientation = _orientation(item)
            f = 1 if geometry is None else geometry.reduction_factor(
                _upright_size(item, orientation))
            if f == 1:
                return _array_to_tensor(_pil_pixels(item, where, orientation), where)
            return _array_to_tensor(_shrink(_PILRows(item, where, orientation), f, where),
                                    where)
        if isinstance(item, _tensor_type() | np.ndarray):
            pixels = _as_pixels(item, where)
            f = 1 if geometry is None else geometry.reduction_factor(pixels.shape[:2])
            if f > 1:
                pixels = _shrink(_ArrayRows(pixels, where), f, where)
            return _array_to_tensor(pixels, where)
        raise _bad(f"{where}: unsupported item of type {type(item).__name__}.")

    @contextlib.contextmanager
    def pixels(self, i):
        """Image ``i`` at full resolution, upright, read a band of rows at a time.

        A context manager giving a reader with ``shape`` (H, W), ``rows(y0, y1)`` (the
        upright pixels in their own type: uint8 / uint16 / float32, (r, W) or (r, W, 3)) and
        ``rgb8(y0, y1)`` (uint8 RGB, the pixels of ``images[i]`` times 255, rounded). A file
        is decoded once, kept (as Pillow decodes it) while the block runs and closed after.
        """
        item = self._items[i]
        where = self.name(i)
        if isinstance(item, str | os.PathLike):
            with open_image_file(item, where) as img:
                orientation = _orientation(img)
                _check_pixel_limit(item, where, img.height, img.width)
                yield _PILRows(img, where, orientation, path=item)
            return
        if isinstance(item, _pil().Image):
            yield _PILRows(item, where, _orientation(item))
        elif isinstance(item, _tensor_type() | np.ndarray):
            yield _ArrayRows(_as_pixels(item, where), where)
        else:
            raise _bad(f"{where}: unsupported item of type {type(item).__name__}.")

    def sizes(self):
        """(H, W) of every image, upright, read from file headers where possible (no decoding).

        Returns
        -------
        sizes : list of tuple of (int, int)
            The ``(H, W)`` that ``self[i].shape[1:]`` has, for every ``i``.
        """
        Image = _pil()
        sizes = []
        for i, item in enumerate(self._items):
            if isinstance(item, str | os.PathLike):
                with open_image_file(item, self.name(i)) as img:
                    sizes.append(_upright_size(img, _orientation(img)))
            elif isinstance(item, Image.Image):
                sizes.append(_upright_size(item, _orientation(item)))
            elif isinstance(item, _tensor_type()):
                sizes.append(tuple(int(s) for s in item.shape[-2:]))
            else:
                sizes.append(tuple(int(s) for s in np.shape(item)[:2]))
        return sizes


# ----------------------------------------------------------------------------------- folders
def _is_image_file(path):
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _nested_image_folders(folder):
    """Sub-folders (any depth, hidden ones skipped) that directly hold image files.

    Returns a list of (path relative to ``folder`` in POSIX form, number of image files).
    """
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if Path(root) == folder:
            continue
        count = sum(1 for f in files if _is_image_file(Path(root) / f))
        if count:
            found.append((Path(root).relative_to(folder).as_posix(), count))
    return found


def _describe_folders(nested, limit=5):
    parts = [f"{name!r} ({count} image{'s' * (count != 1)})" for name, count in nested[:limit]]
    if len(nested) > limit:
        parts.append(f"and {len(nested) - limit} more")
    return ", ".join(parts)


def list_images(folder):
    """List the image files directly inside a folder, sorted by name.

    Parameters
    ----------
    folder : str or path-like
        The folder to list. Sub-folders are not searched: when the folder holds images and
        sub-folders hold more, a :class:`UserWarning` says how many were skipped and where.

    Returns
    -------
    paths : list of pathlib.Path
        Files whose extension is one of ``.png .jpg .jpeg .bmp .tif .tiff .webp`` (any case),
        sorted by file name.

    Raises
    ------
    FileNotFoundError
        If ``folder`` does not exist or is not a directory.
    ValueError
        If ``folder`` holds no image file; the message names the sub-folders that hold
        images, if any, so that they can be passed instead.

    Warns
    -----
    UserWarning
        If sub-folders (at any depth; hidden ones are ignored) hold images that were skipped.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> from skpatchcore.datasets import list_images
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("L", (4, 4)).save(d / "b.PNG"); Image.new("L", (4, 4)).save(d / "a.png")
    >>> [p.name for p in list_images(d)]
    ['a.png', 'b.PNG']
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {str(folder)!r} does not exist.")
    paths = sorted((p for p in folder.iterdir() if _is_image_file(p)), key=lambda p: p.name)
    nested = _nested_image_folders(folder)
    if not paths:
        if nested:
            example = str(folder / nested[0][0])
            raise ValueError(
                f"Image folder {str(folder)!r} contains no image file at its top level, and "
                f"sub-folders are not searched; its sub-folders {_describe_folders(nested)} hold "
                f"images. Pass such a sub-folder (e.g. {example!r}) or the list of image paths "
                "explicitly."
            )
        raise ValueError(
            f"Image folder {str(folder)!r} contains no image file (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}); check the path."
        )
    if nested:
        total = sum(count for _, count in nested)
        warnings.warn(
            f"Image folder {str(folder)!r}: read the {len(paths)} image file(s) at its top "
            f"level and skipped {total} image file(s) in {len(nested)} sub-folder(s) "
            f"({_describe_folders(nested)}), since sub-folders are not searched. "
            "Pass those sub-folders or their image paths explicitly to include them.",
            UserWarning,
            stacklevel=2,
        )
    return paths


# ------------------------------------------------------------------------------ validation
def _ambiguous_3d(X, is_torch):
    shape = tuple(int(s) for s in X.shape)
    if is_torch:
        return _bad(
            f"X is a 3-D torch tensor of shape {shape}, which is ambiguous: it could be one "
            "image (C, H, W) or a batch of grayscale images (n, H, W), so 3-D tensors are "
            "refused. For one image pass [X] or X[None]; for a batch of grayscale images pass "
            "X[:, None], of shape (n, 1, H, W)."
        )
    return _bad(
        f"X is a 3-D numpy array of shape {shape}, which is ambiguous: it could be one image "
        "(H, W, C) or (C, H, W), or a batch of grayscale images (n, H, W), so 3-D arrays are "
        "refused. For one image pass [X] (or X[None] for (H, W, C)); for a batch of grayscale "
        "images pass X[..., None], of shape (n, H, W, 1)."
    )


def _check_batch(X):
    """A numpy array (n, H, W, C) or torch tensor (n, C, H, W) -> ImageList of its images."""
    is_torch = isinstance(X, _tensor_type())
    kind = "torch tensor" if is_torch else "numpy array"
    shape = tuple(int(s) for s in X.shape)
    if X.ndim == 3:
        raise _ambiguous_3d(X, is_torch)
    if X.ndim == 2:
        raise _bad(f"X is a 2-D {kind} of shape {shape}; a batch of images is 4-D. For one "
                   "grayscale image pass [X].")
    layout = "(n, C, H, W)" if is_torch else "(n, H, W, C)"
    channels = (shape[1] if is_torch else shape[-1]) if X.ndim == 4 else None
    if channels not in (1, 3, 4):
        hint = ""
        if X.ndim == 4 and is_torch and shape[-1] in (1, 3, 4):
            hint = " torch tensors are channels first: pass X.permute(0, 3, 1, 2)."
        elif X.ndim == 4 and not is_torch and shape[1] in (1, 3, 4):
            hint = " numpy arrays are channels last: pass X.transpose(0, 2, 3, 1)."
        raise _bad(f"A {kind} X must have shape {layout} with C in {{1, 3, 4}}, got "
                   f"{shape}.{hint}")
    if shape[0] == 0:
        raise _bad("X is empty: no images were given.")
    _check_image_shape(shape[1:], is_torch, "X[0]")
    _check_dtype(X, "X")
    if is_torch:
        import torch

        if X.is_floating_point() and not torch.isfinite(X).all():
            bad = int(torch.nonzero(~torch.isfinite(X).flatten(1).all(1))[0, 0])
            raise _bad(f"X[{bad}]: image contains NaN or infinite values.")
        return ImageList(list(X), "tensor")
    if X.dtype.kind == "f" and not np.isfinite(X).all():
        bad = int(np.flatnonzero(~np.isfinite(X.reshape(len(X), -1)).all(1))[0])
        raise _bad(f"X[{bad}]: image contains NaN or infinite values.")
    return ImageList(list(X), "array")


def check_images(X):
    """Validate the container ``X`` and return an :class:`ImageList`.

    Cheap checks (container type, shapes, dtypes of in-memory arrays, existence of files)
    happen here; decoding and per-image value checks happen when an image is accessed.

    Parameters
    ----------
    X : images
        Any form listed in the module docstring. A 3-D (or 2-D) numpy array or torch tensor
        is refused as ambiguous: pass one image as ``[X]``, and a batch of grayscale images
        as numpy ``(n, H, W, 1)`` or torch ``(n, 1, H, W)``.

    Returns
    -------
    images : ImageList
        ``images[i]`` is a float32 tensor (3, H, W) in [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore._images import check_images
    >>> images = check_images(np.zeros((2, 4, 5, 3), np.uint8))
    >>> len(images), tuple(images[0].shape), images.sizes()
    (2, (3, 4, 5), [(4, 5), (4, 5)])
    >>> check_images([np.zeros((4, 5), np.uint8)]).sizes()
    [(4, 5)]
    """
    if isinstance(X, ImageList):
        return X
    if isinstance(X, str | os.PathLike):
        path = Path(X)
        if path.is_dir():
            return ImageList(list_images(path), "paths")
        if path.is_file():
            return ImageList([path], "paths")
        raise FileNotFoundError(f"X={os.fspath(X)!r}: no such file or directory.")
    if isinstance(X, np.ndarray) and X.dtype.kind in "OU":  # paths or images, one per entry
        if X.ndim != 1:
            raise _bad(f"A numpy array X of dtype {X.dtype} must be 1-D (one path or image "
                       f"per entry), got shape {X.shape}.")
        return check_images(X.tolist() if X.dtype.kind == "U" else list(X))
    if isinstance(X, np.ndarray | _tensor_type()):
        return _check_batch(X)
    if isinstance(X, list | tuple):
        if len(X) == 0:
            raise _bad("X is empty: no images were given.")
        Image = _pil()
        for i, item in enumerate(X):
            where = f"X[{i}]"
            if isinstance(item, str | os.PathLike):
                path = Path(item)
                if not path.exists():
                    raise FileNotFoundError(f"{where}: image file {os.fspath(item)!r} does not "
                                            "exist.")
                if path.is_dir():
                    raise _bad(f"{where}: {os.fspath(item)!r} is a directory, not an image "
                               "file; pass a directory as X itself, not inside a list.")
            elif isinstance(item, Image.Image):
                if item.width < 1 or item.height < 1:
                    raise _bad(f"{where}: PIL image of size {item.size} has no pixels.")
            elif isinstance(item, np.ndarray | _tensor_type()):
                _check_image_shape(item.shape, isinstance(item, _tensor_type()), where)
                _check_dtype(item, where)
            else:
                raise _bad(f"{where} has unsupported type {type(item).__name__}.")
        return ImageList(list(X), "list")
    raise _bad(f"X of type {type(X).__name__} is not a supported image collection.")
