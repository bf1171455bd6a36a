"""Focus Your Distribution (FYD): spatial transformers align the good images and their
features (coarse alignment), a non-contrastive loss pulls the features of corresponding
positions of different good images together (fine alignment), and PaDiM's per-position
Gaussians on the aligned features score patches by Mahalanobis distance."""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from ._trained import SCORE_BATCH, TrainedDetector
from .features import aggregate
from .padim import fit_gaussians, mahalanobis_distances

__all__ = ["FocusDistributionDetector"]

#: The backbone stages whose features are aligned and modelled (strides 8 and 16: the
#: mid-level pair of EfficientNet-Lite, as FeatureExtractor's and so PaDiMDetector's default).
_LAYERS = ("blocks.2", "blocks.4")
#: Side of the low-resolution copy of each frame that the image-level localisation network
#: reads and the image-level alignment loss compares.
_ALIGN_SIZE = 64
#: Side of the neighbourhood averaged around each feature position (as FeatureExtractor).
_PATCH = 3
#: Bounds of the transforms, (rotation in radians, translation, log of the scale), in the
#: normalised coordinates of grid_sample (the frame spans [-1, 1]: a translation of 0.25 is
#: an eighth of the frame).
_IMAGE_BOUNDS = (math.pi / 6, 0.25, math.log(1.1))
_FEATURE_BOUNDS = (math.pi / 90, 0.0625, math.log(1.025))
#: Hidden channels of the residual adapter; channels of the projector and predictor (which
#: exist during training only).
_ADAPTER_WIDTH = 32
_PROJECTION = 64
_PENALTY = 1.0


def _affine(params, bounds):
    """(b, 4) unbounded parameters -> (b, 2, 3) affine matrices of a bounded rotation,
    isotropic scale and translation; zeros give the identity."""
    rot, shift, log_scale = bounds
    angle = rot * torch.tanh(params[:, 0])
    scale = torch.exp(log_scale * torch.tanh(params[:, 3]))
    t = shift * torch.tanh(params[:, 1:3])
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    return torch.stack([torch.stack([cos, -sin, t[:, 0]], dim=1),
                        torch.stack([sin, cos, t[:, 1]], dim=1)], dim=1)


def _warp(x, theta, padding_mode):
    """``out(p) = x(theta p)`` (grid_sample's convention, bilinear)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode,
                         align_corners=False)


def _compose(outer, inner):
    """The affine map p -> outer(inner(p)) of two (b, 2, 3) matrices."""
    a = outer[:, :, :2] @ inner[:, :, :2]
    t = outer[:, :, :2] @ inner[:, :, 2:] + outer[:, :, 2:]
    return torch.cat([a, t], dim=2)


def _invert(theta):
    """The inverse of (b, 2, 3) affine maps."""
    a = torch.linalg.inv(theta[:, :, :2])
    return torch.cat([a, -a @ theta[:, :, 2:]], dim=2)


class _SpatialTransformer(nn.Module):
    """A localisation network predicting a bounded similarity transform (rotation, scale,
    translation) of its input, initialised to the identity (last layer zero), as Jaderberg
    et al.'s spatial transformer.

    The transforms are relative: the localisation network's output is centred (on the
    batch's mean in training, on the training images' mean, ``center``, afterwards), so
    that the images are aligned with each other and no warp common to all of them is
    learnt (see the Notes of :class:`FocusDistributionDetector`).
    """

    def __init__(self, c_in, convs, bounds, padding_mode):
        super().__init__()
        layers, c = [], c_in
        for c_out, stride in convs:
            layers += [nn.Conv2d(c, c_out, 3, stride=stride, padding=1), nn.ReLU()]
            c = c_out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(16 * c, 32), nn.ReLU(), nn.Linear(32, 4))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("center", torch.zeros(4))
        self.bounds = bounds
        self.padding_mode = padding_mode

    def raw(self, x):
        """The localisation network's output (b, 4), not centred."""
        return self.head(self.features(x))

    def centred(self, x):
        raw = self.raw(x)
        return raw - (raw.mean(dim=0, keepdim=True) if self.training else self.center)

    def theta(self, x):
        return _affine(self.centred(x), self.bounds)

    def forward(self, x, theta):
        return _warp(x, theta, self.padding_mode)


