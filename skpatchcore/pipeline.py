"""A Pipeline that reaches ``predict_map`` from raw images, and the standard PatchCore pipeline."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.pipeline import Pipeline
from sklearn.utils.metaestimators import available_if

from ._images import check_images
from .coreset import CoresetSampler
from .detector import PatchCoreDetector, upsample_maps
from .features import FeatureExtractor, _as_hw, frame_geometry

__all__ = ["PatchCorePipeline", "make_anomaly_pipeline", "make_patchcore"]


def _final_has(name):
    def check(self):
        getattr(self._final_estimator, name)  # raises AttributeError with the class name
        return True

    return check


def _extractor_of(pipeline):
    for _, step in pipeline.steps[:-1]:
        if isinstance(step, FeatureExtractor):
            return step
    raise AttributeError(
        "predict_map on raw images needs a FeatureExtractor step to know the resize; call "
        "the final step's predict_map on features instead."
    )


class PatchCorePipeline(Pipeline):
    """:class:`~sklearn.pipeline.Pipeline` that also forwards ``predict_map`` and
    ``predict_mask``, mapping anomaly maps back to every input image's own pixels.

    It behaves exactly like a Pipeline otherwise (``clone``, slicing, ``GridSearchCV``).
    The two extra methods are available when the final step has ``predict_map``.
    """

    def fit(self, X, y=None, **params):
        """Fit the steps; features -> coreset -> PatchCore streams in bounded memory.

        For the standard three steps (:func:`make_patchcore`, no ``memory``, no fit
        parameters) the training features are never held in memory at once: each batch of
        images is embedded, randomly projected for the coreset selection and written to a
        temporary file; the selected rows are read back into the memory bank, and the
        leave-one-out training scores read the file a few images at a time. The result is
        identical to fitting the steps one after another. Any other pipeline fits as
        :meth:`sklearn.pipeline.Pipeline.fit` does.

        Parameters
        ----------
        X : images
            Normal training images, in any form FeatureExtractor accepts.
        y : array-like of shape (n_images,), default=None
            Images labelled -1 are left out of the memory bank.
        **params
            Fit parameters routed as in :class:`~sklearn.pipeline.Pipeline`.

        Returns
        -------
        self : PatchCorePipeline
        """
        if params or not self._streams():
            return super().fit(X, y, **params)
        self._validate_params()
        self._validate_steps()
        extractor, sampler, detector = (step for _, step in self.steps)
        images = check_images(X)
        extractor.fit(images)
        sample_shape = tuple(extractor.grid_shape_) + (extractor.feature_dim_,)
        bank = sampler._fit_stream(extractor._iter_batches(images), len(images), sample_shape, y)
        try:
            detector.fit(bank)
        finally:
            bank.source.close()
        return self

    def _streams(self):
        kinds = (FeatureExtractor, CoresetSampler, PatchCoreDetector)
        return (self.memory is None and len(self.steps) == len(kinds)
                and all(type(step) is kind for (_, step), kind in zip(self.steps, kinds,
                                                                        strict=True)))

    @available_if(_final_has("predict_map"))
    def predict_map(self, X, sigma=4.0):
        """Pixel anomaly maps at each input image's own resolution.

        Parameters
        ----------
        X : images
            Any form FeatureExtractor accepts.
        sigma : float, default=4.0
            Gaussian smoothing, in pixels of the network input (the paper's code uses 4 at
            224 px); 0 disables.

        Returns
        -------
        maps : ndarray (n, H, W) when all images share one size, else list of (H_i, W_i),
            float32. Higher = more anomalous, same units as ``-score_samples``. The patch grid
            is upsampled bilinearly to the network input, smoothed, placed back into the
            resized frame (pixels outside a ``crop_size`` crop get 0, i.e. no evidence), cut
            to the image's place in the frame (letterbox) and resized to the original size:
            the extractor's resize, padding and crop are undone.
        """
        images = check_images(X)
        sizes = images.sizes()
        Xt = images
        for _, _, step in self._iter(with_final=False):
            Xt = step.transform(Xt)
        grids = self._final_estimator.predict_map(Xt)
        maps = _grids_to_images(grids, sizes, _extractor_of(self), sigma)
        if len({m.shape for m in maps}) == 1:
            return np.stack(maps)
        return maps

    @available_if(_final_has("calibrate"))
    def calibrate(self, X, fpr=0.01):
        """Set the final detector's threshold from held-out normal images (see
        :meth:`PatchCoreDetector.calibrate`); returns self."""
        Xt = X
        for _, _, step in self._iter(with_final=False):
            Xt = step.transform(Xt)
        self._final_estimator.calibrate(Xt, fpr=fpr)
        return self

    @available_if(_final_has("predict_map"))
    def predict_mask(self, X, threshold=None, sigma=4.0):
        """Boolean defect masks at each input image's own resolution.

        Parameters
        ----------
        X : images
        threshold : float or None, default=None
            Pixel threshold on :meth:`predict_map` values. None uses ``-offset_`` of the final
            detector, which was calibrated on normal training images only (leave-one-out):
            a pixel is marked when its anomaly exceeds the image-level threshold.
        sigma : float, default=4.0
            As in :meth:`predict_map`.

        Returns
        -------
        masks : ndarray of bool (n, H, W), or a list when sizes differ.
        """
        if threshold is None:
            threshold = -self._final_estimator.offset_
        maps = self.predict_map(X, sigma=sigma)
        if isinstance(maps, list):
            return [m > threshold for m in maps]
        return maps > threshold


def _grids_to_images(grids, sizes, extractor, sigma):
    """Undo the extractor's resize (and crop) for each patch grid."""
    resized = _as_hw(extractor.image_size, "image_size")
    mode = extractor.resize_mode
    crop = _as_hw(extractor.crop_size, "crop_size")
    net_in = crop if crop is not None else resized
    up = upsample_maps(grids, net_in, sigma)
    out = []
    for amap, (h, w) in zip(up, sizes, strict=True):
        if crop is not None:
            frame = np.zeros(resized, dtype=np.float32)
            top, left = (resized[0] - crop[0]) // 2, (resized[1] - crop[1]) // 2
            frame[top : top + crop[0], left : left + crop[1]] = amap
            amap = frame
        top, left, nh, nw = frame_geometry((h, w), resized, mode)
        amap = amap[top : top + nh, left : left + nw]
        if amap.shape != (h, w):
            amap = F.interpolate(
                torch.from_numpy(np.ascontiguousarray(amap))[None, None], size=(h, w),
                mode="bilinear", align_corners=False,
            )[0, 0].numpy()
        out.append(amap.astype(np.float32))
    return out


