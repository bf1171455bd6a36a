"""Where an image lands in the network input, and how a map gets back onto its pixels.

The forward direction (resize into the ``image_size`` frame, letterbox or stretch, optional
centre crop) and its inverse (patch grid -> network-input map -> the image's own pixels)
live here and nowhere else: :class:`~skpatchcore.FeatureExtractor` calls both.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

__all__ = ["BilinearRows", "Geometry", "as_hw", "check_sigma", "frame_geometry",
           "upsample_maps"]

# Letterbox padding: mid grey, which both normalisations map to about 0.
LETTERBOX_FILL = 0.5
# Output pixels computed at once by BilinearRows.fill (bounds its float64 temporaries).
_BAND_PIXELS = 1 << 20


def as_hw(size, name):
    """``size`` as a (height, width) pair of positive ints (None stays None)."""
    if size is None:
        return None
    if isinstance(size, Integral):
        return (int(size), int(size))
    try:
        h, w = size
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be an int or a pair (height, width), got {size!r}."
        ) from None
    if not (isinstance(h, Integral) and isinstance(w, Integral) and h > 0 and w > 0):
        raise ValueError(f"{name} must hold two positive ints, got {size!r}.")
    return (int(h), int(w))


def frame_geometry(src_hw, image_size, resize_mode):
    """Where an image of size ``src_hw`` lands in the ``image_size`` frame.

    Returns (top, left, height, width) of the resized image inside the frame: the whole frame
    for 'stretch'; the largest aspect-preserving fit, centred, for 'letterbox'; for 'pad',
    the image at its own size, centred, when it fits, else shrunk as by 'letterbox' (never
    enlarged, so that a texture keeps its scale in every image that fits).

    Examples
    --------
    >>> frame_geometry((100, 200), (64, 64), "letterbox")
    (16, 0, 32, 64)
    >>> frame_geometry((100, 200), (64, 64), "stretch")
    (0, 0, 64, 64)
    >>> frame_geometry((30, 40), (64, 64), "pad"), frame_geometry((100, 200), (64, 64), "pad")
    ((17, 12, 30, 40), (16, 0, 32, 64))
    """
    H, W = image_size
    if resize_mode == "stretch":
        return 0, 0, H, W
    h, w = src_hw
    scale = min(H / h, W / w)
    if resize_mode == "pad":
        scale = min(scale, 1.0)
    nh, nw = min(H, max(1, round(h * scale))), min(W, max(1, round(w * scale)))
    return (H - nh) // 2, (W - nw) // 2, nh, nw


def check_sigma(sigma):
    """ValueError unless ``sigma`` (the maps' Gaussian smoothing) is None, 0 or positive."""
    if sigma is not None and not (isinstance(sigma, int | float | np.number) and sigma >= 0
                                  and np.isfinite(sigma)):
        raise ValueError(f"sigma={sigma!r}: the map smoothing must be 0 (off) or a positive "
                         "standard deviation in pixels.")


def check_output_size(output_size, name="output_size"):
    """``output_size`` as two positive ints; ValueError naming the argument otherwise."""
    try:
        h, w = (int(v) for v in output_size)
        ok = (h, w) == tuple(output_size)
    except (TypeError, ValueError):
        ok = False
    if not ok or h < 1 or w < 1:
        raise ValueError(f"{name}={output_size!r} must be a pair of positive ints (height, "
                         "width).")
    return h, w


def upsample_maps(grids, output_size, sigma):
    """Bilinearly upsample (n, h, w) grids to ``output_size`` and Gaussian-smooth them.

    Parameters
    ----------
    grids : array-like of shape (n, h, w)
    output_size : (int, int)
    sigma : float or None
        Standard deviation of the Gaussian in output pixels (0 or None: no smoothing),
        truncated at 4 sigma as in the reference implementation.

    Returns
    -------
    maps : ndarray of shape (n, H, W), float32
    """
    check_sigma(sigma)
    h, w = check_output_size(output_size)
    t = torch.from_numpy(np.ascontiguousarray(grids, dtype=np.float32))[:, None]
    up = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[:, 0].numpy()
    if sigma:
        up = np.stack([gaussian_filter(m, sigma=sigma, truncate=4.0) for m in up])
    return up.astype(np.float32, copy=False)


def _fma(a, b, c):
    """float32 ``a * b + c`` rounded once, as a fused multiply-add: the product of two float32
    is exact in float64, and so (to within a 2**-29 chance of a double rounding) is the
    sum."""
    out = np.multiply(a, b, dtype=np.float64)
    out += c
    return out.astype(np.float32)


def _linear_weights(n_in, n_out):
    """Source indices and weights of a linear resize from ``n_in`` to ``n_out`` samples,
    computed as PyTorch's CPU kernel computes them (``align_corners=False``): float32, the
    source position ``scale * (i + 0.5) - 0.5`` fused, clamped at 0."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = _fma(scale, np.arange(n_out, dtype=np.float32) + np.float32(0.5), np.float32(-0.5))
    np.maximum(src, np.float32(0.0), out=src)
    i0 = np.minimum(np.floor(src).astype(np.intp), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    i1 = i0 + (i0 < n_in - 1)
    return i0, i1, (np.float32(1.0) - lam).astype(np.float32), lam.astype(np.float32)


class BilinearRows:
    """A bilinear resize of a small float32 map to ``(H, W)``, computed a band of rows at a
    time, so that a large output never has to exist whole.

    The arithmetic is that of ``F.interpolate(mode='bilinear', align_corners=False)`` in
    PyTorch's vectorised CPU loop: each source row interpolated along the width, then pairs
    of those rows along the height, with fused multiply-adds and float32 weights computed as
    PyTorch computes them. For maps upsampled to real image sizes the values are then
    F.interpolate's exactly (in our tests on x86-64); its other loops (small outputs, other
    CPUs) can round the last bit differently. Bands of any height give identical values,
    so :meth:`Geometry.to_image` (which uses this class) and code that writes a map band by
    band (``skpatchcore predict``) agree exactly everywhere.

    Parameters
    ----------
    src : ndarray (h, w)
    out_hw : (int, int)
    """

    def __init__(self, src, out_hw):
        src = np.ascontiguousarray(src, dtype=np.float32)
        self.shape = (int(out_hw[0]), int(out_hw[1]))
        h, w = src.shape
        H, W = self.shape
        if (h, w) == (H, W):
            self._rows, self._y = src, None
            return
        if w != W:  # along the width: (h, W), small
            x0, x1, wx0, wx1 = _linear_weights(w, W)
            src = _fma(src[:, x0], wx0, src[:, x1] * wx1)
        self._rows = src
        self._y = _linear_weights(h, H) if h != H else None

    def rows(self, y0, y1):
        """Rows ``[y0, y1)`` of the resized map, float32 (y1 - y0, W)."""
        if self._y is None:
            return self._rows[y0:y1]
        i0, i1, w0, w1 = (a[y0:y1] for a in self._y)
        return _fma(self._rows[i0], w0[:, None], self._rows[i1] * w1[:, None])

    def bands(self, max_pixels=_BAND_PIXELS):
        """``(y0, y1)`` of consecutive bands of at most about ``max_pixels`` pixels."""
        H, W = self.shape
        step = max(1, max_pixels // max(W, 1))
        return [(y0, min(H, y0 + step)) for y0 in range(0, H, step)]

    def fill(self):
        """The whole resized map, float32 (H, W): one array, filled band by band."""
        if self._y is None:
            return self._rows
        out = np.empty(self.shape, dtype=np.float32)
        for y0, y1 in self.bands():
            out[y0:y1] = self.rows(y0, y1)
        return out


class Geometry:
    """The resize / letterbox / crop that maps an image into the network input, both ways.

    Parameters
    ----------
    image_size : int or (int, int)
        The frame every image is resized into.
    resize_mode : {'letterbox', 'stretch', 'pad'}
    crop_size : int or (int, int) or None
        Centre crop taken from the frame; None takes the whole frame.
    """

    def __init__(self, image_size, resize_mode, crop_size=None):
        self.frame = as_hw(image_size, "image_size")
        self.resize_mode = resize_mode
        self.crop = as_hw(crop_size, "crop_size")
        if self.crop is not None and (self.crop[0] > self.frame[0]
                                      or self.crop[1] > self.frame[1]):
            raise ValueError(f"crop_size={crop_size!r} is larger than image_size="
                             f"{image_size!r}.")

    @property
    def input_size(self):
        """(height, width) of the network input: the crop, or the whole frame."""
        return self.crop if self.crop is not None else self.frame

    def crop_offset(self):
        """(top, left) of the crop inside the frame ((0, 0) without a crop)."""
        if self.crop is None:
            return 0, 0
        return (self.frame[0] - self.crop[0]) // 2, (self.frame[1] - self.crop[1]) // 2

    def image_box(self, src_hw):
        """(top, left, bottom, right) of the image's own pixels in the network input."""
        top, left, nh, nw = frame_geometry(src_hw, self.frame, self.resize_mode)
        bottom, right = top + nh, left + nw
        if self.crop is not None:
            dy, dx = self.crop_offset()
            top, bottom = max(top - dy, 0), min(bottom - dy, self.crop[0])
            left, right = max(left - dx, 0), min(right - dx, self.crop[1])
        return top, left, bottom, right

    def reduction_factor(self, src_hw):
        """The integer factor by which an image of ``src_hw`` is shrunk before the resize.

        A decoded image far larger than the place it takes in the frame (``frame_geometry``
        (nh, nw)) is first shrunk by a box filter of ``f`` x ``f`` pixels in its own pixel
        type (:mod:`skpatchcore._images`), so that no float32 copy of it is ever made; the
        antialiased resize of :meth:`to_input` then does the real work from an image still
        at least twice (nh, nw) in both dimensions. ``f`` is the largest integer with
        ``H // f >= 2 * nh`` and ``W // f >= 2 * nw``, lowered (rarely) until the shrunk
        size ``(ceil(H / f), ceil(W / f))`` lands on exactly the same place in the frame as
        ``(H, W)``; 1 means no shrinking, which is the case for every image smaller than
        about four times (nh, nw) in either dimension (at the default 320 px frame: images up
        to about 1280 px).

        Examples
        --------
        >>> g = Geometry(320, "letterbox")
        >>> g.reduction_factor((12000, 12000)), g.reduction_factor((1000, 1000))
        (18, 1)
        """
        h, w = (int(v) for v in src_hw)
        place = frame_geometry((h, w), self.frame, self.resize_mode)
        nh, nw = place[2:]
        f = min(h // (2 * nh), w // (2 * nw))
        while f >= 2:
            shrunk = (-(-h // f), -(-w // f))
            if frame_geometry(shrunk, self.frame, self.resize_mode) == place:
                return f
            f -= 1
        return 1

    def to_input(self, image):
        """float (3, H, W) in [0, 1] -> the network input (3, h, w): resized into the frame
        (antialiased bilinear), centred on mid-grey when letterboxed, then cropped."""
        src_hw = tuple(image.shape[1:])
        top, left, nh, nw = frame_geometry(src_hw, self.frame, self.resize_mode)
        if src_hw != (nh, nw):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear",
                                  align_corners=False, antialias=True)[0]
        return self.place(image, src_hw)

    def place(self, resized, src_hw):
        """The resized image (..., 3, nh, nw) of an image of ``src_hw`` -> the network input
        (..., 3, h, w): centred on mid-grey in the frame when letterboxed, then cropped
        (the steps of :meth:`to_input` after its resize; any leading batch axes)."""
        top, left, nh, nw = frame_geometry(tuple(src_hw), self.frame, self.resize_mode)
        H, W = self.frame
        if (nh, nw) != self.frame:
            resized = F.pad(resized, (left, W - left - nw, top, H - top - nh),
                            value=LETTERBOX_FILL)
        if self.crop is not None:
            dy, dx = self.crop_offset()
            resized = resized[..., dy : dy + self.crop[0], dx : dx + self.crop[1]]
        return resized

    def resize_weights(self, src_hw):
        """The resize of :meth:`to_input` as two matrices: ``(wy, wx)``, float32 of shapes
        (nh, H) and (nw, W), such that the resized image is ``wy @ image @ wx.T`` (per
        channel) up to float32 rounding. Each is the antialiased bilinear resize that
        :meth:`to_input` applies, applied to the identity along one axis."""
        H, W = (int(v) for v in src_hw)
        _, _, nh, nw = frame_geometry((H, W), self.frame, self.resize_mode)

        def resize(size, n):  # the identity (n, n), resized to ``size``
            eye = torch.eye(n, dtype=torch.float32)[None, None]
            return F.interpolate(eye, size=size, mode="bilinear", align_corners=False,
                                 antialias=True)[0, 0]

        return resize((nh, H), H).numpy(), resize((W, nw), W).T.contiguous().numpy()

    def image_region(self, amap, src_hw):
        """The part of a map over the network input (h, w) that covers an image of
        ``src_hw``, at network-input resolution: put back into the frame (0 outside a crop,
        i.e. no evidence) and cut to the image's place in it (the letterbox padding away).
        :meth:`to_image` resizes it to ``src_hw``."""
        if self.crop is not None:
            frame = np.zeros(self.frame, dtype=np.float32)
            dy, dx = self.crop_offset()
            frame[dy : dy + self.crop[0], dx : dx + self.crop[1]] = amap
            amap = frame
        top, left, nh, nw = frame_geometry(tuple(src_hw), self.frame, self.resize_mode)
        return np.asarray(amap, dtype=np.float32)[top : top + nh, left : left + nw]

    def image_rows(self, amap, src_hw):
        """:meth:`to_image` as a :class:`BilinearRows`: the map on the image's own pixels,
        a band of rows at a time (identical values)."""
        return BilinearRows(self.image_region(amap, src_hw), tuple(int(v) for v in src_hw))

    def to_image(self, amap, src_hw):
        """A map over the network input (h, w) -> the same map on the image's own pixels.

        Pixels outside a crop get 0 (no evidence); the letterbox padding is cut away and the
        rest is resized bilinearly to ``src_hw`` (:class:`BilinearRows`: the arithmetic of
        ``F.interpolate``, into one float32 (H, W) array without full-size temporaries).
        """
        return self.image_rows(amap, src_hw).fill()

    def grids_to_images(self, grids, sizes, sigma):
        """Patch-score grids (n, gh, gw) -> one map per image at its own (H, W): upsampled
        to the network input, smoothed with ``sigma`` input pixels, then :meth:`to_image`."""
        check_sigma(sigma)
        out = []
        for grid, src_hw in zip(grids, sizes, strict=True):
            up = upsample_maps(grid[None], self.input_size, sigma)[0]
            out.append(self.to_image(up, tuple(src_hw)))
        return out
