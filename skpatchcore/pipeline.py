"""A Pipeline that reaches maps from raw images, and the standard PatchCore pipeline.

The steps themselves make any scikit-learn ``Pipeline`` of features -> coreset -> detector
fit in bounded memory (see :class:`PatchFeatures` and :class:`MemoryBank`); what this module
adds is the one path from images to scores and maps at each image's own pixels
(:meth:`PatchCorePipeline.score_and_map`, used by evaluate, and its chunked form
:meth:`PatchCorePipeline.iter_score_and_grids`, used by the CLI's predict).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from ._base import SCORE_CHUNK_ROWS
from ._geometry import check_sigma
from ._images import check_images
from ._utils import as_one_array, masks_above
from .coreset import CoresetSampler
from .detector import PatchCoreDetector
from .features import FeatureExtractor
from .padim import PaDiMDetector
from .spade import SPADEDetector

__all__ = ["DEFAULT_REWEIGHT_NEIGHBORS", "DEFAULT_SAMPLING_RATIO", "PatchCorePipeline",
           "make_anomaly_pipeline", "make_patchcore"]

#: The memory bank's share of the training patches in the pipelines of 'patchcore' and
#: 'spade' unless ``sampling_ratio`` is given (:func:`make_anomaly_pipeline`, and so the CLI
#: and evaluate): the setting measured in docs/benchmarks.md. ``CoresetSampler``'s own
#: default is the paper's 10%, which fits 3-4 times slower for a small gain.
DEFAULT_SAMPLING_RATIO = 0.01

#: ``n_reweight_neighbors`` of the 'patchcore' pipeline unless given: 1, so an image's score
#: is its largest patch distance, without the paper's reweighting. On MTD and tire, over
#: three seeds each, the plain maximum scored 0.003-0.011 higher image AUROC than b = 9 (the
#: paper's and ``PatchCoreDetector``'s own default) and skips the reweighting's search
#: (``benchmarks/score_probe.py``, docs/benchmarks.md).
DEFAULT_REWEIGHT_NEIGHBORS = 1


def _final_has(name):
    def check(self):
        getattr(self._final_estimator, name)  # raises AttributeError with the class name
        return True

    return check


def score_chunk_size(extractor):
    """Images per chunk that keep network batches and search chunks whole: the smallest
    common multiple of the fitted extractor's ``batch_size`` and the images per search chunk
    (``SCORE_CHUNK_ROWS // (h * w)``); when that exceeds 256 images, the search chunk times
    ``batch_size // chunk``, at least once. The default chunk of
    :meth:`PatchCorePipeline.iter_score_and_grids`, and the part of the images each task of
    :mod:`skpatchcore.distributed` handles."""
    cells = int(np.prod(extractor.grid_shape_))
    step = max(1, SCORE_CHUNK_ROWS // cells)
    batch = int(extractor.batch_size)
    chunk_size = math.lcm(step, batch)
    if chunk_size > 256:
        chunk_size = max(1, max(step, batch) // step) * step
    return chunk_size


class PatchCorePipeline(Pipeline):
    """:class:`~sklearn.pipeline.Pipeline` that also forwards ``score_and_map``,
    ``predict_map``, ``predict_mask`` and ``calibrate``, with maps on every input image's
    own pixels.

    It behaves exactly like a Pipeline otherwise (``fit``, ``clone``, slicing, ``memory=``,
    ``GridSearchCV``); a plain Pipeline of the same steps fits the identical model in the
    same bounded memory. The extra methods are available when the final step has them, and
    the maps need a :class:`FeatureExtractor` step (it knows the resize to undo).
    """

    def _extractor(self):
        for _, step in self.steps[:-1]:
            if isinstance(step, FeatureExtractor):
                return step
        raise AttributeError(
            "Maps on raw images need a FeatureExtractor step to know the resize; call the "
            "final step's predict_map on features instead."
        )

    def _features(self, X):
        Xt = X
        for _, _, step in self._iter(with_final=False):
            Xt = step.transform(Xt)
        return Xt

    @available_if(_final_has("score_and_map"))
    def score_and_map(self, X, sigma=4.0):
        """Image scores and pixel anomaly maps from one pass (each search done once).

        Parameters
        ----------
        X : images
            Any form FeatureExtractor accepts.
        sigma : float, default=4.0
            Gaussian smoothing of the maps, in pixels of the network input (the paper's code
            uses 4 at 224 px); 0 disables.

        Returns
        -------
        scores : ndarray of shape (n,), float64
            ``score_samples(X)``: lower = more abnormal.
        maps : ndarray (n, H, W) when all images share one size, else a list of (H_i, W_i),
            float32
            As :meth:`predict_map`: higher = more anomalous.
        """
        check_sigma(sigma)
        extractor = self._extractor()
        images = check_images(X)
        scores, grids = self._final_estimator.score_and_map(self._features(images))
        return scores, as_one_array(extractor.maps_to_images(grids, images.sizes(), sigma))

    @available_if(_final_has("score_and_map"))
    def iter_score_and_grids(self, X, chunk_size=None):
        """:meth:`score_and_map` a chunk of images at a time, with patch grids instead of
        full-resolution maps, so that memory does not grow with the number of images.

        Images far larger than the network frame are shrunk before the resize, in their
        own pixel type (:meth:`ImageList.decode <skpatchcore._images.ImageList.decode>`),
        so a huge image costs its decoded file, not a float32 copy of it.

        Parameters
        ----------
        X : images
            Any form FeatureExtractor accepts.
        chunk_size : int or None, default=None
            Images per chunk. None: the smallest common multiple of the extractor's
            ``batch_size`` and the images per search chunk of the detector (40 at the
            defaults; when that multiple exceeds 256 images, the search chunk times
            ``batch_size // chunk``, at least once), so that every search, and every
            network batch, holds the same images as in :meth:`score_samples`, whose scores
            these equal (the tests find them equal for any chunk size too). The chunk's
            features take about ``SCORE_CHUNK_ROWS * feature_dim_ * 4`` bytes (44 MB at the
            defaults), whatever the image size.

        Yields
        ------
        start : int
            Index in X of the chunk's first image.
        scores : ndarray of shape (b,), float64
            ``score_samples`` of the chunk's images (lower = more abnormal).
        grids : ndarray of shape (b, h, w), float32
            Their patch-score grids (higher = more anomalous): ``maps_to_images(grids,
            sizes, sigma)`` of the FeatureExtractor gives :meth:`score_and_map`'s maps, and
            its ``_geometry.image_rows`` gives them a band of rows at a time.
        """
        check_is_fitted(self)
        extractor = self._extractor()
        images = check_images(X).for_geometry(extractor._geometry)
        if chunk_size is None:
            chunk_size = score_chunk_size(extractor)
        for start in range(0, len(images), chunk_size):
            part = images.take(start, start + chunk_size)
            scores, grids = self._final_estimator.score_and_map(self._features(part))
            yield start, scores, grids

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
            the extractor's resize, padding and crop are undone
            (:meth:`FeatureExtractor.maps_to_images`).
        """
        check_sigma(sigma)
        extractor = self._extractor()
        images = check_images(X)
        grids = self._final_estimator.predict_map(self._features(images))
        return as_one_array(extractor.maps_to_images(grids, images.sizes(), sigma))

    @available_if(_final_has("calibrate"))
    def calibrate(self, X, fpr=0.01):
        """Set the final detector's threshold from held-out normal images (see
        :meth:`PatchCoreDetector.calibrate`); returns self."""
        self._final_estimator.calibrate(self._features(X), fpr=fpr)
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
        return masks_above(self.predict_map(X, sigma=sigma), threshold)


def make_patchcore(**params):
    """The standard three steps, features -> coreset -> detector, as a PatchCorePipeline.

    Parameters
    ----------
    **params
        Any parameter of :class:`FeatureExtractor`, :class:`CoresetSampler` or
        :class:`PatchCoreDetector`, by its plain name (``image_size=256``,
        ``sampling_ratio=0.1``, ``contamination=0.05``); each goes to every step that has it
        (``device`` to all three, ``random_state`` to the sampler). Unknown names raise.
        ``sampling_ratio`` defaults to :data:`DEFAULT_SAMPLING_RATIO` (1%) and
        ``n_reweight_neighbors`` to :data:`DEFAULT_REWEIGHT_NEIGHBORS` (1: the image score
        is the largest patch distance), as in the CLI.

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
        (1% by default, as PatchCore's; ``sampling_ratio=1.0`` keeps the full bank, as in the
        SPADE paper) -> SPADEDetector;
        'padim': features -> PaDiMDetector (a Gaussian per position needs every image's
        grid, so there is no coreset step).
    **params
        Parameters of the steps by plain name, as in :func:`make_patchcore`.

    Returns
    -------
    pipeline : PatchCorePipeline
    """
    detectors = {"patchcore": partial(PatchCoreDetector,
                                      n_reweight_neighbors=DEFAULT_REWEIGHT_NEIGHBORS),
                 "spade": SPADEDetector, "padim": PaDiMDetector}
    if method not in detectors:
        raise ValueError(f"method={method!r} is not one of {sorted(detectors)}.")
    steps = [("features", FeatureExtractor())]
    if method != "padim":
        steps.append(("coreset", CoresetSampler(sampling_ratio=DEFAULT_SAMPLING_RATIO)))
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
