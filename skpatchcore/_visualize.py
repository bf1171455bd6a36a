"""Heat-map overlays a person can open: image | colour map over the image, regions outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion

from ._images import check_images

__all__ = ["colorize", "overlay", "save_overlays"]

# A perceptually ordered dark-blue -> cyan -> yellow -> red ramp (anchor colours, RGB).
_RAMP = np.array(
    [[48, 18, 59], [70, 107, 227], [40, 187, 236], [50, 241, 152], [164, 252, 60],
     [237, 208, 58], [251, 128, 34], [208, 47, 5], [122, 4, 3]], dtype=np.float64,
)


def colorize(values):
    """Map values in [0, 1] to RGB uint8 with the ramp above."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_RAMP) - 1)
    t = (v - lo)[..., None]
    return ((1 - t) * _RAMP[lo] + t * _RAMP[hi]).astype(np.uint8)


def _outline(mask):
    return mask & ~binary_erosion(mask, iterations=1, border_value=0)


def overlay(image, amap, *, vmin, vmax, threshold=None, mask=None, alpha=0.5):
    """One overlay panel: the map's colours blended over the image.

    The predicted region (``amap > threshold``) is outlined in white, the ground-truth mask,
    when given, in green.
    """
    heat = colorize((amap - vmin) / max(vmax - vmin, 1e-12))
    out = ((1 - alpha) * image + alpha * heat).astype(np.uint8)
    if threshold is not None:
        out[_outline(amap > threshold)] = (255, 255, 255)
    if mask is not None:
        out[_outline(np.asarray(mask, dtype=bool))] = (0, 255, 0)
    return out


def save_overlays(images, maps, folder, *, masks=None, scores=None, threshold=None):
    """Write ``<name>_overlay.png`` per image: original | overlay, side by side.

    All maps share one colour scale, from the 1st percentile of all map values to
    ``max(2 * threshold, 99.9th percentile)``, so colours compare across images. Returns the
    list of written paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    imgs = check_images(images)
    sample = np.concatenate([np.ravel(m)[:: max(1, np.size(m) // 4096)] for m in maps])
    vmin = float(np.percentile(sample, 1))
    vmax = float(np.percentile(sample, 99.9))
    if threshold is not None:
        vmax = max(vmax, 2 * threshold - vmin)
    written = []
    for i in range(len(imgs)):
        rgb = (imgs[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        panel = overlay(rgb, maps[i], vmin=vmin, vmax=vmax, threshold=threshold,
                        mask=None if masks is None else masks[i])
        name = Path(imgs.name(i).split("'")[1]).stem if "'" in imgs.name(i) else f"{i:05d}"
        if scores is not None:
            name = f"{name}_score{scores[i]:.3f}"
        path = folder / f"{i:04d}_{name}_overlay.png"
        Image.fromarray(np.concatenate([rgb, panel], axis=1)).save(path)
        written.append(path)
    return written
