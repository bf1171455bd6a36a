"""Anything-image -> float32 RGB tensors in [0, 1], with errors that name the bad item.

Accepted collections (every form gives identical pixels for identical images):

* a list/tuple of file paths (``str`` or ``pathlib.Path``), or one directory path;
* a list of ``PIL.Image.Image``;
* a numpy array ``(n, H, W)`` (grayscale) or ``(n, H, W, C)`` with C in {1, 3, 4};
* a list of numpy arrays ``(H, W)`` or ``(H, W, C)``, sizes may differ;
* a torch tensor ``(n, C, H, W)`` with C in {1, 3, 4} (or a list of ``(C, H, W)`` tensors).

Pixel types: ``uint8`` (0..255), ``uint16`` (0..65535) or float in [0, 1]. Grayscale is
repeated to three channels; a fourth (alpha) channel is dropped. Images are read lazily, one
at a time, so a list of paths never sits in memory all at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

ACCEPTED_FORMS = (
    "a list of image file paths (str or Path) or a directory path, a list of PIL images, "
    "a numpy array (n, H, W) or (n, H, W, 3|4) of uint8 or floats in [0, 1], a list of such "
    "arrays with different sizes, or a torch tensor (n, 3, H, W)"
)
#: File extensions (lower case) recognised as images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _bad(message):
    return ValueError(f"{message} Accepted inputs: {ACCEPTED_FORMS}.")


def _pil():
    from PIL import Image

    return Image


def _pil_to_array(img, where):
    """PIL image -> uint8/uint16 array (H, W) or (H, W, 3)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.uint16)
    if mode in ("I", "F"):
        arr = np.asarray(img)
        raise _bad(
            f"{where}: PIL mode {mode!r} ({arr.dtype}) is not supported; convert it to 8-bit "
            "('L' or 'RGB') or 16-bit ('I;16') first."
        )
    if mode == "L":
        return np.asarray(img)
    if mode == "LA":
        return np.asarray(img.convert("L"))
    if mode == "RGBA":
        return np.asarray(img)[..., :3]
    return np.asarray(img.convert("RGB"))


def _read_file(path, where):
    Image = _pil()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{where}: image file {str(path)!r} does not exist.")
    if path.is_dir():
        raise _bad(f"{where}: {str(path)!r} is a directory, not an image file.")
    try:
        with Image.open(path) as img:
            img.load()
            return _pil_to_array(img, where)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(
            f"{where}: {str(path)!r} is not a readable image ({type(exc).__name__}: {exc}). "
            "Remove or replace the file."
        ) from None


def _array_to_tensor(arr, where, channels_first=False):
    """numpy/torch array of one image -> float32 tensor (3, H, W) in [0, 1]."""
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr)
    if arr.ndim == 3 and channels_first:
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        layout = "(C, H, W)" if channels_first else "(H, W) or (H, W, C)"
        raise _bad(f"{where}: expected an image of shape {layout} with C in {{1, 3, 4}}, "
                   f"got shape {arr.shape}.")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise _bad(f"{where}: image of shape {arr.shape} has no pixels.")
    if not arr.flags.writeable:  # e.g. np.asarray(PIL image); torch wants writable memory
        arr = arr.copy()
    if arr.dtype == np.uint8:
        out = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(255.0)
    elif arr.dtype == np.uint16:
        out = torch.from_numpy(arr.astype(np.float32)).div_(65535.0)
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise _bad(f"{where}: image contains NaN or infinite values.")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise _bad(
                f"{where}: float images must lie in [0, 1], got values in [{lo:g}, {hi:g}]; "
                "divide 8-bit data by 255 (or pass it as uint8)."
            )
        out = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        raise _bad(
            f"{where}: pixel dtype {arr.dtype} is not supported; use uint8, uint16 or floats "
            "in [0, 1]."
        )
    if out.ndim == 2:
        out = out.unsqueeze(-1).expand(-1, -1, 3)
    return out.permute(2, 0, 1).contiguous()


