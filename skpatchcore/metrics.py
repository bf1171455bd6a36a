"""Evaluation metrics for image anomaly detection and localisation.

Conventions used by every function of this module:

- **Scores are higher for more anomalous inputs.** Image scores are ``-score_samples(X)`` of a
  detector (scikit-learn detectors return *lower* ``score_samples`` for more abnormal samples,
  so negate them), or equivalently ``-decision_function(X)``. Anomaly maps, as returned by
  ``predict_map``, are already higher where a pixel is more anomalous.
- **Ground truth is boolean with True = anomalous.** ``is_anomalous`` (one entry per image) and
  the pixel ``masks`` are bool arrays or integer/float arrays holding only 0 and 1, with
  True/1 marking an anomalous image or a defect pixel. An array containing -1 is rejected with
  a ValueError: labels in the scikit-learn outlier convention (+1 normal, -1 anomalous) must be
  converted explicitly with ``y == -1``; the functions never guess.

Metrics:

- :func:`image_auroc`: area under the ROC curve of the image scores (detection).
- :func:`pixel_auroc`: area under the ROC curve over all pixels of all images (localisation).
- :func:`pro_curve` and :func:`aupro`: the per-region overlap (PRO) curve and its normalised
  area up to a false-positive-rate limit (Bergmann et al., 2021).
- :func:`image_auroc_scorer`, :func:`pixel_auroc_scorer`, :func:`aupro_scorer`: the same as
  scorers for :class:`~sklearn.model_selection.GridSearchCV`.

Pixel-level metrics accept a 3-D array ``(n_images, H, W)`` or lists of 2-D arrays of differing
sizes (each mask the shape of its map). They are exact and memory-bounded: they hold the defect
pixels' scores, one image, and one sorted batch of at most ~16 million defect-free scores,
never all pixels at once. On the MTD test set (710 images, 75 million pixels, 3.5 million
defect pixels) each takes under 10 s on one core and a few hundred MiB beyond the data.

References
----------
.. [1] P. Bergmann, K. Batzner, M. Fauser, D. Sattlegger, C. Steger, "The MVTec Anomaly
   Detection Dataset: A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection",
   International Journal of Computer Vision 129, 1038-1059 (2021).
"""

import math
import numbers

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = [
    "aupro",
    "aupro_scorer",
    "image_auroc",
    "image_auroc_by_type",
    "image_auroc_scorer",
    "pixel_auroc",
    "pixel_auroc_scorer",
    "pro_curve",
]

# 8-connectivity, as in the MVTec AD reference evaluation code.
_CONNECTIVITY = np.ones((3, 3), dtype=int)
# Radix selection of the k-th largest negative score: 16 bits per pass; once the candidate
# bin holds at most this many values they are gathered and sorted.
_RADIX_BITS = 16
_COLLECT_LIMIT = 1 << 22
# Pixels of the larger class are sorted in batches of about this many values (128 MiB).
_BATCH_SIZE = 1 << 24

_MINUS_ONE_HINT = (
    "contains -1, which looks like the scikit-learn outlier convention (+1 normal, -1 "
    "anomalous); this function expects True/1 = anomalous. Pass `y == -1` instead."
)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _as_bool_labels(values, name):
    """Return ``values`` as a bool array; they must be bool or only 0 and 1."""
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(
            f"{name} must be boolean or hold only 0 and 1 (True/1 = anomalous); got dtype "
            f"{arr.dtype}."
        )
    if arr.size == 0:
        return arr.astype(bool)
    if np.any(arr == -1):
        raise ValueError(f"{name} {_MINUS_ONE_HINT}")
    if not np.all((arr == 0) | (arr == 1)):
        bad = np.unique(arr[(arr != 0) & (arr != 1)])[:5]
        raise ValueError(
            f"{name} must be boolean or hold only 0 and 1 (True/1 = anomalous); found values "
            f"such as {bad.tolist()}. For 8-bit mask images pass `mask >= 128`."
        )
    return arr.astype(bool)


