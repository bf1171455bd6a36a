"""Heat-map overlays a person can open: image | colour map over the image, regions outlined.

The colours come from matplotlib's ``'turbo'`` colormap (:data:`COLORMAP`): dark blue for the
lowest map values, through cyan, green and yellow, to dark red for the highest. Every overlay
of one call shares one scale (:func:`colour_scale`), so colours compare across images; the
HTML report (``skpatchcore._report``) draws that scale with its values.

Overlays and masks are written a band of rows at a time (:func:`write_overlay`,
:func:`write_mask`, through a streaming PNG encoder), so a file costs the memory of one band,
whatever the image's size.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_erosion

from ._images import check_images

__all__ = ["COLORMAP", "colorize", "colour_scale", "colour_scale_sample", "overlay",
           "overlay_name", "save_overlays", "write_mask", "write_overlay"]

#: Values of one map that :func:`colour_scale` looks at (a regular sample).
SCALE_SAMPLE = 4096
# Output pixels blended and encoded at once (bounds the temporaries of one band).
_BAND_PIXELS = 1 << 20
# zlib level of the PNG files (Pillow's default).
_PNG_LEVEL = 6

#: Name of the matplotlib colormap of the overlays (named in the docs and the report legend).
COLORMAP = "turbo"


@lru_cache(maxsize=4)
def _lut(name=COLORMAP):
    """The colormap as a read-only (256, 3) uint8 table."""
    from matplotlib import colormaps

    table = (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).round()
    table = table.astype(np.uint8)
    table.flags.writeable = False
    return table


def _levels(values, vmin=0.0, vmax=1.0):
    """Values -> uint8 indices 0..255 into the colormap table, in float32."""
    values = np.asarray(values, dtype=np.float32)
    scale = np.float32(255.0 / max(float(vmax) - float(vmin), 1e-12))
    level = (values - np.float32(vmin)) * scale
    np.nan_to_num(level, copy=False, nan=0.0)
    np.clip(level, 0.0, 255.0, out=level)
    level += np.float32(0.5)
    return level.astype(np.uint8)


def colorize(values):
    """Map values in [0, 1] to RGB uint8 with the :data:`COLORMAP` colormap (clipped)."""
    return _lut()[_levels(values)]


def colour_scale_sample(amap, size=SCALE_SAMPLE):
    """The values of one map that :func:`colour_scale` uses: every k-th value in row-major
    order, at most about ``2 * size`` of them, as float32."""
    return np.ravel(amap)[:: max(1, np.size(amap) // size)].astype(np.float32)


def colour_scale(maps, threshold=None, *, samples=None):
    """The ``(vmin, vmax)`` shared by all overlays of ``maps``.

    From the 1st percentile of all map values to ``max(2 * threshold - vmin, 99.9th
    percentile)``, on a sample of at most ~4096 values per map (so the cost does not grow with
    the image size). With the default, the threshold sits in the middle of the scale or lower.
    ``samples`` (a list of :func:`colour_scale_sample` of each map, instead of ``maps``) lets
    a caller keep only those: ``skpatchcore predict`` takes them from each image's map at the
    resolution of the network input, before it is resized to the image.
    """
    if samples is None:
        samples = [colour_scale_sample(m) for m in maps]
    sample = np.concatenate([np.asarray(v, dtype=np.float64) for v in samples])
    vmin = float(np.percentile(sample, 1))
    vmax = float(np.percentile(sample, 99.9))
    if threshold is not None:
        vmax = max(vmax, 2 * threshold - vmin)
    return vmin, vmax


def _outline(mask):
    return mask & ~binary_erosion(mask, iterations=1, border_value=0)


def overlay(image, amap, *, vmin, vmax, threshold=None, mask=None, alpha=0.5):
    """One overlay panel: the map's colours blended over the image (uint8 RGB).

    The predicted region (``amap > threshold``) is outlined in white, the ground-truth mask,
    when given, in green. Works in uint8 and float32 on this one image.
    """
    amap = np.asarray(amap)
    return _panel(image, amap, amap, 0, vmin=vmin, vmax=vmax, threshold=threshold,
                  mask=None if mask is None else np.asarray(mask, dtype=bool),
                  alpha=alpha)


def _panel(image, amap, halo_map, top, *, vmin, vmax, threshold=None, mask=None,
           halo_mask=None, alpha=0.5):
    """:func:`overlay` of a band of rows: ``image`` and ``amap`` are the band; ``halo_map``
    (and ``halo_mask``) the same rows plus the row above and below where the image has
    them, the band starting at row ``top`` of it, so that outlines are those of the whole
    image."""
    heat = _lut()[_levels(amap, vmin, vmax)]
    out = np.asarray(image, dtype=np.float32) * np.float32(1 - alpha)
    out += heat * np.float32(alpha)
    out = out.astype(np.uint8)
    rows = slice(top, top + len(out))
    if threshold is not None:
        out[_outline(np.asarray(halo_map) > threshold)[rows]] = (255, 255, 255)
    if mask is not None:
        ring = halo_mask if halo_mask is not None else mask
        out[_outline(np.asarray(ring, dtype=bool))[rows]] = (0, 255, 0)
    return out


# --------------------------------------------------------------------------- PNG, streamed
def _paeth(a, b, c):
    """PNG's Paeth predictor of int16 arrays (left, up, up-left)."""
    pa = np.abs(b - c)
    pb = np.abs(a - c)
    pc = np.abs(a + b - 2 * c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _filter_rows(raw, prior, bpp):
    """PNG-filter rows of bytes (r, L) given the row above the first (L,): for each row the
    filter (None, Sub, Up, Average or Paeth) with the smallest sum of absolute values, as
    libpng and Pillow choose; returns (r, 1 + L) uint8, filter type first."""
    raw16 = raw.astype(np.int16)
    up = np.empty_like(raw16)
    up[0] = prior
    up[1:] = raw16[:-1]
    left = np.zeros_like(raw16)
    left[:, bpp:] = raw16[:, :-bpp]
    upleft = np.zeros_like(raw16)
    upleft[:, bpp:] = up[:, :-bpp]
    preds = (None, left, up, (left + up) >> 1, _paeth(left, up, upleft))
    best = np.empty((len(raw), raw.shape[1] + 1), dtype=np.uint8)
    best_cost = np.full(len(raw), np.iinfo(np.int64).max)
    for kind, pred in enumerate(preds):
        filtered = raw if pred is None else (raw16 - pred).astype(np.uint8)
        cost = np.abs(filtered.view(np.int8).astype(np.int16)).sum(axis=1, dtype=np.int64)
        better = cost < best_cost
        if better.any():
            best_cost[better] = cost[better]
            best[better, 0] = kind
            best[better, 1:] = filtered[better]
    return best


class _PNGWriter:
    """A PNG file written a band of rows at a time (8-bit grayscale or RGB)."""

    def __init__(self, path, height, width, channels):
        self._path = Path(path)
        self._fh = open(self._path, "wb")
        self._shape = (int(height), int(width), int(channels))
        self._rows = 0
        self._prior = np.zeros(width * channels, dtype=np.int16)
        self._zip = zlib.compressobj(_PNG_LEVEL)
        self._fh.write(b"\x89PNG\r\n\x1a\n")
        colour = {1: 0, 3: 2}[channels]
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0))

    def _chunk(self, kind, data):
        self._fh.write(struct.pack(">I", len(data)) + kind + data)
        self._fh.write(struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)) & 0xFFFFFFFF))

    def write(self, rows):
        """Append rows: uint8 (r, W) or (r, W, C)."""
        h, w, c = self._shape
        raw = np.ascontiguousarray(rows, dtype=np.uint8).reshape(len(rows), w * c)
        if self._rows + len(raw) > h:
            raise ValueError(f"{self._path}: more than {h} rows written.")
        data = self._zip.compress(_filter_rows(raw, self._prior, c).tobytes())
        if data:
            self._chunk(b"IDAT", data)
        self._prior = raw[-1].astype(np.int16)
        self._rows += len(raw)

    def close(self):
        """Finish the file (all rows must have been written)."""
        if self._rows != self._shape[0]:
            raise ValueError(f"{self._path}: {self._rows} of {self._shape[0]} rows written.")
        self._chunk(b"IDAT", self._zip.flush())
        self._chunk(b"IEND", b"")
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        try:
            if kind is None:
                self.close()
        finally:
            if kind is not None or not self._fh.closed:  # no partial file is left behind
                self._fh.close()
                self._path.unlink(missing_ok=True)


