"""Several anomaly models as one: each member's image scores and maps are put in units of
its own held-out good images and averaged (the PatchCore paper's best results ensemble
three networks)."""

from __future__ import annotations

from numbers import Real

import numpy as np
from sklearn.base import OutlierMixin, _fit_context, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.metaestimators import _BaseComposition
from sklearn.utils.validation import check_is_fitted, check_random_state

from ._base import PixelThresholdMixin, ThresholdMixin, contamination_offset, warn_if_few_held_out
from ._checks import check_model
from ._geometry import check_sigma
from ._images import check_images
from ._utils import as_one_array
from ._validation import normal_mask

__all__ = ["AnomalyEnsemble", "make_ensemble"]

#: The members of :func:`make_ensemble`: name -> the backbone and frame of each PatchCore
#: pipeline (docs/benchmarks.md, "Two members across input sizes").
ENSEMBLE_MEMBERS = {
    "lite2_320": {"backbone": "efficientnet_lite2", "image_size": 320},
    "lite1_384": {"backbone": "efficientnet_lite1", "image_size": 384},
}
#: Smallest spread a member's held-out scores or maps may have (a member that scores every
#: held-out image alike cannot be put in their units).
_MIN_SCALE = 1e-12


class AnomalyEnsemble(PixelThresholdMixin, ThresholdMixin, OutlierMixin, _BaseComposition):
    """An ensemble of anomaly models on images: the mean of its members' standardised
    image scores and maps.

    ``fit`` holds out ``validation_fraction`` of the good images, fits a clone of every
    member on the rest, and scores the held-out images with each: a member's anomaly scores
    (``-score_samples``) are standardised by the mean and standard deviation of its
    held-out images' anomaly scores, and its maps by those of the held-out maps' pixels, so
    that members in different units (other networks, frames, methods) can be averaged. The
    ensemble's anomaly score is the mean of the members' standardised anomaly scores, and
    its map the mean of their standardised maps. No defective image is needed.

    Parameters
    ----------
    members : list of (str, model)
        The members: unfitted models with ``fit`` and ``score_and_map`` on images (a
        :class:`~skpatchcore.PatchCorePipeline`, a trained detector, or another ensemble),
        each with a unique name. :func:`make_ensemble` makes the measured default of two
        PatchCore pipelines. Their parameters read ``<name>__<parameter>`` in
        ``get_params`` and ``GridSearchCV``.
    validation_fraction : float in (0, 0.5), default=0.1
        Fraction of the good training images held out (at least two): they set each
        member's units, ``offset_`` and ``pixel_threshold_``. The members are fitted on the
        other images. Fewer than 10 held-out images give a warning: the threshold from
        so few is rough (:meth:`calibrate` on more good images sets it again).
    contamination : 'auto' or float in (0, 0.5], default='auto'
        Sets ``offset_`` from the held-out images' ensemble scores: 'auto' is Tukey's fence
        (an anomaly score above Q3 + 1.5 IQR of theirs is an outlier); a float is that
        quantile of their ``score_samples``.
    random_state : int, RandomState instance or None, default=0
        Chooses the held-out images.

    Attributes
    ----------
    members_ : list of model
        The fitted members, in the order of ``members``.
    score_loc_, score_scale_ : ndarray of shape (n_members,), float64
        Mean and standard deviation of each member's anomaly scores (``-score_samples``) on
        the held-out images.
    map_loc_, map_scale_ : ndarray of shape (n_members,), float64
        Mean and standard deviation of each member's map values over the held-out images'
        pixels (maps smoothed with ``sigma`` = 4).
    offset_ : float
        ``decision_function = score_samples - offset_``; from the held-out images' ensemble
        scores by ``contamination`` (or :meth:`calibrate`).
    pixel_threshold_ : float
        Default threshold of :meth:`predict_mask` (the maps are not in the units of the
        image scores): the ``contamination`` rule applied to the peaks of the held-out
        images' ensemble maps.
    n_train_images_ : int
        Good images the members were fitted on.
    n_validation_images_ : int
        Held-out good images.

    See Also
    --------
    make_ensemble : The measured two-member PatchCore ensemble.
    skpatchcore.PatchCorePipeline : A single PatchCore model.

    Notes
    -----
    Sign conventions are IsolationForest's: ``score_samples`` is lower for more abnormal
    images, ``decision_function`` negative for outliers, ``predict`` -1 for outliers; maps
    are higher where more anomalous. An ensemble costs the sum of its members (fit and
    scoring); the members are fitted on ``1 - validation_fraction`` of the images, so a
    member's figures differ slightly from the same model fitted on all of them.

    Examples
    --------
    >>> from skpatchcore import AnomalyEnsemble, make_patchcore
    >>> from skpatchcore.datasets import make_defect_images
    >>> X, y, _ = make_defect_images(12, 4, image_size=64, random_state=0)
    >>> members = [(f"lite2_{s}", make_patchcore(image_size=s, sampling_ratio=0.2))
    ...            for s in (64, 96)]
    >>> ensemble = AnomalyEnsemble(members, validation_fraction=0.25).fit(X[:12])
    >>> ensemble.n_train_images_, ensemble.n_validation_images_
    (9, 3)
    >>> bool(ensemble.score_samples(X[12:]).max() < ensemble.score_samples(X[:12]).min())
    True
    """

    _parameter_constraints: dict = {
        "members": [list],
        "validation_fraction": [Interval(Real, 0, 0.5, closed="neither")],
        "contamination": [StrOptions({"auto"}), Interval(Real, 0, 0.5, closed="right")],
        "random_state": ["random_state"],
    }

    def __init__(self, members, *, validation_fraction=0.1, contamination="auto",
                 random_state=0):
        self.members = members
        self.validation_fraction = validation_fraction
        self.contamination = contamination
        self.random_state = random_state

    # ------------------------------------------------------------------ parameters
    def get_params(self, deep=True):
        """Parameters; when deep, also each member as ``<name>`` and its parameters as
        ``<name>__<parameter>``."""
        return self._get_params("members", deep=deep)

    def set_params(self, **params):
        """Set parameters, a member by ``<name>`` and its own by ``<name>__<parameter>``."""
        self._set_params("members", **params)
        return self

    def _check_members(self):
        members = self.members
        if not members or not all(isinstance(m, tuple | list) and len(m) == 2
                                  for m in members):
            raise ValueError("members must be a non-empty list of (name, model) pairs, e.g. "
                             "[('lite2', make_patchcore()), ('lite1', make_patchcore("
                             "backbone='efficientnet_lite1'))]; make_ensemble() makes the "
                             "default.")
        names = [name for name, _ in members]
        self._validate_names(names)
        for name, model in members:
            if not (hasattr(model, "fit") and hasattr(model, "score_and_map")):
                raise TypeError(f"member {name!r} is a {type(model).__name__}, which cannot "
                                "score images with maps (it has no score_and_map); use a "
                                "PatchCorePipeline (make_patchcore, make_model) or a trained "
                                "detector.")
        return members

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Fit every member on the good images but a held-out part, and set each member's
        units, ``offset_`` and ``pixel_threshold_`` from the held-out part.

        Parameters
        ----------
        X : images
            Paths, a folder, PIL images, numpy arrays or a torch tensor of good images (see
            :func:`skpatchcore.datasets.check_images`).
        y : None or array-like of shape (n_images,) of +1 / -1, default=None
            Images labelled -1 are left out (as with the other detectors).

        Returns
        -------
        self : object
        """
        check_model(self)  # every parameter, the members' included, before any image
        members = self.members
        images = check_images(X)
        keep = normal_mask(y, len(images))
        good = np.arange(len(images)) if keep is None else np.flatnonzero(keep)
        n = len(good)
        n_val = max(2, int(round(self.validation_fraction * n)))
        if n - n_val < 2:
            raise ValueError(f"AnomalyEnsemble needs at least {n_val + 2} good training images "
                             f"({n_val} are held out to set each member's units and the "
                             f"threshold), got {n}.")
        rng = check_random_state(self.random_state)
        order = rng.permutation(n)
        held = images.select(good[np.sort(order[:n_val])])
        kept = images.select(good[np.sort(order[n_val:])])
        fitted, stats, held_scores, held_maps = [], [], 0.0, None
        for name, model in members:
            member = clone(model).fit(kept)
            scores, maps = member.score_and_map(held)
            anomaly = -np.asarray(scores, dtype=np.float64)
            maps = [np.asarray(m, dtype=np.float32) for m in maps]
            values = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
            stat = (anomaly.mean(), anomaly.std(), values.mean(), values.std())
            for what, spread in (("anomaly scores", stat[1]), ("maps", stat[3])):
                if not (np.isfinite(spread) and spread > _MIN_SCALE):
                    raise ValueError(
                        f"member {name!r} gives every held-out image the same {what} "
                        f"(spread {spread:g}), so they cannot set its units; hold out more "
                        "images (validation_fraction) or fit on images that differ.")
            held_scores = held_scores + (anomaly - stat[0]) / stat[1]
            z = [(m - np.float32(stat[2])) / np.float32(stat[3]) for m in maps]
            held_maps = z if held_maps is None else [a + b for a, b in zip(held_maps, z,
                                                                           strict=True)]
            fitted.append(member)
            stats.append(stat)
        m = len(fitted)
        stats = np.asarray(stats, dtype=np.float64)
        self.members_ = fitted
        self.score_loc_, self.score_scale_ = stats[:, 0].copy(), stats[:, 1].copy()
        self.map_loc_, self.map_scale_ = stats[:, 2].copy(), stats[:, 3].copy()
        self.n_train_images_ = int(n - n_val)
        self.n_validation_images_ = int(n_val)
        warn_if_few_held_out(n_val, "each member's units and the threshold (offset_, "
                                    "pixel_threshold_)")
        self.offset_ = contamination_offset(-held_scores / m, self.contamination,
                                            "AnomalyEnsemble")
        peaks = np.array([float(h.max()) / m for h in held_maps])
        self.pixel_threshold_ = -contamination_offset(-peaks, self.contamination,
                                                      "AnomalyEnsemble")
        return self

    # ------------------------------------------------------------------ scoring
    def _standardised(self, X, sigma, with_maps):
        """The mean of the members' standardised anomaly scores (n,) and, ``with_maps``,
        of their standardised maps (a list, one per image, float32)."""
        check_is_fitted(self)
        check_sigma(sigma)
        images = check_images(X)
        total, maps = np.zeros(len(images)), None
        for j, member in enumerate(self.members_):
            if with_maps:
                scores, member_maps = member.score_and_map(images, sigma=sigma)
                loc, scale = np.float32(self.map_loc_[j]), np.float32(self.map_scale_[j])
                if maps is None:
                    maps = [(np.asarray(m, np.float32) - loc) / scale for m in member_maps]
                else:
                    for total_map, m in zip(maps, member_maps, strict=True):
                        total_map += (np.asarray(m, np.float32) - loc) / scale
            else:
                scores = member.score_samples(images)
            total += (-np.asarray(scores, np.float64) - self.score_loc_[j]) / self.score_scale_[j]
        m = len(self.members_)
        return total / m, None if maps is None else [a / np.float32(m) for a in maps]

    def score_samples(self, X):
        """Ensemble score of each image; lower = more abnormal.

        Parameters
        ----------
        X : images
            Any form the members accept.

        Returns
        -------
        scores : ndarray of shape (n_images,), float64
            Minus the mean of the members' standardised anomaly scores: about 0 for a
            typical good image, about -1 for one a standard deviation of the held-out good
            images more anomalous than their mean on every member.
        """
        return -self._standardised(X, 0.0, with_maps=False)[0]

    def score_and_map(self, X, sigma=4.0):
        """Image scores and pixel anomaly maps, each member run once.

        Parameters
        ----------
        X : images
        sigma : float, default=4.0
            Gaussian smoothing of every member's maps, in its network-input pixels (0
            disables).

        Returns
        -------
        scores : ndarray of shape (n_images,), float64
            :meth:`score_samples`: lower = more abnormal.
        maps : ndarray (n, H, W) when all images share one size, else a list of (H_i, W_i),
            float32
            The mean of the members' standardised maps on each image's own pixels; higher =
            more anomalous (0 is the held-out good pixels' mean).
        """
        anomaly, maps = self._standardised(X, sigma, with_maps=True)
        return -anomaly, as_one_array(maps)

    def predict_map(self, X, sigma=4.0):
        """Pixel anomaly maps on each image's own pixels (higher = more anomalous); see
        :meth:`score_and_map`."""
        return self.score_and_map(X, sigma)[1]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        return tags


def make_ensemble(*, validation_fraction=0.1, contamination="auto", random_state=0,
                  **params):
    """The measured ensemble: PatchCore on EfficientNet-Lite2 at 320 px and on
    EfficientNet-Lite1 at 384 px (:data:`ENSEMBLE_MEMBERS`).

    Against the default single model (``evaluate`` on the whole training set,
    docs/benchmarks.md, "The ensemble estimator"): tire image AUROC 0.832 -> 0.843, pixel
    AUROC 0.990 -> 0.995, AUPRO 0.955 -> 0.976; MTD image AUROC 0.955 -> 0.952, pixel AUROC
    0.869 -> 0.872, AUPRO 0.797 -> 0.816; 2.3 to 2.7 times the fit and scoring time.

    Parameters
    ----------
    validation_fraction, contamination, random_state
        The ensemble's (:class:`AnomalyEnsemble`); ``random_state`` goes to the members too.
    **params
        Parameters of both members' steps by plain name, as in
        :func:`~skpatchcore.make_patchcore` (its 1% coreset unless ``sampling_ratio`` is
        given). Each member has its own ``backbone`` and ``image_size``: giving them raises.

    Returns
    -------
    ensemble : AnomalyEnsemble

    Examples
    --------
    >>> from skpatchcore import make_ensemble
    >>> ensemble = make_ensemble(patch_size=3)
    >>> [name for name, _ in ensemble.members]
    ['lite2_320', 'lite1_384']
    >>> ensemble.get_params()["lite1_384__features__image_size"]
    384
    """
    from .pipeline import make_patchcore

    fixed = sorted(set(params) & {"backbone", "image_size"})
    if fixed:
        raise ValueError(f"The ensemble's members each have their own {' and '.join(fixed)} "
                         f"({ENSEMBLE_MEMBERS}); drop {', '.join(fixed)}, or build an "
                         "AnomalyEnsemble of your own members.")
    params = {**params, "random_state": random_state}
    members = [(name, make_patchcore(**own, **params))
               for name, own in ENSEMBLE_MEMBERS.items()]
    return AnomalyEnsemble(members, validation_fraction=validation_fraction,
                           contamination=contamination, random_state=random_state)