def _as_scores(values, name):
    """Return ``values`` as a finite float64 array."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be an array of real numbers.") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; anomaly scores must be finite.")
    # -0.0 and 0.0 compare equal but have different bits: make them identical.
    return arr + 0.0


def _as_image_sequence(images, name):
    """Accept a 3-D array (n, H, W) or a sequence of 2-D arrays; return an indexable."""
    if hasattr(images, "ndim") and hasattr(images, "shape"):
        if images.ndim != 3:
            raise ValueError(
                f"{name} must be a 3-D array (n_images, H, W) or a list of 2-D arrays; got an "
                f"array of shape {tuple(images.shape)}. For a single image use {name}[None]."
            )
        return images
    if isinstance(images, str | bytes) or not hasattr(images, "__len__"):
        raise ValueError(
            f"{name} must be a 3-D array (n_images, H, W) or a list of 2-D arrays; got "
            f"{type(images).__name__}."
        )
    return list(images)


def _check_image_pairs(masks, anomaly_maps):
    masks = _as_image_sequence(masks, "masks")
    anomaly_maps = _as_image_sequence(anomaly_maps, "anomaly_maps")
    if len(masks) != len(anomaly_maps):
        raise ValueError(
            f"masks has {len(masks)} images but anomaly_maps has {len(anomaly_maps)}; pass one "
            "mask per anomaly map."
        )
    if len(masks) == 0:
        raise ValueError("masks and anomaly_maps are empty; pass at least one image.")
    return masks, anomaly_maps


def _iter_images(masks, anomaly_maps):
    """Yield ``(index, mask, map)`` with a bool mask and a finite float64 map per image."""
    for i in range(len(masks)):
        mask = _as_bool_labels(masks[i], f"masks[{i}]")
        amap = _as_scores(anomaly_maps[i], f"anomaly_maps[{i}]")
        if amap.ndim != 2:
            raise ValueError(
                f"anomaly_maps[{i}] must be a 2-D array (H, W); got shape {amap.shape}."
            )
        if mask.shape != amap.shape:
            raise ValueError(
                f"masks[{i}] has shape {mask.shape} but anomaly_maps[{i}] has shape "
                f"{amap.shape}; each mask must have the shape of its anomaly map (resize the "
                "masks with nearest-neighbour interpolation or the maps to the image size)."
            )
        yield i, mask, amap


def _check_fpr_limit(fpr_limit):
    if (
        isinstance(fpr_limit, bool)
        or not isinstance(fpr_limit, numbers.Real)
        or not 0.0 < fpr_limit <= 1.0
    ):
        raise ValueError(f"fpr_limit must be a float in (0, 1]; got {fpr_limit!r}.")
    return float(fpr_limit)


# --------------------------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------------------------


def image_auroc(is_anomalous, anomaly_scores):
    """Area under the ROC curve of image anomaly scores, anomalous images as positive class.

    Parameters
    ----------
    is_anomalous : array-like of shape (n_images,)
        Ground truth, bool or 0/1: True/1 for an anomalous image. Labels in the scikit-learn
        outlier convention (+1 normal, -1 anomalous) are rejected; pass ``y == -1``.
    anomaly_scores : array-like of shape (n_images,)
        Image scores, higher = more anomalous, for example ``-detector.score_samples(X)``.

    Returns
    -------
    auroc : float
        The probability that a random anomalous image scores higher than a random normal one
        (ties count one half): 1.0 is a perfect ranking, 0.5 chance level.

    Raises
    ------
    ValueError
        If the lengths differ, a score is not finite, a label is -1 or not 0/1, or only one
        class is present.

    Notes
    -----
    Computed with :func:`sklearn.metrics.roc_auc_score`.

    Examples
    --------
    >>> from skpatchcore.metrics import image_auroc
    >>> image_auroc([False, False, True, True], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    is_anomalous = _as_bool_labels(is_anomalous, "is_anomalous")
    anomaly_scores = _as_scores(anomaly_scores, "anomaly_scores")
    if is_anomalous.ndim != 1 or anomaly_scores.ndim != 1:
        raise ValueError(
            "is_anomalous and anomaly_scores must be 1-D (one entry per image); got shapes "
            f"{is_anomalous.shape} and {anomaly_scores.shape}."
        )
    if is_anomalous.shape != anomaly_scores.shape:
        raise ValueError(
            f"is_anomalous has {is_anomalous.shape[0]} entries but anomaly_scores has "
            f"{anomaly_scores.shape[0]}; pass one score per image."
        )
    n_pos = int(is_anomalous.sum())
    if n_pos == 0 or n_pos == is_anomalous.size:
        raise ValueError(
            "image_auroc needs both normal and anomalous images; is_anomalous holds only "
            f"{'anomalous' if n_pos else 'normal'} images ({is_anomalous.size})."
        )
    return float(roc_auc_score(is_anomalous, anomaly_scores))


def image_auroc_by_type(types, anomaly_scores, normal="good"):
    """:func:`image_auroc` of each defect type against the normal images alone.

    Parameters
    ----------
    types : array-like of str, shape (n_images,)
        Each image's type, for example the test sub-folder of an MVTec layout
        (``defect_type`` of :func:`~skpatchcore.datasets.load_mvtec`).
    anomaly_scores : array-like of shape (n_images,)
        Image scores, higher = more anomalous (``-score_samples``).
    normal : str, default='good'
        The type of the normal images.

    Returns
    -------
    aurocs : dict
        ``{type: auroc}`` for every type other than ``normal``, sorted by name: that type's
        images (positive) ranked against the normal ones, the other types left out.

    Examples
    --------
    >>> from skpatchcore.metrics import image_auroc_by_type
    >>> image_auroc_by_type(["good", "good", "cut", "hole"], [0.1, 0.4, 0.3, 0.9])
    {'cut': 0.5, 'hole': 1.0}
    """
    types = np.asarray(types)
    anomaly_scores = np.asarray(anomaly_scores, dtype=np.float64)
    if types.shape != anomaly_scores.shape:
        raise ValueError(f"types has shape {types.shape} but anomaly_scores has "
                         f"{anomaly_scores.shape}; pass one type and one score per image.")
    if not (types == normal).any():
        raise ValueError(f"no image has the normal type {normal!r}; pass normal= the type of "
                         "the normal images.")
    good = types == normal
    return {t: image_auroc(np.r_[np.zeros(good.sum()), np.ones((types == t).sum())],
                           np.r_[anomaly_scores[good], anomaly_scores[types == t]])
            for t in sorted(set(types.tolist()) - {normal})}


# --------------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------------


def _sorted_batches(chunks, batch_size):
    """Concatenate 1-D ``chunks`` into sorted float64 batches of about ``batch_size`` values."""
    pending, n_pending = [], 0
    for chunk in chunks:
        if chunk.size == 0:
            continue
        pending.append(chunk)
        n_pending += chunk.size
        if n_pending >= batch_size:
            batch = np.concatenate(pending)
            pending, n_pending = [], 0
            batch.sort()
            yield batch
    if pending:
        batch = np.concatenate(pending)
        batch.sort()
        yield batch


def _count_below_and_equal(sorted_batch, sorted_values, weights=None):
    """Weighted sums over ``sorted_values`` of the batch values below, and equal to, each.

    Returns ``(sum_i w_i #{b < v_i}, sum_i w_i #{b == v_i})`` as Python numbers (exact
    integers when ``weights`` is None). Searching the sorted values in the sorted batch keeps
    the binary searches cache friendly.
    """
    left = np.searchsorted(sorted_batch, sorted_values, side="left")
    # Ties are rare with real-valued maps: look for the right end only where a value occurs.
    found = np.flatnonzero(sorted_batch[np.minimum(left, sorted_batch.size - 1)] == sorted_values)
    n_equal = np.searchsorted(sorted_batch, sorted_values[found], side="right") - left[found]
    if weights is None:
        return int(left.sum()), int(n_equal.sum())
    return float(np.dot(weights, left)), float(np.dot(weights[found], n_equal))


def pixel_auroc(masks, anomaly_maps):
    """Area under the ROC curve over all pixels of all images, defect pixels as positive class.

    Parameters
    ----------
    masks : array-like of shape (n_images, H, W) or list of 2-D arrays
        Ground-truth defect masks, bool or 0/1: True/1 for a defect pixel. A list may hold
        masks of differing sizes.
    anomaly_maps : array-like of shape (n_images, H, W) or list of 2-D arrays
        Anomaly maps, higher = more anomalous (``predict_map`` output), each of the shape of
        its mask.

    Returns
    -------
    auroc : float
        The probability that a random defect pixel scores higher than a random defect-free
        pixel (ties count one half), pooled over all images.

    Raises
    ------
    ValueError
        If a mask and its map differ in shape (the message names the index), a mask holds -1 or
        values other than 0/1, a map value is not finite, or all pixels belong to one class.

    Notes
    -----
    The value equals ``roc_auc_score(concatenated masks, concatenated maps)`` exactly, but is
    computed without concatenating all pixels: the scores of the smaller class (usually the
    defect pixels) are gathered and sorted, and those of the larger class are sorted in
    batches of about 16 million values and counted against them (the Mann-Whitney U statistic
    with exact tie handling). Memory is 8 bytes per pixel of the smaller class plus one batch
    (about 128 MiB); time ``O(n_pixels log n_pixels)``.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.metrics import pixel_auroc
    >>> masks = np.zeros((2, 4, 4), dtype=bool); masks[1, 1:3, 1:3] = True
    >>> maps = np.zeros((2, 4, 4)); maps[1, 1:3, 1:3] = 1.0
    >>> pixel_auroc(masks, maps)
    1.0
    """
    masks, anomaly_maps = _check_image_pairs(masks, anomaly_maps)
    positives, n_pos, n_neg = [], 0, 0
    for _, mask, amap in _iter_images(masks, anomaly_maps):
        positives.append(amap[mask])
        n_pos += positives[-1].size
        n_neg += mask.size - positives[-1].size
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            "pixel_auroc needs both defect and defect-free pixels; the masks hold only "
            f"{'defect' if n_pos else 'defect-free'} pixels."
        )
    # Sort the smaller class (usually the defect pixels) whole, the larger one in batches.
    minority_is_pos = n_pos <= n_neg
    if minority_is_pos:
        minority = np.concatenate(positives)
    else:
        minority = np.concatenate(
            [amap[~mask] for _, mask, amap in _iter_images(masks, anomaly_maps)]
        )
    del positives
    minority.sort()
    majority = (
        amap[~mask] if minority_is_pos else amap[mask]
        for _, mask, amap in _iter_images(masks, anomaly_maps)
    )
    below, ties = 0, 0
    for batch in _sorted_batches(majority, _BATCH_SIZE):
        batch_below, batch_ties = _count_below_and_equal(batch, minority)
        below += batch_below
        ties += batch_ties
    # below counts (defect-free below defect) pairs, or (defect below defect-free) pairs.
    wins = below if minority_is_pos else n_pos * n_neg - below - ties
    return float((wins + 0.5 * ties) / (n_pos * n_neg))