def _bands(height, width, max_pixels=_BAND_PIXELS):
    step = max(1, max_pixels // max(1, width))
    return [(y0, min(height, y0 + step)) for y0 in range(0, height, step)]


def write_mask(path, map_rows, shape, threshold):
    """Write ``map > threshold`` as an 8-bit grayscale PNG (255 = defect), band by band.

    ``map_rows(y0, y1)`` gives rows [y0, y1) of the (H, W) map (e.g.
    :meth:`BilinearRows.rows <skpatchcore._geometry.BilinearRows.rows>`); ``shape`` is
    (H, W)."""
    height, width = shape
    with _PNGWriter(path, height, width, 1) as png:
        for y0, y1 in _bands(height, width):
            png.write((map_rows(y0, y1) > threshold).astype(np.uint8) * np.uint8(255))
    return Path(path)


def write_overlay(path, image_rows, map_rows, shape, *, vmin, vmax, threshold=None,
                  mask_rows=None, mask_path=None):
    """Write one overlay PNG, original | :func:`overlay`, a band of rows at a time.

    ``image_rows(y0, y1)`` gives uint8 RGB rows of the image, ``map_rows(y0, y1)`` float
    rows of its map, ``mask_rows(y0, y1)`` (optional) boolean rows of a ground-truth mask;
    ``shape`` is (H, W). The pixels equal those of ``overlay`` on the whole image; only one
    band (plus a row above and below, for the outlines) is in memory at a time. With
    ``mask_path``, :func:`write_mask`'s file (``map > threshold``) is written there from
    the same rows.
    """
    height, width = shape
    if mask_path is not None and threshold is None:
        raise ValueError("write_overlay: mask_path needs a threshold (mask = map > threshold).")
    with contextlib.ExitStack() as files:
        png = files.enter_context(_PNGWriter(path, height, 2 * width, 3))
        masks = None if mask_path is None else files.enter_context(
            _PNGWriter(mask_path, height, width, 1))
        for y0, y1 in _bands(height, 2 * width):
            a, b = max(0, y0 - 1), min(height, y1 + 1)
            top = y0 - a
            halo = map_rows(a, b)
            amap = halo[top : top + y1 - y0]
            halo_mask = None if mask_rows is None else mask_rows(a, b)
            rgb = image_rows(y0, y1)
            panel = _panel(rgb, amap, halo, top, vmin=vmin, vmax=vmax, threshold=threshold,
                           mask=None if halo_mask is None else halo_mask[top : top + y1 - y0],
                           halo_mask=halo_mask)
            png.write(np.concatenate([rgb, panel], axis=1))
            if masks is not None:
                masks.write((amap > threshold).astype(np.uint8) * np.uint8(255))
    return Path(path)


def overlay_name(index, stem, score=None):
    """``<index>_<name>[_score<s>]_overlay.png``, as :func:`save_overlays` names files."""
    name = stem if score is None else f"{stem}_score{score:.3f}"
    return f"{index:04d}_{name}_overlay.png"


def _stem(images, imgs, i):
    items = images if isinstance(images, list | tuple) else None
    if items is not None and isinstance(items[i], str | os.PathLike):
        return Path(items[i]).stem
    name = imgs.name(i)
    return Path(name.split("'")[1]).stem if "'" in name else f"{i:05d}"


def save_overlays(images, maps, folder, *, masks=None, scores=None, threshold=None):
    """Write ``<index>_<name>[_score<s>]_overlay.png`` per image: original | overlay.

    All maps share one colour scale (:func:`colour_scale`), so colours compare across images.
    Each image is read and written on its own, a band of rows at a time
    (:func:`write_overlay`), so memory grows neither with the number of images nor (beyond
    the decoded file and its map) with their size. Returns the list of written paths, in
    input order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    imgs = check_images(images)
    vmin, vmax = colour_scale(maps, threshold)
    written = []
    for i in range(len(imgs)):
        amap = np.asarray(maps[i])
        mask = None if masks is None else np.asarray(masks[i], dtype=bool)
        path = folder / overlay_name(i, _stem(images, imgs, i),
                                     None if scores is None else scores[i])
        with imgs.pixels(i) as px:
            write_overlay(path, px.rgb8, lambda a, b, m=amap: m[a:b], px.shape, vmin=vmin,
                          vmax=vmax, threshold=threshold,
                          mask_rows=None if mask is None else (lambda a, b, m=mask: m[a:b]))
        written.append(path)
    return written