class _ImageAligner(_SpatialTransformer):
    """The image-level spatial transformer: reads a low-resolution copy of the frame."""

    def __init__(self):
        super().__init__(3, [(8, 2), (16, 2), (32, 2)], _IMAGE_BOUNDS, "reflection")

    @staticmethod
    def small(x):
        return F.interpolate(x, size=(_ALIGN_SIZE, _ALIGN_SIZE), mode="bilinear",
                             align_corners=False, antialias=True)

    def theta(self, x):
        return self.theta_small(self.small(x))

    def theta_small(self, small):
        """The transform, from the low-resolution copy."""
        return super().theta(small - 0.5)

    def raw_small(self, small):
        return super().raw(small - 0.5)


class _FeatureAligners(nn.Module):
    """One feature-level spatial transformer per backbone stage."""

    def __init__(self, channels):
        super().__init__()
        self.stns = nn.ModuleList(
            _SpatialTransformer(c, [(16, 1)], _FEATURE_BOUNDS, "reflection") for c in channels)

    def forward(self, fmaps):
        """Aligned feature maps, each stage's transform (b, 2, 3) and its centred
        parameters (b, 4)."""
        raws = [stn.centred(f) for stn, f in zip(self.stns, fmaps, strict=True)]
        thetas = [_affine(r, stn.bounds) for stn, r in zip(self.stns, raws, strict=True)]
        aligned = [stn(f, t) for stn, f, t in zip(self.stns, fmaps, thetas, strict=True)]
        return aligned, thetas, raws


class _Adapter(nn.Module):
    """A residual block on the merged features, ``g + B relu(A g)`` with A a 3 x 3 and B a
    1 x 1 convolution, B zero-initialised: it starts as the identity (PaDiM's features)."""

    def __init__(self, channels, width):
        super().__init__()
        self.inner = nn.Conv2d(channels, width, 3, padding=1)
        self.outer = nn.Conv2d(width, channels, 1)
        nn.init.zeros_(self.outer.weight)
        nn.init.zeros_(self.outer.bias)

    def forward(self, g):
        return g + self.outer(F.relu(self.inner(g)))


def _heads(channels, width):
    """SimSiam's projector (with batch normalisation on its output) and bottleneck
    predictor, as 1 x 1 convolutions (every position is a sample)."""
    projector = nn.Sequential(
        nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))
    hidden = max(1, width // 4)
    predictor = nn.Sequential(
        nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, width, 1))
    return projector, predictor


def _merge(fmaps):
    """FeatureExtractor's locally aware features (:func:`~skpatchcore.features.aggregate`)
    of the stages, on the first (finest) stage's grid, concatenated."""
    return torch.cat(aggregate(fmaps, _PATCH, fmaps[0].shape[-2:]), dim=1)


def _alignment_loss(images):
    """The image-level alignment loss: mean over the ordered pairs (A, B) of different
    images of a batch, and over the pixels, of the L2 norm (over the colour channels) of
    A - B."""
    b = images.shape[0]
    diff = images[:, None] - images[None, :]
    dist = torch.sqrt(diff.pow(2).sum(dim=2) + 1e-8)  # (b, b, h, w)
    off = ~torch.eye(b, dtype=torch.bool, device=images.device)
    return dist[off].mean()


def _non_contrastive_loss(p, z):
    """Dense SimSiam loss between all pairs of different images of a batch at each
    position: the mean over ordered pairs (i, j), i != j, and positions of
    -cos(p_i, stopgrad(z_j)), with p the predictor's and z the projector's output."""
    b = p.shape[0]
    p = F.normalize(p, dim=1)
    z = F.normalize(z.detach(), dim=1)
    others = (z.sum(dim=0, keepdim=True) - z) / (b - 1)
    return -(p * others).sum(dim=1).mean()


