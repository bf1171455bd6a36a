"""Multiresolution Knowledge Distillation (MKD): a small cloner network trained to reproduce a
frozen pretrained source network's activations at several depths; its failure to do so on an
image is the anomaly score, the gradient of that failure with respect to the image the map."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import grey_opening
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from ._trained import SCORE_BATCH, TrainedDetector
from .backbones import get_backbone_spec

__all__ = ["DistillationDetector"]

#: Seed of the SmoothGrad noise (one fixed pattern, shared by every image: an image's map does
#: not depend on the other images scored with it, nor on their order).
_NOISE_SEED = 0


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward pass keeps only positive gradients at positive inputs (guided
    backpropagation, Springenberg et al. 2015)."""

    @staticmethod
    def forward(ctx, x):
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0).to(grad.dtype)


class _ConvBNReLU(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x, guided=False):
        x = self.bn(self.conv(x))
        return _GuidedReLU.apply(x) if guided else F.relu(x)


class _Cloner(nn.Module):
    """A VGG-like pyramid with one stage per octave (strides 2, 4, 8, ...): the first stage
    is a strided 3 x 3 conv-BN-ReLU and a second one, every later stage a 2 x 2 max pooling
    and two 3 x 3 conv-BN-ReLU. At every stride where the source has a critical layer, a
    linear 3 x 3 convolution (the head) produces that layer's channels, and the next stage
    reads the head's output (as VGG's next block reads the pooled critical layer).

    Widths: ``width`` at stride 2, doubled at every octave after, up to 8 * ``width``.
    """

    def __init__(self, strides, channels, width):
        super().__init__()
        self.critical = {int(s): i for i, s in enumerate(strides)}
        stages, heads = [], {}
        c_in = 3
        for j in range(1, int(np.log2(max(strides))) + 1):
            w = width * 2 ** min(j - 1, 3)
            stages.append(nn.ModuleList([_ConvBNReLU(c_in, w, stride=1 if j > 1 else 2),
                                         _ConvBNReLU(w, w)]))
            c_in = w
            if 2**j in self.critical:
                c_out = int(channels[self.critical[2**j]])
                heads[str(j)] = nn.Conv2d(w, c_out, 3, padding=1)
                c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleDict(heads)
        self.guided = False

    def forward(self, x):
        out = [None] * len(self.critical)
        for j, convs in enumerate(self.stages, start=1):
            if j > 1:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            for conv in convs:
                x = conv(x, self.guided)
            if str(j) in self.heads:
                x = self.heads[str(j)](x)
                out[self.critical[2**j]] = x
        return out


def _disc(size):
    """Flat structuring element: a disc of diameter ``size`` (3: the 3 x 3 cross, OpenCV's
    3 x 3 ellipse)."""
    r = (size - 1) / 2.0
    i, j = np.mgrid[:size, :size] - r
    return (i * i + j * j) <= r * r + 1e-9