def make_patchcore(**params):
    """The standard three steps, features -> coreset -> detector, as a PatchCorePipeline.

    Parameters
    ----------
    **params
        Any parameter of :class:`FeatureExtractor`, :class:`CoresetSampler` or
        :class:`PatchCoreDetector`, by its plain name (``image_size=256``,
        ``sampling_ratio=0.01``, ``contamination=0.05``); each goes to every step that has it
        (``device`` to all three, ``random_state`` to the sampler). Unknown names raise.

    Returns
    -------
    pipeline : PatchCorePipeline
        Steps named 'features', 'coreset' and 'detector', so grid-search parameters read
        ``coreset__sampling_ratio``, ``features__patch_size`` and so on.

    Examples
    --------
    >>> from skpatchcore import make_patchcore
    >>> pipe = make_patchcore(image_size=256, sampling_ratio=0.01, random_state=0)
    >>> pipe.get_params()["coreset__sampling_ratio"]
    0.01
    """
    return make_anomaly_pipeline("patchcore", **params)


def make_anomaly_pipeline(method="patchcore", **params):
    """A PatchCorePipeline for one of the memory-bank family on the same features.

    Parameters
    ----------
    method : {'patchcore', 'spade', 'padim'}, default='patchcore'
        'patchcore': features -> coreset -> PatchCoreDetector; 'spade': features -> coreset
        (``sampling_ratio=1.0`` keeps the full bank, as in the paper) -> SPADEDetector;
        'padim': features -> PaDiMDetector (a Gaussian per position needs every image's
        grid, so there is no coreset step).
    **params
        Parameters of the steps by plain name, as in :func:`make_patchcore`.

    Returns
    -------
    pipeline : PatchCorePipeline
    """
    from .padim import PaDiMDetector
    from .spade import SPADEDetector

    detectors = {"patchcore": PatchCoreDetector, "spade": SPADEDetector,
                 "padim": PaDiMDetector}
    if method not in detectors:
        raise ValueError(f"method={method!r} is not one of {sorted(detectors)}.")
    steps = [("features", FeatureExtractor())]
    if method != "padim":
        steps.append(("coreset", CoresetSampler()))
    steps.append(("detector", detectors[method]()))
    unused = set(params)
    for _, step in steps:
        own = {k: v for k, v in params.items() if k in step.get_params(deep=False)}
        step.set_params(**own)
        unused -= set(own)
    if unused:
        raise TypeError(
            f"Unknown parameters {sorted(unused)} for method {method!r}; valid names are the "
            f"parameters of the steps {[type(s).__name__ for _, s in steps]}."
        )
    return PatchCorePipeline(steps)