class FocusDistributionDetector(TrainedDetector):
    """Focus Your Distribution: aligned, compact features of good images; Mahalanobis scores.

    FYD (Zheng et al., ICME 2022) makes PaDiM's per-position Gaussians sharper by aligning
    the good images before modelling them, coarse to fine:

    * Coarse alignment, image level: a spatial transformer (a localisation network that
      predicts a transform of the input, initialised to the identity) warps each image;
      it is trained to make the warped good images alike, with the L2 loss
      ``L_ica = sum over pairs (A, B), pixels (i, j) of ||T(A)_ij - T(B)_ij||_2``.
    * Coarse alignment, feature level: a spatial transformer on each backbone stage's
      feature map.
    * Fine alignment: non-contrastive learning. The features of two different good images
      at the same position should agree: a projector and a predictor (SimSiam's) map the
      features, and the loss is the negative cosine similarity between one image's
      prediction and the other's projection, with a stop-gradient on the projection, over
      all pairs of images of a batch and all positions.
    * Then, as PaDiM (:class:`PaDiMDetector`, whose code this reuses): one Gaussian per
      feature-grid position, fitted on the aligned features of the training images after
      the networks are trained; a patch's score is its Mahalanobis distance, the image's
      the largest of its patches.

    Signs (as :class:`sklearn.ensemble.IsolationForest`): :meth:`score_samples` is minus
    the largest Mahalanobis distance (lower = more abnormal), ``decision_function =
    score_samples - offset_`` (< 0 = defect), :meth:`predict` gives +1 (good) / -1
    (defect); the maps are Mahalanobis distances, higher = more anomalous.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        The frozen pretrained network (offline ImageNet weights): 'efficientnet_lite0',
        'efficientnet_lite1' or 'efficientnet_lite2'. Its stages 'blocks.2' and 'blocks.4'
        (strides 8 and 16; 40 + 112 = 152 channels for Lite0) are aligned and modelled.
    n_features : int or None, default=100
        Channels of the adapted features modelled by the Gaussians, drawn at random once
        (seeded by ``random_state``), as :class:`PaDiMDetector`'s ``n_features`` (the same
        default, for the same reason: the model stores an n x n Cholesky factor per
        position, 82 MB for a 32 x 32 grid at 100). None (or a value not below the number
        of channels) keeps all.
    reg : float >= 0, default=0.01
        Added to the diagonal of every covariance, as :class:`PaDiMDetector`'s ``reg`` (the
        features have the same scale as FeatureExtractor's).
    image_size : int, default=256
        Images are resized (see ``resize_mode``) into ``image_size`` x ``image_size``
        frames: a 32 x 32 feature grid (stride 8). See Notes for the time it costs.
    resize_mode : {'letterbox', 'stretch', 'pad'}, default='letterbox'
        'letterbox' keeps the aspect ratio and pads with mid-grey (the same default as
        FeatureExtractor's, so the Gaussians see the same features as PaDiMDetector's);
        'stretch' resizes to the square; 'pad' letterboxes without enlarging.
    max_epochs : int, default=20
        The fixed number of passes over the training images of each of the two training
        phases (no early stopping): the image-level alignment, then the feature-level and
        fine alignment (see Notes).
    batch_size : int >= 2, default=16
        Images per optimisation step; both losses compare the images of a batch with each
        other, so a batch holds at least two.
    learning_rate : float, default=1e-3
        Adam's learning rate, for every trained network.
    validation_fraction : float in (0, 0.5), default=0.1
        Share of the good training images held out (at least two) and scored after training
        to set ``offset_``; the Gaussians are fitted on the rest.
    contamination : 'auto' or float in (0, 0.5], default='auto'
        Sets ``offset_`` from the held-out images' scores: a float is that quantile of their
        ``score_samples``; 'auto' is Tukey's fence (an image is a defect above Q3 + 1.5 IQR
        of the held-out anomaly scores).
    device : str, default="auto"
        Where the networks run ('auto': CUDA when available, else the CPU).
    random_state : int, RandomState instance or None, default=None
        Seeds the held-out split, the networks' initialisation, the order of the batches
        and the channel selection: two fits with the same int give identical scores on the
        CPU.
    verbose : bool, default=False
        Progress bars (training shows the loss).

    Attributes
    ----------
    offset_ : float
        ``decision_function = score_samples - offset_``.
    train_loss_ : list of float
        Mean loss of each epoch of the second phase: the fine-alignment (non-contrastive)
        loss, which lies in [-1, 1] and falls as the features of different good images
        agree, plus the feature-level transformers' penalty (see Notes).
    image_alignment_loss_ : list of float
        Mean loss of each epoch of the first phase: the image-level alignment loss plus
        the image-level transformer's penalty.
    pixel_threshold_ : float
        The map threshold of :meth:`predict_mask`: the ``contamination`` rule applied to
        the peaks of the held-out good images' maps.
    n_epochs_ : int
        Epochs run in each phase (``max_epochs``).
    feature_indices_ : ndarray of shape (n_selected,), int64
        The modelled channels of the adapted features, in increasing order.
    grid_shape_ : tuple of (int, int)
        (h, w) of the feature grid.
    mean_ : ndarray of shape (h, w, n_selected), float64
        Mean of each position's Gaussian.
    cholesky_ : ndarray of shape (h, w, n_selected, n_selected), float64
        Lower Cholesky factor of each position's covariance plus ``reg * I``.
    n_train_images_ : int
        Good images trained on (and modelled by the Gaussians).
    n_validation_images_ : int
        Held-out good images whose scores set ``offset_``.
    weights_sha256_ : str
        SHA-256 of the backbone's weights file (checked when a model is loaded).

    See Also
    --------
    PaDiMDetector : The same Gaussians on unaligned, untrained features.
    DistillationDetector, StudentTeacherDetector : The other trained detectors.

    Notes
    -----
    Differences from the paper, and choices it leaves open:

    * Backbone: EfficientNet-Lite0 (offline weights) instead of the paper's ResNet, and it
      stays frozen: the paper trains the encoder with the alignment losses, which a CPU
      budget does not allow. What is trained instead: the image-level spatial transformer,
      one feature-level spatial transformer on each of the two stages used (on the stage's
      output; the paper inserts them inside its encoder, where the next stage reads the
      warped features), and a small residual adapter on the merged features (a 3 x 3
      convolution to 32 channels, ReLU, a 1 x 1 convolution back, added to its input; its
      last convolution starts at zero, so before training the features are PaDiM's). The
      adapter's output is what the Gaussians model; the projector and predictor are used
      for training only and are not kept.
    * Transforms: a rotation, an isotropic scale and a translation, each bounded (image:
      +/-30 degrees, +/-10% scale, +/-1/8 of the frame; features: +/-2 degrees, +/-2.5%,
      +/-1/32 of the grid, one cell of the stride-8 grid), instead of a free affine
      transform, and padded by reflection. Unbounded, the alignment losses have degenerate
      minima: zooming into a uniform region, or moving the content out of the frame,
      makes all images alike.
    * The transforms are relative: each localisation network's output is centred, on the
      batch's mean during training and on the mean over the training images afterwards
      (a fitted buffer, ``center``), so what is learnt is how the images differ from each
      other. A warp common to all images aligns nothing, but the losses reward one: a
      sub-pixel shift or rotation interpolates, i.e. smooths, every image and feature map,
      which makes them alike. In development runs without the centring, the feature-level
      transformers ran to their bounds in every image (one common warp) within a few
      epochs, and detection on MTD fell far below that of the untrained detector.
    * A penalty keeps every transformer near the identity unless aligning pays: the mean
      square of its centred parameters (before the bounds), with weight 1, is added to
      the image-level loss for the image-level transformer and to the fine-alignment loss
      for the feature-level ones (which have no loss of their own in the paper). On
      textures there is nothing to align and the transformers, free, fit noise (in
      development runs on MTD, the image-level transformer without the penalty lowered
      image AUROC clearly); with it, on 16 copies of a square at random places (the
      tests) the image-level transformer still narrows the spread of their centres (the
      test requires at least 30 %).
    * The image-level loss is computed on 64 x 64 copies of the frames (the alignment it
      drives is coarse), averaged rather than summed, over the pairs of images of a batch.
    * Training in two phases of ``max_epochs`` epochs each: first the image-level
      transformer with its loss alone, then, with it fixed, the backbone features of the
      aligned training images are computed once and kept in memory (about 280 kB per image
      at 256 px, 160 MB for 570 images, growing with the square of ``image_size``), and
      the feature-level transformers, the adapter, projector and predictor are trained with
      the non-contrastive loss. The paper trains its networks jointly; here the
      non-contrastive loss does not reach the image-level transformer (it would need the
      backbone's backward pass, which the CPU budget cannot pay).
    * Non-contrastive loss: SimSiam's symmetric loss, averaged over every ordered pair of
      different images of a batch (computed exactly, in time linear in the batch) and
      every position of the 32 x 32 grid; projector 152 -> 64 -> 64 channels with batch
      normalisation, predictor 64 -> 16 -> 64. Adam at ``learning_rate`` for everything.
    * Features as :class:`FeatureExtractor`'s (each stage averaged over 3 x 3
      neighbourhoods, brought to the stride-8 grid, scaled by 1/sqrt(channels)), after the
      feature-level alignment. The image score is the largest Mahalanobis distance of the
      grid (PaDiM's, see :class:`PaDiMDetector`); the paper normalises its scores over the
      test set.
    * Maps: the distance grid is warped back into the input frame's coordinates through
      the inverse of the image's transform composed with the stride-8 stage's feature
      transform, so that defects are located where they are in the image.
    * The threshold ``offset_`` comes from held-out good images (the paper reports AUROC
      only).

    What the training buys here: little. With the backbone frozen, the Gaussians' whitening
    already undoes any invertible change of the features, and on these data sets there is
    little misalignment to correct. Against :class:`PaDiMDetector` on the same Lite0
    features at 256 px (``border=0``), on random subsets (150 training, 100 test images):
    MTD image / pixel AUROC 0.881 / 0.866 against 0.885 / 0.868, tire 0.746 / 0.944
    against 0.715 / 0.944 (``python benchmarks/trained_subset.py ROOT --method fyd`` and
    ``--method padim --param backbone=efficientnet_lite0 --param image_size=256 --param
    border=0``; docs/benchmarks.md). The objects of tire gain a little, the textures of MTD
    nothing.

    Cost and accuracy at the defaults, on all of MTD (634 training images, 571 trained on
    and 63 held out; 710 test images) on an otherwise idle 2-core CPU: fit 110 s, 28 ms
    per test image with its map, peak RSS 2.2 GB; image AUROC 0.901, pixel AUROC 0.831,
    AUPRO@0.3 0.747 (``python -m skpatchcore.evaluate ../shared/datasets/mtd --method
    fyd``; docs/benchmarks.md, "Every method on MTD"). Both training phases grow linearly
    with ``max_epochs`` and the number of images, the backbone pass and the second phase
    with the square of ``image_size``.

    References
    ----------
    Y. Zheng, X. Wang, R. Deng, T. Bao, R. Zhao and L. Wu, "Focus Your Distribution:
    Coarse-to-Fine Non-Contrastive Learning for Anomaly Detection and Localization", ICME
    2022 (arXiv:2110.04538).

    Examples
    --------
    >>> from skpatchcore import FocusDistributionDetector
    >>> from skpatchcore.datasets import make_defect_images
    >>> X, y, masks = make_defect_images(12, 4, image_size=64, random_state=0)
    >>> det = FocusDistributionDetector(image_size=64, max_epochs=1, n_features=20,
    ...                                 random_state=0).fit(X[y == 1])
    >>> det.score_samples(X).shape
    (16,)
    >>> det.predict_map(X[:2]).shape
    (2, 64, 64)
    """

    _parameter_constraints: dict = {
        **TrainedDetector._common_constraints,
        "batch_size": [Interval(Integral, 2, None, closed="left")],
        "backbone": [StrOptions({"efficientnet_lite0", "efficientnet_lite1",
                                 "efficientnet_lite2"})],
        "n_features": [Interval(Integral, 1, None, closed="left"), None],
        "reg": [Interval(Real, 0, None, closed="left")],
    }

    def __init__(
        self,
        *,
        backbone="efficientnet_lite0",
        n_features=100,
        reg=0.01,
        image_size=256,
        resize_mode="letterbox",
        max_epochs=20,
        batch_size=16,
        learning_rate=1e-3,
        validation_fraction=0.1,
        contamination="auto",
        device="auto",
        random_state=None,
        verbose=False,
    ):
        self.backbone = backbone
        self.n_features = n_features
        self.reg = reg
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.validation_fraction = validation_fraction
        self.contamination = contamination
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ architecture
    @property
    def _pretrained(self):
        return self.backbone, _LAYERS

    def _build(self):
        channels = self._pretrained_channels()
        return {"image_stn": _ImageAligner(),
                "feature_stn": _FeatureAligners(channels),
                "adapter": _Adapter(sum(channels), _ADAPTER_WIDTH)}

    def _fitted_arrays(self):
        return {"feature_indices_": (np.int64, (None,)),
                "mean_": (np.float64, (None, None, None)),
                "cholesky_": (np.float64, (None, None, None, None))}

    # ------------------------------------------------------------------ the networks
    def _backbone_maps(self, x):
        """The frozen backbone's stage maps of a float batch in [0, 1] (aligned already)."""
        network, (mean, std) = self._pretrained_network()
        return network((x - mean) / std)

    def _align_images(self, x):
        stn = self._nets["image_stn"]
        theta = stn.theta(x)
        return stn(x, theta), theta

    def _encode(self, fmaps):
        """Stage maps -> adapted features (b, c, h, w), the feature transforms and their
        centred parameters."""
        aligned, thetas, raws = self._nets["feature_stn"](fmaps)
        return self._nets["adapter"](_merge(aligned)), thetas, raws

    # ------------------------------------------------------------------ training
    def _train(self, frames, rng):
        device = self._device()
        n = len(frames)
        channels = sum(self._pretrained_channels())
        if self.n_features is None or self.n_features >= channels:
            self.feature_indices_ = np.arange(channels, dtype=np.int64)
        else:
            chosen = rng.choice(channels, size=self.n_features, replace=False)
            self.feature_indices_ = np.sort(chosen).astype(np.int64)
        self.image_alignment_loss_ = self._train_image_alignment(frames, rng, device)
        fmaps = self._cached_maps(frames, device)
        losses = self._train_fine_alignment(fmaps, rng, n)
        self._fit_gaussians(fmaps)
        return losses

    def _train_image_alignment(self, frames, rng, device):
        """Phase 1: the image-level transformer, with the image-level alignment loss on
        low-resolution copies of the frames."""
        small = torch.cat([_ImageAligner.small(self._float(frames[a : a + SCORE_BATCH], device))
                           for a in range(0, len(frames), SCORE_BATCH)])
        stn = self._nets["image_stn"].train()
        optimizer = torch.optim.Adam(stn.parameters(), lr=self.learning_rate)
        losses = self._fit_epochs("aligning", len(frames), rng, optimizer,
                                  lambda idx: self._image_loss(stn, small[idx]))
        stn.eval()
        with torch.no_grad():
            stn.center.copy_(torch.cat([stn.raw_small(small[a : a + SCORE_BATCH])
                                        for a in range(0, len(small), SCORE_BATCH)]).mean(0))
        return losses

    @staticmethod
    def _image_loss(stn, small):
        """The image-level alignment loss of a batch of low-resolution copies, plus the
        transformer's penalty."""
        raw = stn.centred(small - 0.5)
        aligned = stn(small, _affine(raw, stn.bounds))
        return _alignment_loss(aligned) + _PENALTY * raw.pow(2).mean()

    def _cached_maps(self, frames, device):
        """The backbone's stage maps of the aligned training frames (computed once)."""
        self._nets["image_stn"].eval()
        out = []
        with torch.no_grad():
            for a in range(0, len(frames), SCORE_BATCH):
                x, _ = self._align_images(self._float(frames[a : a + SCORE_BATCH], device))
                out.append(self._backbone_maps(x))
        return [torch.cat(m) for m in zip(*out, strict=True)]

    def _train_fine_alignment(self, fmaps, rng, n):
        """Phase 2: feature-level transformers, adapter, projector and predictor, with the
        non-contrastive loss."""
        feature_stn, adapter = self._nets["feature_stn"], self._nets["adapter"]
        projector, predictor = _heads(adapter.outer.out_channels, _PROJECTION)
        device = self._device()
        projector, predictor = projector.to(device), predictor.to(device)
        modules = [feature_stn, adapter, projector, predictor]
        for m in modules:
            m.train()
        optimizer = torch.optim.Adam([p for m in modules for p in m.parameters()],
                                     lr=self.learning_rate)

        def loss(idx):
            e, _, raws = self._encode([f[idx] for f in fmaps])
            z = projector(e)
            penalty = sum(r.pow(2).mean() for r in raws)
            return _non_contrastive_loss(predictor(z), z) + _PENALTY * penalty

        losses = self._fit_epochs("training", n, rng, optimizer, loss)
        feature_stn.eval()
        adapter.eval()
        with torch.no_grad():
            for k, stn in enumerate(feature_stn.stns):
                stn.center.copy_(torch.cat([stn.raw(fmaps[k][a : a + SCORE_BATCH])
                                            for a in range(0, n, SCORE_BATCH)]).mean(0))
        return losses

    def _rows(self, e):
        """Adapted features (b, c, h, w) -> numpy rows (b, h * w, n_selected), float32."""
        idx = torch.as_tensor(self.feature_indices_, device=e.device)
        e = e.index_select(1, idx)
        return e.permute(0, 2, 3, 1).reshape(e.shape[0], -1, e.shape[1]).cpu().numpy()

    def _fit_gaussians(self, fmaps):
        """PaDiM's Gaussians on the adapted features of the training images."""
        n = fmaps[0].shape[0]
        rows = None
        with torch.no_grad():
            for a in range(0, n, SCORE_BATCH):
                e, _, _ = self._encode([f[a : a + SCORE_BATCH] for f in fmaps])
                r = self._rows(e)
                if rows is None:
                    self.grid_shape_ = (int(e.shape[2]), int(e.shape[3]))
                    rows = np.empty((n, *r.shape[1:]), dtype=np.float32)
                rows[a : a + len(r)] = r
        dim = rows.shape[2]
        means, factors, _, _ = fit_gaussians(
            rows, np.arange(dim), self.reg, device=self._device(),
            grid_shape=self.grid_shape_, leave_one_out=False)
        h, w = self.grid_shape_
        self.mean_ = means.reshape(h, w, dim)
        self.cholesky_ = factors.reshape(h, w, dim, dim)

    # ------------------------------------------------------------------ scoring
    def _anomaly(self, x):
        with torch.no_grad():
            aligned, theta = self._align_images(x)
            e, thetas, _ = self._encode(self._backbone_maps(aligned))
            rows = self._rows(e)
            dist = mahalanobis_distances(rows, np.arange(rows.shape[2]), self.mean_,
                                         self.cholesky_, device=self._device())
            grid = torch.from_numpy(dist.reshape(len(x), *self.grid_shape_)).float()
            # grid(p) describes the input at theta(phi(p)): warp it back by the inverse
            back = _invert(_compose(theta, thetas[0])).cpu()
            maps = _warp(grid[:, None], back, "border")[:, 0]
        return dist.max(axis=1), maps.numpy().astype(np.float32)