class ImageList:
    """A lazily decoded, indexable collection of images.

    ``images[i]`` returns a float32 tensor (3, H, W) in [0, 1]; ``len(images)`` the count;
    ``images.name(i)`` a human-readable description for messages (the path when there is one).
    """

    def __init__(self, items, kind):
        self._items = items
        self._kind = kind

    def __len__(self):
        return len(self._items)

    def name(self, i):
        item = self._items[i]
        if isinstance(item, str | os.PathLike):
            return f"X[{i}] ({os.fspath(item)!r})"
        return f"X[{i}]"

    def __getitem__(self, i):
        item = self._items[i]
        where = self.name(i)
        if isinstance(item, str | os.PathLike):
            return _array_to_tensor(_read_file(item, where), where)
        Image = _pil()
        if isinstance(item, Image.Image):
            return _array_to_tensor(_pil_to_array(item, where), where)
        if isinstance(item, torch.Tensor):
            return _array_to_tensor(item, where, channels_first=item.ndim == 3)
        if isinstance(item, np.ndarray):
            return _array_to_tensor(item, where, channels_first=self._kind == "tensor")
        raise _bad(f"{where}: unsupported item of type {type(item).__name__}.")

    def sizes(self):
        """(H, W) of every image, read from file headers where possible (no decoding)."""
        Image = _pil()
        sizes = []
        for i, item in enumerate(self._items):
            if isinstance(item, str | os.PathLike):
                try:
                    with Image.open(item) as img:
                        sizes.append((img.height, img.width))
                except (OSError, SyntaxError):
                    sizes.append(tuple(self[i].shape[1:]))
            elif isinstance(item, Image.Image):
                sizes.append((item.height, item.width))
            elif isinstance(item, torch.Tensor) and item.ndim == 3:
                sizes.append(tuple(item.shape[1:]))
            else:
                sizes.append(tuple(np.shape(item)[:2]))
        return sizes


def list_images(folder):
    """List the image files directly inside a folder, sorted by name.

    Parameters
    ----------
    folder : str or path-like
        The folder to list. Sub-folders are not searched.

    Returns
    -------
    paths : list of pathlib.Path
        Files whose extension is one of ``.png .jpg .jpeg .bmp .tif .tiff .webp`` (any case), sorted
        by file name.

    Raises
    ------
    FileNotFoundError
        If ``folder`` does not exist or is not a directory.
    ValueError
        If ``folder`` holds no image file.

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
    paths = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: p.name,
    )
    if not paths:
        raise ValueError(
            f"Image folder {str(folder)!r} contains no image file (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)}); check the path."
        )
    return paths



def check_images(X):
    """Validate the container ``X`` and return an :class:`ImageList`.

    Cheap checks (container type, shapes, dtypes of in-memory arrays, existence of files)
    happen here; decoding and per-image value checks happen when an image is accessed.
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
    if isinstance(X, torch.Tensor):
        if X.ndim == 3:
            X = X.unsqueeze(1)
        if X.ndim != 4 or X.shape[1] not in (1, 3, 4):
            raise _bad(f"A torch tensor X must have shape (n, C, H, W) with C in {{1, 3, 4}}, "
                       f"got {tuple(X.shape)}.")
        if X.shape[0] == 0:
            raise _bad("X is empty: no images were given.")
        if X.is_floating_point() and not torch.isfinite(X).all():
            bad = int(torch.nonzero(~torch.isfinite(X).flatten(1).all(1))[0, 0])
            raise _bad(f"X[{bad}]: image contains NaN or infinite values.")
        return ImageList(list(X), "tensor")
    if isinstance(X, np.ndarray):
        if X.dtype == object:
            return check_images(list(X))
        if X.ndim == 3 and X.shape[-1] in (3, 4) and min(X.shape[:2]) >= 16:
            raise _bad(
                f"X has shape {X.shape}, which looks like one RGB image (H, W, C); a 3-D array "
                "is read as n grayscale images (n, H, W). Pass X[None] or [X] for one image."
            )
        if X.ndim == 3:
            X = X[..., None]
        if X.ndim != 4 or X.shape[-1] not in (1, 3, 4):
            raise _bad(f"A numpy array X must have shape (n, H, W) or (n, H, W, C) with C in "
                       f"{{1, 3, 4}}, got {X.shape}.")
        if X.shape[0] == 0:
            raise _bad("X is empty: no images were given.")
        if X.dtype.kind == "f" and not np.isfinite(X).all():
            bad = int(np.flatnonzero(~np.isfinite(X.reshape(len(X), -1)).all(1))[0])
            raise _bad(f"X[{bad}]: image contains NaN or infinite values.")
        return ImageList(list(X), "array")
    if isinstance(X, list | tuple):
        if len(X) == 0:
            raise _bad("X is empty: no images were given.")
        Image = _pil()
        for i, item in enumerate(X):
            if isinstance(item, str | os.PathLike):
                path = Path(item)
                if not path.exists():
                    raise FileNotFoundError(f"X[{i}]: image file {os.fspath(item)!r} does not "
                                            "exist.")
            elif not isinstance(item, Image.Image | np.ndarray | torch.Tensor):
                raise _bad(f"X[{i}] has unsupported type {type(item).__name__}.")
        return ImageList(list(X), "list")
    raise _bad(f"X of type {type(X).__name__} is not a supported image collection.")
