"""Heat-map overlays a person can open: image | colour map over the image, regions outlined.

The colours come from matplotlib's ``'turbo'`` colormap (:data:`COLORMAP`): dark blue for the
lowest map values, through cyan, green and yellow, to dark red for the highest. Every overlay
of one call shares one scale (:func:`colour_scale`), so colours compare across images; the
HTML report (``skpatchcore._report``) draws that scale with its values.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion

from ._images import check_images

__all__ = ["COLORMAP", "colorize", "colour_scale", "overlay", "save_overlays"]

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


def colour_scale(maps, threshold=None):
    """The ``(vmin, vmax)`` shared by all overlays of ``maps``.

    From the 1st percentile of all map values to ``max(2 * threshold - vmin, 99.9th
    percentile)``, on a sample of at most ~4096 values per map (so the cost does not grow with
    the image size). With the default, the threshold sits in the middle of the scale or lower.
    """
    sample = np.concatenate([np.ravel(m)[:: max(1, np.size(m) // 4096)].astype(np.float64)
                             for m in maps])
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
    heat = _lut()[_levels(amap, vmin, vmax)]
    out = np.asarray(image, dtype=np.float32) * np.float32(1 - alpha)
    out += heat * np.float32(alpha)
    out = out.astype(np.uint8)
    if threshold is not None:
        out[_outline(np.asarray(amap) > threshold)] = (255, 255, 255)
    if mask is not None:
        out[_outline(np.asarray(mask, dtype=bool))] = (0, 255, 0)
    return out


def _stem(images, imgs, i):
    items = images if isinstance(images, list | tuple) else None
    if items is not None and isinstance(items[i], str | os.PathLike):
        return Path(items[i]).stem
    name = imgs.name(i)
    return Path(name.split("'")[1]).stem if "'" in name else f"{i:05d}"


def save_overlays(images, maps, folder, *, masks=None, scores=None, threshold=None):
    """Write ``<index>_<name>[_score<s>]_overlay.png`` per image: original | overlay.

    All maps share one colour scale (:func:`colour_scale`), so colours compare across images.
    Each image is read, blended and written on its own (uint8 and float32), so memory does not
    grow with the number of images. Returns the list of written paths, in input order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    imgs = check_images(images)
    vmin, vmax = colour_scale(maps, threshold)
    written = []
    for i in range(len(imgs)):
        rgb = (imgs[i].permute(1, 2, 0).numpy() * np.float32(255)).round().astype(np.uint8)
        panel = overlay(rgb, maps[i], vmin=vmin, vmax=vmax, threshold=threshold,
                        mask=None if masks is None else masks[i])
        name = _stem(images, imgs, i)
        if scores is not None:
            name = f"{name}_score{scores[i]:.3f}"
        path = folder / f"{i:04d}_{name}_overlay.png"
        Image.fromarray(np.concatenate([rgb, panel], axis=1)).save(path)
        written.append(path)
    return written