class DistillationDetector(TrainedDetector):
    """Multiresolution Knowledge Distillation: a cloner network distils a frozen source.

    MKD (Salehi et al., CVPR 2021) trains a small network, the *cloner*, from scratch to
    reproduce the activations of a frozen ImageNet-pretrained *source* network at several
    "critical" layers of increasing depth (strides 4, 8, 16, 32), on good images only. On a
    defective image the cloner, which has only learnt the source's behaviour on good images,
    fails to imitate it; the size of the failure is the anomaly score. Per critical layer k
    with source activations s_k and cloner activations c_k (N_k elements)::

        value_k     = ||s_k - c_k||^2 / N_k
        direction_k = 1 - cos(vec(s_k), vec(c_k))
        loss        = sum_k value_k + direction_weight * sum_k direction_k

    The loss of each image, averaged over a batch, is what training minimises; the loss of
    one image is its anomaly score. The map is the gradient attribution of that loss with
    respect to the image: the absolute gradient averaged over the colour channels, then a
    grey-scale morphological opening (``opening_size``); :meth:`score_and_map` and
    :meth:`predict_map` then smooth it with a Gaussian of ``sigma`` (default 4 input pixels,
    the paper's).

    Signs (as :class:`sklearn.ensemble.IsolationForest`): :meth:`score_samples` is minus the
    loss (lower = more abnormal), ``decision_function = score_samples - offset_`` (< 0 =
    defect), :meth:`predict` gives +1 (good) / -1 (defect); the maps are higher = more
    anomalous. The maps are gradient magnitudes, not on the scale of the scores, so
    :meth:`predict_mask` thresholds them at ``pixel_threshold_`` (from the held-out good
    images' maps), not at the image threshold ``-offset_``.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        The frozen source network (offline ImageNet weights): 'efficientnet_lite0', '_lite1'
        or '_lite2'.
    layers : tuple of str, default=("blocks.1", "blocks.2", "blocks.4", "blocks.6")
        The source's critical layers, at strictly increasing strides that are powers of 2.
        The default is the last stage of EfficientNet-Lite at each of the strides 4, 8, 16
        and 32 (24, 40, 112 and 320 channels for Lite0), as the paper takes the last layer
        of each of VGG-16's blocks.
    cloner_width : int, default=16
        Channels of the cloner's convolutions at stride 2 (16, as the narrow layers of the
        paper's cloner), doubled at every octave after up to 8 * ``cloner_width`` (128 at
        the default). With the default layers the cloner has 1.07 M weights and costs 82 M
        multiply-adds on a 128 x 128 image, against the (truncated) Lite0 source's 2.9 M
        weights and 119 M multiply-adds.
    direction_weight : float >= 0, default=100.0
        lambda, the weight of the direction loss against the value loss (0: value loss
        only). At 100 the two terms are of the same order once the cloner is trained (the
        value loss is a mean square of activations, a few units per layer, the direction
        loss one minus a cosine, a few hundredths per layer); on a random subset of
        MTD (150 training, 100 test images) image / pixel AUROC were 0.882 / 0.738 at
        100, 0.854 / 0.728 at 20 and 0.823 / 0.710 at 1 (``python
        benchmarks/trained_subset.py ../shared/datasets/mtd --method mkd --param
        direction_weight=100``, and so on; docs/benchmarks.md). See Notes.
    attribution : {'gradient', 'guided', 'smoothgrad'}, default='gradient'
        How the map is computed: 'gradient' is vanilla backpropagation of the loss to the
        image; 'guided' is guided backpropagation through the cloner's ReLUs (the source's
        are left as they are, as in the authors' code); 'smoothgrad' averages the absolute
        gradient over ``smoothgrad_samples`` copies of the image with Gaussian noise added
        (``smoothgrad_samples`` times the scoring cost). The image score does not depend on
        it.
    smoothgrad_samples : int, default=8
        Noisy copies per image for ``attribution='smoothgrad'``.
    smoothgrad_noise : float, default=0.1
        Standard deviation of that noise, in units of the [0, 1] pixel range. The noise is
        one fixed pattern (seeded) shared by all images, so an image's map does not depend
        on the batch it is scored in.
    opening_size : int, default=3
        Diameter of the flat disc used for the grey-scale opening of each map (3: the 3 x 3
        cross, the paper's 3 x 3 elliptical kernel); 1 disables the opening.
    image_size : int, default=128
        Images are resized to ``image_size`` x ``image_size`` pixels (the paper's 128).
    resize_mode : {'letterbox', 'stretch'}, default='stretch'
        'stretch' resizes each image to the square (textures and tiles of varying aspect
        ratio keep all their pixels); 'letterbox' keeps the aspect ratio and pads.
    max_epochs : int, default=80
        The fixed number of passes over the training images (no early stopping, no
        schedule). 80 epochs of the 571 images kept of MTD's 634 (the whole fit: 246 s
        on an idle 2-core CPU, see Notes) are 2 900 steps of 16 images, against the paper's 601
        epochs of a few hundred images in batches of 64 on a GPU (a similar number of
        steps).
    batch_size : int, default=16
        Images per optimisation step.
    learning_rate : float, default=1e-3
        Adam's learning rate (the paper's optimiser and rate).
    validation_fraction : float in (0, 0.5), default=0.1
        Share of the good training images held out (at least two) and scored after training
        to set ``offset_``; the rest are trained on.
    contamination : 'auto' or float in (0, 0.5], default='auto'
        Sets ``offset_`` from the held-out images' scores: a float is that quantile of their
        ``score_samples``; 'auto' is Tukey's fence (an image is a defect above Q3 + 1.5 IQR
        of the held-out anomaly scores).
    device : str, default="auto"
        Where the networks run ('auto': CUDA when available, else the CPU).
    random_state : int, RandomState instance or None, default=None
        Seeds the held-out split, the cloner's initialisation and the order of the batches:
        two fits with the same int give identical scores on the CPU.
    verbose : bool, default=False
        Progress bars (training shows the loss).

    Attributes
    ----------
    offset_ : float
        ``decision_function = score_samples - offset_``.
    pixel_threshold_ : float
        Default threshold of :meth:`predict_mask`: the held-out good images' largest map
        values (at ``sigma`` = 4) put through ``contamination`` as their scores are for
        ``offset_`` ('auto': Q3 + 1.5 IQR of those maxima).
    train_loss_ : list of float
        Mean training loss of each epoch.
    n_epochs_ : int
        Epochs run (``max_epochs``).
    n_train_images_ : int
        Good images the cloner was trained on.
    n_validation_images_ : int
        Held-out good images whose scores set ``offset_``.
    weights_sha256_ : str
        SHA-256 of the source network's weights file (checked when a model is loaded).

    See Also
    --------
    PatchCoreDetector : Nearest neighbours of pretrained patch features, no training.

    Notes
    -----
    Differences from the paper, and choices it leaves open:

    * Source network: EfficientNet-Lite0 (the offline weights this package ships) instead
      of VGG-16. Its critical layers are the last stage at each of the strides 4, 8, 16
      and 32, in place of VGG-16's pooled block outputs at the same strides. Lite's stage
      outputs are linear projections (they can be negative), so the cloner's outputs at
      the critical layers are linear convolutions (VGG's are pooled ReLUs).
    * Cloner: VGG-like (3 x 3 convolutions, batch normalisation, ReLU, 2 x 2 max pooling,
      trained from scratch), smaller than the source as in the paper, but with widths that
      grow with depth (16 to 128) rather than the paper's 16 everywhere except the layer
      that matches each critical layer, and starting with a strided convolution instead of
      a block at full resolution (which took most of the CPU time). A stage reads the
      previous critical layer's output, as in VGG.
    * Loss weighting: the paper writes ``value + lambda * direction``; the authors' code
      computes ``direction + lamda * value`` with lamda = 0.5 on MVTec AD and 0.01 on the
      other data sets, i.e. direction_weight = 2 and 100 in the paper's form, for VGG
      activations. The value loss depends on the scale of the source's activations, so
      the weight does not carry over from VGG; on EfficientNet-Lite0's activations 100 was
      the best of 1, 20 and 100 on an MTD subset (see ``direction_weight``).
    * Training budget: a fixed ``max_epochs`` (80, for the CPU) instead of 601, Adam at the
      paper's 1e-3, batches of 16. The source's activations of the training images are
      computed once (they do not change: no augmentation, as in the paper) and kept in
      memory (on the device): 188 kB per image at 128 px with the default layers (107 MB
      for the 571 images MTD trains on), growing with the square of ``image_size``.
    * Localisation: the paper smooths the attribution map (Gaussian, sigma 4) and opens the
      thresholded binary masks with a 3 x 3 kernel. Here the opening is grey-scale
      (:func:`scipy.ndimage.grey_opening`, edges repeated) and
      applied to the map before the Gaussian (a flat opening commutes with thresholding, so
      it is the binary opening of every threshold of the unsmoothed map); the Gaussian is
      the ``sigma`` of :meth:`score_and_map` (default 4, in network-input pixels, as the
      paper's sigma 4 at 128 px), applied once. The maps are not normalised per image (the
      authors' code scales each map to its own 99th percentile), so that maps of different
      images compare.
    * SmoothGrad's noise is one fixed pattern for all images (see ``smoothgrad_noise``).
    * The threshold ``offset_`` comes from held-out good images (the paper reports AUROC
      only).

    Cost and accuracy at the defaults, on all of MTD (634 training images, 571 trained on
    and 63 held out; 710 test images) on an otherwise idle 2-core CPU: fit 246 s (the
    cloner's training steps take most of it; the source's activations of the training
    images are computed once), 21 ms per test image with its map (a forward and a
    backward pass through both networks; :meth:`score_samples` skips the backward pass,
    ``attribution='smoothgrad'`` multiplies the map's cost by ``smoothgrad_samples``), peak
    RSS 1.7 GB; image AUROC 0.885, pixel AUROC 0.752, AUPRO@0.3 0.575 (``python -m
    skpatchcore.evaluate ../shared/datasets/mtd --method mkd``; docs/benchmarks.md, "Every
    method on MTD"). Fit time grows linearly with ``max_epochs`` and the number of images,
    and with the square of ``image_size``.

    References
    ----------
    M. Salehi, N. Sadjadi, S. Baselizadeh, M. H. Rohban and H. R. Rabiee, "Multiresolution
    Knowledge Distillation for Anomaly Detection", CVPR 2021 (arXiv:2011.11108).

    Examples
    --------
    >>> from skpatchcore import DistillationDetector
    >>> from skpatchcore.datasets import make_defect_images
    >>> X, y, masks = make_defect_images(12, 4, image_size=64, random_state=0)
    >>> det = DistillationDetector(image_size=32, max_epochs=1, cloner_width=4,
    ...                            random_state=0).fit(X[y == 1])
    >>> det.score_samples(X).shape
    (16,)
    >>> det.predict_map(X[:2]).shape
    (2, 64, 64)
    """

    _parameter_constraints: dict = {
        **TrainedDetector._common_constraints,
        "backbone": [StrOptions({"efficientnet_lite0", "efficientnet_lite1",
                                 "efficientnet_lite2"})],
        "layers": [tuple, list],
        "cloner_width": [Interval(Integral, 1, None, closed="left")],
        "direction_weight": [Interval(Real, 0, None, closed="left")],
        "attribution": [StrOptions({"gradient", "guided", "smoothgrad"})],
        "smoothgrad_samples": [Interval(Integral, 1, None, closed="left")],
        "smoothgrad_noise": [Interval(Real, 0, None, closed="neither")],
        "opening_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        *,
        backbone="efficientnet_lite0",
        layers=("blocks.1", "blocks.2", "blocks.4", "blocks.6"),
        cloner_width=16,
        direction_weight=100.0,
        attribution="gradient",
        smoothgrad_samples=8,
        smoothgrad_noise=0.1,
        opening_size=3,
        image_size=128,
        resize_mode="stretch",
        max_epochs=80,
        batch_size=16,
        learning_rate=1e-3,
        validation_fraction=0.1,
        contamination="auto",
        device="auto",
        random_state=None,
        verbose=False,
    ):
        self.backbone = backbone
        self.layers = layers
        self.cloner_width = cloner_width
        self.direction_weight = direction_weight
        self.attribution = attribution
        self.smoothgrad_samples = smoothgrad_samples
        self.smoothgrad_noise = smoothgrad_noise
        self.opening_size = opening_size
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
        return self.backbone, tuple(self.layers)

    def _strides(self):
        spec = get_backbone_spec(self.backbone)
        return [spec.layers[layer][0] for layer in self.layers]

    def _check_before_training(self):
        spec = get_backbone_spec(self.backbone)
        layers = list(self.layers)
        unknown = [layer for layer in layers if layer not in spec.layers]
        if not layers or unknown:
            raise ValueError(
                f"layers={self.layers!r} is not valid for backbone {self.backbone!r}: choose "
                f"one or more of {list(spec.layers)} (one per stride), e.g. "
                "('blocks.1', 'blocks.2', 'blocks.4', 'blocks.6').")
        strides = self._strides()
        if any(b <= a for a, b in zip(strides, strides[1:], strict=False)):
            raise ValueError(
                f"layers={self.layers!r} have strides {strides}: the critical layers must be "
                "in order of strictly increasing stride (the cloner matches one layer per "
                "stride), e.g. ('blocks.1', 'blocks.2', 'blocks.4', 'blocks.6').")
        if max(strides) > self.image_size:
            raise ValueError(
                f"layer {layers[-1]!r} has stride {max(strides)}, more than image_size="
                f"{self.image_size}: use a larger image_size or shallower layers.")

    def _build(self):
        return {"cloner": _Cloner(self._strides(), self._pretrained_channels(),
                                  self.cloner_width)}

    # ------------------------------------------------------------------ the loss
    def _losses(self, cloned, source):
        """Per-image loss (b,): value losses plus direction_weight times direction losses."""
        value, direction = 0.0, 0.0
        for c, s in zip(cloned, source, strict=True):
            c, s = c.flatten(1), s.flatten(1)
            value = value + (c - s).pow(2).mean(dim=1)
            direction = direction + (1.0 - F.cosine_similarity(c, s, dim=1, eps=1e-8))
        return value + self.direction_weight * direction

    # ------------------------------------------------------------------ training
    def _input(self, frames, device, mean, std):
        """uint8 frames -> the networks' normalised input, channels-last (on the CPU, oneDNN
        runs the depthwise convolutions' backward pass 2-3 times faster so)."""
        x = (self._float(frames, device) - mean) / std
        return x.contiguous(memory_format=torch.channels_last)

    def _train(self, frames, rng):
        device = self._device()
        source, (mean, std) = self._pretrained_network()
        targets = []
        with torch.no_grad():
            for a in range(0, len(frames), SCORE_BATCH):
                x = self._input(frames[a : a + SCORE_BATCH], device, mean, std)
                targets.append(source(x))
        targets = [torch.cat(t) for t in zip(*targets, strict=True)]
        cloner = self._nets["cloner"].train()
        optimizer = torch.optim.Adam(cloner.parameters(), lr=self.learning_rate)

        def loss_of(idx):
            x = self._input(frames[idx.cpu()], device, mean, std)
            return self._losses(cloner(x), [t[idx.to(t.device)] for t in targets]).mean()

        return self._fit_epochs("training", len(frames), rng, optimizer, loss_of)

    # ------------------------------------------------------------------ scoring
    def _anomaly_scores(self, x):
        """The loss of each image, without the backward pass the maps need."""
        source, (mean, std) = self._pretrained_network()
        with torch.no_grad():
            xn = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            return self._losses(self._nets["cloner"](xn), source(xn)).double().cpu().numpy()

    def _anomaly(self, x):
        source, (mean, std) = self._pretrained_network()
        cloner = self._nets["cloner"]
        smooth = self.attribution == "smoothgrad"
        if smooth:  # the scores of the image itself, the maps of its noisy copies
            scores = self._anomaly_scores(x)
        with torch.enable_grad():
            if smooth:
                gen = torch.Generator().manual_seed(_NOISE_SEED)
                noise = torch.randn((self.smoothgrad_samples, *x.shape[1:]), generator=gen)
                noise = noise.to(x.device) * self.smoothgrad_noise
                maps = torch.zeros(x.shape[0], *x.shape[2:], device=x.device)
                for t in range(self.smoothgrad_samples):
                    _, grad = self._loss_and_gradient(x + noise[t], source, cloner, mean, std)
                    maps += grad.abs().mean(dim=1)
                maps /= self.smoothgrad_samples
            else:
                loss, grad = self._loss_and_gradient(x, source, cloner, mean, std)
                scores = loss.double().cpu().numpy()
                maps = grad.abs().mean(dim=1)
        maps = maps.cpu().numpy().astype(np.float32)
        if self.opening_size > 1:
            footprint = _disc(self.opening_size)
            maps = np.stack([grey_opening(m, footprint=footprint, mode="nearest")
                             for m in maps])
        return scores, maps

    def _loss_and_gradient(self, x, source, cloner, mean, std):
        """Per-image losses (b,) and their gradients with respect to ``x`` (b, 3, H, W).
        The images are independent (batch normalisation in eval mode), so the gradient of
        the summed loss is each image's own gradient."""
        x = x.detach().clone().requires_grad_(True)
        xn = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        cloner.guided = self.attribution == "guided"
        try:
            scores = self._losses(cloner(xn), source(xn))
        finally:
            cloner.guided = False
        (grad,) = torch.autograd.grad(scores.sum(), x)
        return scores.detach(), grad
