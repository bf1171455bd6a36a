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

__all__ = ["Geometry", "as_hw", "check_sigma", "frame_geometry", "upsample_maps"]

# Letterbox padding: mid grey, which both normalisations map to about 0.
LETTERBOX_FILL = 0.5


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
    for 'stretch'; the largest aspect-preserving fit, centred, for 'letterbox'.

    Examples
    --------
    >>> frame_geometry((100, 200), (64, 64), "letterbox")
    (16, 0, 32, 64)
    >>> frame_geometry((100, 200), (64, 64), "stretch")
    (0, 0, 64, 64)
    """
    H, W = image_size
    if resize_mode == "stretch":
        return 0, 0, H, W
    h, w = src_hw
    scale = min(H / h, W / w)
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


class Geometry:
    """The resize / letterbox / crop that maps an image into the network input, both ways.

    Parameters
    ----------
    image_size : int or (int, int)
        The frame every image is resized into.
    resize_mode : {'letterbox', 'stretch'}
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

    def to_input(self, image):
        """float (3, H, W) in [0, 1] -> the network input (3, h, w): resized into the frame
        (antialiased bilinear), centred on mid-grey when letterboxed, then cropped."""
        top, left, nh, nw = frame_geometry(tuple(image.shape[1:]), self.frame,
                                           self.resize_mode)
        if tuple(image.shape[1:]) != (nh, nw):
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear",
                                  align_corners=False, antialias=True)[0]
        if (nh, nw) != self.frame:
            frame = torch.full((3,) + self.frame, LETTERBOX_FILL, dtype=image.dtype)
            frame[:, top : top + nh, left : left + nw] = image
            image = frame
        if self.crop is not None:
            dy, dx = self.crop_offset()
            image = image[:, dy : dy + self.crop[0], dx : dx + self.crop[1]]
        return image

    def to_image(self, amap, src_hw):
        """A map over the network input (h, w) -> the same map on the image's own pixels.

        Pixels outside a crop get 0 (no evidence); the letterbox padding is cut away and the
        rest is resized bilinearly to ``src_hw``.
        """
        if self.crop is not None:
            frame = np.zeros(self.frame, dtype=np.float32)
            dy, dx = self.crop_offset()
            frame[dy : dy + self.crop[0], dx : dx + self.crop[1]] = amap
            amap = frame
        top, left, nh, nw = frame_geometry(src_hw, self.frame, self.resize_mode)
        amap = amap[top : top + nh, left : left + nw]
        h, w = src_hw
        if amap.shape != (h, w):
            amap = F.interpolate(
                torch.from_numpy(np.ascontiguousarray(amap))[None, None], size=(h, w),
                mode="bilinear", align_corners=False,
            )[0, 0].numpy()
        return amap.astype(np.float32, copy=False)

    def grids_to_images(self, grids, sizes, sigma):
        """Patch-score grids (n, gh, gw) -> one map per image at its own (H, W): upsampled
        to the network input, smoothed with ``sigma`` input pixels, then :meth:`to_image`."""
        check_sigma(sigma)
        out = []
        for grid, src_hw in zip(grids, sizes, strict=True):
            up = upsample_maps(grid[None], self.input_size, sigma)[0]
            out.append(self.to_image(up, tuple(src_hw)))
        return out