# --------------------------------------------------------------------------------------------
# Per-region overlap
# --------------------------------------------------------------------------------------------


def _collect_regions(masks, anomaly_maps, on_negatives=None):
    """Label the defect regions; gather the defect pixels' scores and weights.

    Each defect pixel gets the weight ``1 / (size of its connected region)``, so that the
    weights of a region sum to 1. ``on_negatives`` is called with the defect-free scores of
    each image.
    """
    values, weights = [], []
    n_regions, n_neg = 0, 0
    for _, mask, amap in _iter_images(masks, anomaly_maps):
        if on_negatives is not None:
            on_negatives(amap[~mask])
        n_neg += int(mask.size - np.count_nonzero(mask))
        if not mask.any():
            continue
        labels, n_components = ndimage.label(mask, structure=_CONNECTIVITY)
        sizes = np.bincount(labels.ravel(), minlength=n_components + 1)
        region_labels = labels[mask]
        values.append(amap[mask])
        weights.append(1.0 / sizes[region_labels])
        n_regions += n_components
    if n_regions == 0:
        raise ValueError(
            "The masks contain no defect region: PRO is undefined. Pass masks of images with "
            "defects (True/1 = defect pixel)."
        )
    if n_neg == 0:
        raise ValueError(
            "The masks contain no defect-free pixel: the false positive rate is undefined."
        )
    return np.concatenate(values), np.concatenate(weights), n_regions, n_neg


def _float_keys(values):
    """Map finite float64 values (no -0.0) to uint64 keys with the same order."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    negative = (bits >> np.uint64(63)).astype(bool)
    return np.where(negative, ~bits, bits | np.uint64(1 << 63))


def _key_to_float(key):
    key = np.uint64(key)
    if key >> np.uint64(63):
        bits = key & ~np.uint64(1 << 63)
    else:
        bits = ~key
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def _select_digit(counts, k):
    """Pick the digit holding the k-th largest value (1-based) given counts per digit."""
    from_top = np.cumsum(counts[::-1])
    j = int(np.searchsorted(from_top, k, side="left"))
    digit = counts.size - 1 - j
    above = int(from_top[j] - counts[digit])
    return digit, above


def _kth_largest(iter_negatives, k, first_counts):
    """Exact k-th largest defect-free score by radix selection on order-preserving keys.

    Returns ``(value, n_above, n_equal)``: the value, the number of defect-free pixels with
    a strictly larger score and the number with exactly that score. Memory is bounded by
    ``_COLLECT_LIMIT`` values plus one image.
    """
    n_bins = 1 << _RADIX_BITS
    digit_mask = np.uint64(n_bins - 1)
    counts = first_counts
    prefix, prefix_bits, n_above = 0, 0, 0
    while True:
        digit, above = _select_digit(counts, k)
        n_above += above
        k -= above
        prefix = (prefix << _RADIX_BITS) | digit
        prefix_bits += _RADIX_BITS
        n_bin = int(counts[digit])
        if prefix_bits == 64:
            return _key_to_float(prefix), n_above, n_bin
        shift = np.uint64(64 - prefix_bits)
        target = np.uint64(prefix)
        if n_bin <= _COLLECT_LIMIT:
            keys = np.concatenate(
                [key[(key >> shift) == target] for key in map(_float_keys, iter_negatives())]
            )
            keys.sort()
            kth = keys[keys.size - k]
            n_above += int(keys.size - np.searchsorted(keys, kth, side="right"))
            n_equal = int(np.count_nonzero(keys == kth))
            return _key_to_float(kth), n_above, n_equal
        counts = np.zeros(n_bins, dtype=np.int64)
        next_shift = shift - np.uint64(_RADIX_BITS)
        for key in map(_float_keys, iter_negatives()):
            key = key[(key >> shift) == target]
            counts += np.bincount(
                ((key >> next_shift) & digit_mask).astype(np.intp), minlength=n_bins
            )


def aupro(masks, anomaly_maps, *, fpr_limit=0.3):
    """Normalised area under the per-region-overlap curve up to a false positive rate.

    Parameters
    ----------
    masks : array-like of shape (n_images, H, W) or list of 2-D arrays
        Ground-truth defect masks, bool or 0/1: True/1 for a defect pixel. A list may hold
        masks of differing sizes. Images without defect contribute only defect-free pixels.
    anomaly_maps : array-like of shape (n_images, H, W) or list of 2-D arrays
        Anomaly maps, higher = more anomalous (``predict_map`` output), each of the shape of
        its mask.
    fpr_limit : float, default=0.3
        Upper limit of the false positive rate, in (0, 1]. The MVTec AD benchmark uses 0.3.

    Returns
    -------
    aupro : float
        The area under the PRO curve for false positive rates from 0 to ``fpr_limit``,
        divided by ``fpr_limit``: 1.0 for a map that scores every defect pixel above every
        defect-free pixel, ``fpr_limit / 2`` for a constant map.

    Raises
    ------
    ValueError
        If the masks hold no defect region or no defect-free pixel, a mask holds -1 or values
        other than 0/1, a mask and its map differ in shape, or a map value is not finite.

    See Also
    --------
    pro_curve : The curve itself.

    Notes
    -----
    Following Bergmann et al. (2021) [1]_ and the MVTec AD evaluation code: the ground-truth
    regions are the connected components of each mask with 8-connectivity (a 3 x 3 structuring
    element of ones). A pixel is predicted anomalous at threshold ``t`` when its score is
    ``>= t``. For each ``t``, the overlap of a region is the fraction of its pixels predicted
    anomalous; ``PRO(t)`` is the mean overlap over all regions of all images (each region
    counts once whatever its size), and ``FPR(t)`` the fraction of all defect-free pixels of
    all images predicted anomalous. The curve joins the points of every distinct score value
    (from ``(0, 0)``) by straight lines; its area up to ``fpr_limit`` is taken with the
    trapezoidal rule, interpolating the curve linearly at exactly ``fpr_limit``.

    The computation is exact (no threshold grid) and memory-bounded. The area is a weighted
    Mann-Whitney statistic: each defect-free pixel among the top ``fpr_limit`` fraction adds
    the weight of the defect pixels scoring above it (plus half of those scoring the same),
    a defect pixel weighing ``1 / (size of its region)``. The defect pixels' scores are sorted
    once (16 bytes per defect pixel), the score at which the false positive rate reaches
    ``fpr_limit`` is found by an exact radix selection over the images, and the defect-free
    pixels above it are then sorted in batches of about 16 million values (about 128 MiB) and
    counted against the defect pixels.

    References
    ----------
    .. [1] P. Bergmann, K. Batzner, M. Fauser, D. Sattlegger, C. Steger, "The MVTec Anomaly
       Detection Dataset: A Comprehensive Real-World Dataset for Unsupervised Anomaly
       Detection", International Journal of Computer Vision 129, 1038-1059 (2021).

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.metrics import aupro
    >>> masks = np.zeros((2, 4, 4), dtype=bool); masks[1, 1:3, 1:3] = True
    >>> aupro(masks, masks.astype(float))
    1.0
    >>> round(aupro(masks, np.zeros((2, 4, 4))), 6)
    0.15
    """
    fpr_limit = _check_fpr_limit(fpr_limit)
    masks, anomaly_maps = _check_image_pairs(masks, anomaly_maps)
    n_bins = 1 << _RADIX_BITS
    top_shift = np.uint64(64 - _RADIX_BITS)
    first_counts = np.zeros(n_bins, dtype=np.int64)

    def count_top_digits(negatives):
        keys = _float_keys(negatives)
        first_counts[:] += np.bincount((keys >> top_shift).astype(np.intp), minlength=n_bins)

    pos_values, pos_weights, n_regions, n_neg = _collect_regions(
        masks, anomaly_maps, on_negatives=count_top_digits
    )
    order = np.argsort(pos_values, kind="stable")
    pos_values = pos_values[order]
    pos_weights = pos_weights[order]
    cum_weights = np.concatenate([[0.0], np.cumsum(pos_weights)])
    del order
    total_weight = cum_weights[-1]

    # Number of defect-free pixels (possibly fractional) that fit under fpr_limit.
    n_limit = fpr_limit * n_neg
    if abs(n_limit - round(n_limit)) <= 1e-9 * max(1.0, n_limit):
        n_limit = float(round(n_limit))
    k = min(max(math.ceil(n_limit), 1), n_neg)

    def iter_negatives():
        for _, mask, amap in _iter_images(masks, anomaly_maps):
            yield amap[~mask]

    threshold, n_above, n_equal = _kth_largest(iter_negatives, k, first_counts)

    # Full trapezoids of the defect-free pixels scoring above the threshold: each adds the
    # weight of the defect pixels above it, plus half of those tied with it.
    above_threshold = (negatives[negatives > threshold] for negatives in iter_negatives())
    area = 0.0
    for batch in _sorted_batches(above_threshold, _BATCH_SIZE):
        below, tied = _count_below_and_equal(batch, pos_values, pos_weights)
        area += below + 0.5 * tied
    # The segment of the tie group at the threshold, cut at fpr_limit.
    left = np.searchsorted(pos_values, threshold, side="left")
    right = np.searchsorted(pos_values, threshold, side="right")
    pro_above = total_weight - cum_weights[right]
    pro_tied = cum_weights[right] - cum_weights[left]
    covered = n_limit - n_above  # in (0, n_equal]
    area += covered * pro_above + pro_tied * covered * covered / (2.0 * n_equal)
    return float(area / (n_neg * n_regions) / fpr_limit)


def pro_curve(masks, anomaly_maps, *, num_thresholds=None):
    """Per-region-overlap (PRO) curve: mean region overlap against false positive rate.

    Parameters
    ----------
    masks : array-like of shape (n_images, H, W) or list of 2-D arrays
        Ground-truth defect masks, bool or 0/1: True/1 for a defect pixel. A list may hold
        masks of differing sizes.
    anomaly_maps : array-like of shape (n_images, H, W) or list of 2-D arrays
        Anomaly maps, higher = more anomalous (``predict_map`` output), each of the shape of
        its mask.
    num_thresholds : int or None, default=None
        If None, the exact curve, with one point per distinct score value; its memory and
        length grow with the number of pixels (use :func:`aupro` for the area of a large data
        set). If an int (at least 2), that many thresholds evenly spaced between the smallest
        and the largest score, in memory independent of the number of pixels.

    Returns
    -------
    fpr : ndarray of shape (n_points,)
        False positive rate at each threshold: the fraction of all defect-free pixels with a
        score ``>= threshold``. Increasing, from 0.
    pro : ndarray of shape (n_points,)
        Per-region overlap at each threshold: the mean, over all connected defect regions of
        all images, of the fraction of the region's pixels with a score ``>= threshold``.
    thresholds : ndarray of shape (n_points,)
        Decreasing thresholds; ``thresholds[0]`` is ``inf`` and gives the point ``(0, 0)``.

    Raises
    ------
    ValueError
        As :func:`aupro`, and if ``num_thresholds`` is not None or an int >= 2.

    See Also
    --------
    aupro : The normalised area under this curve, computed exactly in bounded memory.

    Notes
    -----
    Regions are the 8-connected components of each mask (3 x 3 structuring element of ones,
    as in the MVTec AD evaluation code). With ``num_thresholds=None``,
    ``aupro(masks, maps, fpr_limit=a)`` equals the trapezoidal area of ``(fpr, pro)`` up to
    ``a`` (interpolated at ``a``) divided by ``a``.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore.metrics import pro_curve
    >>> masks = np.zeros((1, 3, 3), dtype=bool); masks[0, 0, :2] = True
    >>> maps = np.array([[[3.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    >>> fpr, pro, thresholds = pro_curve(masks, maps)
    >>> thresholds.tolist()
    [inf, 3.0, 2.0, 1.0, 0.0]
    >>> (fpr * 7).round(6).tolist()
    [0.0, 0.0, 1.0, 1.0, 7.0]
    >>> pro.tolist()
    [0.0, 0.5, 0.5, 1.0, 1.0]
    """
    masks, anomaly_maps = _check_image_pairs(masks, anomaly_maps)
    if num_thresholds is not None and (
        isinstance(num_thresholds, bool)
        or not isinstance(num_thresholds, numbers.Integral)
        or num_thresholds < 2
    ):
        raise ValueError(f"num_thresholds must be None or an int >= 2; got {num_thresholds!r}.")

    if num_thresholds is None:
        negatives = []
        pos_values, pos_weights, n_regions, n_neg = _collect_regions(
            masks, anomaly_maps, on_negatives=negatives.append
        )
        negatives = np.concatenate(negatives)
        thresholds = np.unique(np.concatenate([negatives, pos_values]))
        fp_counts = np.bincount(np.searchsorted(thresholds, negatives), minlength=thresholds.size)
        del negatives
        pro_sums = np.bincount(
            np.searchsorted(thresholds, pos_values), weights=pos_weights, minlength=thresholds.size
        )
    else:
        lowest, highest = np.inf, -np.inf
        for _, _, amap in _iter_images(masks, anomaly_maps):
            lowest, highest = (
                min(lowest, amap.min(initial=np.inf)),
                max(highest, amap.max(initial=-np.inf)),
            )
        thresholds = np.linspace(lowest, highest, int(num_thresholds))
        thresholds = np.unique(thresholds)  # a constant map gives a single threshold
        fp_counts = np.zeros(thresholds.size, dtype=np.int64)

        def count_negatives(values):
            bins = np.searchsorted(thresholds, values, side="right") - 1
            fp_counts[:] += np.bincount(bins, minlength=thresholds.size)

        pos_values, pos_weights, n_regions, n_neg = _collect_regions(
            masks, anomaly_maps, on_negatives=count_negatives
        )
        bins = np.searchsorted(thresholds, pos_values, side="right") - 1
        pro_sums = np.bincount(bins, weights=pos_weights, minlength=thresholds.size)

    # Cumulate from the highest threshold down: counts of scores >= threshold.
    fpr = np.concatenate([[0.0], np.cumsum(fp_counts[::-1]) / n_neg])
    pro = np.concatenate([[0.0], np.cumsum(pro_sums[::-1]) / n_regions])
    np.clip(pro, 0.0, 1.0, out=pro)
    thresholds = np.concatenate([[np.inf], thresholds[::-1]])
    return fpr, pro, thresholds


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


def _outlier_labels(y, name="y"):
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iuf" or not np.all((y == 1) | (y == -1)):
        raise ValueError(
            f"{name} must hold the scikit-learn outlier labels +1 (normal) and -1 (anomalous), "
            "one per image."
        )
    return y == -1


def image_auroc_scorer(estimator, X, y):
    """Image AUROC of a fitted detector, as a scorer for ``GridSearchCV(scoring=...)``.

    Parameters
    ----------
    estimator : object
        A fitted detector with ``score_samples`` (lower = more abnormal, the scikit-learn
        convention).
    X : array-like
        The images to score.
    y : array-like of shape (n_images,)
        Labels in the scikit-learn outlier convention: +1 for a normal image, -1 for an
        anomalous one.

    Returns
    -------
    auroc : float
        ``image_auroc(y == -1, -estimator.score_samples(X))``.

    Notes
    -----
    With ``y`` in {+1, -1}, ``scoring="roc_auc"`` gives the same value (it uses
    ``decision_function = score_samples - offset_`` with +1 as the positive class, and
    the constant offset does not change a ranking). This scorer states the orientation
    explicitly and checks the labels.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.neighbors import LocalOutlierFactor
    >>> from skpatchcore.metrics import image_auroc_scorer
    >>> rng = np.random.RandomState(0)
    >>> X_train = rng.normal(size=(50, 2))
    >>> X_test = np.r_[rng.normal(size=(10, 2)), rng.normal(6, 1, size=(5, 2))]
    >>> y_test = np.r_[np.ones(10, dtype=int), -np.ones(5, dtype=int)]
    >>> lof = LocalOutlierFactor(novelty=True).fit(X_train)
    >>> image_auroc_scorer(lof, X_test, y_test)
    1.0
    """
    is_anomalous = _outlier_labels(y)
    return image_auroc(is_anomalous, -np.asarray(estimator.score_samples(X), dtype=np.float64))


def _predict_maps(estimator, X):
    if not hasattr(estimator, "predict_map"):
        raise ValueError(
            f"{type(estimator).__name__} has no predict_map method: pixel-level scorers need a "
            "detector (or a PatchCore pipeline) that returns anomaly maps."
        )
    return estimator.predict_map(X)


def pixel_auroc_scorer(estimator, X, y):
    """Pixel AUROC of a fitted detector's anomaly maps, as a scorer for ``GridSearchCV``.

    Parameters
    ----------
    estimator : object
        A fitted detector with ``predict_map(X)`` returning anomaly maps (higher = more
        anomalous) of the shape of the masks.
    X : array-like
        The images to score.
    y : array-like of shape (n_images, H, W)
        The ground-truth defect masks of the images (bool or 0/1, True/1 = defect pixel),
        passed to ``GridSearchCV.fit`` as ``y``.

    Returns
    -------
    auroc : float
        ``pixel_auroc(y, estimator.predict_map(X))``.

    Notes
    -----
    Each validation fold must contain defect pixels; with few anomalous images, use a
    ``cv`` splitter that guarantees it (for example a ``PredefinedSplit``).
    """
    return pixel_auroc(y, _predict_maps(estimator, X))


def aupro_scorer(estimator, X, y):
    """AUPRO (``fpr_limit=0.3``) of a fitted detector's anomaly maps, as a scorer.

    Parameters
    ----------
    estimator : object
        A fitted detector with ``predict_map(X)`` returning anomaly maps (higher = more
        anomalous) of the shape of the masks.
    X : array-like
        The images to score.
    y : array-like of shape (n_images, H, W)
        The ground-truth defect masks of the images (bool or 0/1, True/1 = defect pixel),
        passed to ``GridSearchCV.fit`` as ``y``.

    Returns
    -------
    aupro : float
        ``aupro(y, estimator.predict_map(X))``.

    Notes
    -----
    For another limit, wrap :func:`aupro` yourself, for example
    ``lambda est, X, y: aupro(y, est.predict_map(X), fpr_limit=0.05)``.
    """
    return aupro(y, _predict_maps(estimator, X))
