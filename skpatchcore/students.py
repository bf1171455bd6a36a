"""Uninformed Students: an ensemble of student networks regresses a pretrained teacher's dense
descriptors on good images; their error and their disagreement make the anomaly map."""

from __future__ import annotations

from numbers import Integral

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import Interval
from torch import nn

from ._geometry import upsample_maps
from ._trained import TrainedDetector
from .backbones import get_backbone_spec

__all__ = ["StudentNet", "StudentTeacherDetector", "standardize_image"]

#: The frozen pretrained network whose layers are the teacher's descriptors.
_BACKBONE = "efficientnet_lite0"
#: Adam's weight decay (the paper's 1e-5).
_WEIGHT_DECAY = 1e-5
#: Share of the training images (at least 1) held out of the students' training: the
#: validation images whose maps set the statistics that standardise the error and variance.
_STATS_FRACTION = 0.1
#: Gaussian smoothing (network-input pixels) of the map whose maximum is the image score.
_SCORE_SIGMA = 4.0
#: Frames per teacher / statistics pass.
_CHUNK = 8
#: ``normalize_images``: each image's grey levels are mapped to median 0.5 and this spread.
_SPREAD = 0.15


def standardize_image(image):
    """An image (c, h, w) in [0, 1] with its grey levels mapped to median 0.5 and a spread
    of 0.15 (the interquartile range over 1.349, the std of a normal distribution), all
    channels together so that colours keep their relations, clipped to [0, 1]. Robust
    statistics: a defect covering a small part of the image barely moves them, so the
    rest of the image keeps the contrast of a good one. A flat image becomes mid grey."""
    values = image.flatten()
    if values.numel() > 1 << 20:  # torch.quantile's limit is 16M; a subsample suffices
        values = values[:: values.numel() // (1 << 20) + 1]
    q25, q50, q75 = torch.quantile(values, torch.tensor([0.25, 0.5, 0.75])).tolist()
    spread = (q75 - q25) / 1.349
    if spread < 1.0 / 1024:
        return torch.full_like(image, 0.5)
    return (0.5 + _SPREAD * (image - q50) / spread).clamp_(0.0, 1.0)



class StudentNet(nn.Module):
    """A student: a plain CNN of stride-2 stages whose heads predict the teacher's layers.

    Stage ``j`` (1, 2, ...) halves the resolution: a 3 x 3 convolution of stride 2 and one of
    stride 1, each followed by batch normalisation and a ReLU, with ``width * 2 ** min(j -
    1, 2)`` channels. After the stage whose stride is a teacher layer's, a 1 x 1 convolution
    (the head) outputs that layer's channels. ``forward`` returns one map per teacher layer,
    in the order of ``strides``, each at its layer's stride (zero padding, as the teacher's).

    Parameters
    ----------
    strides : sequence of int
        Stride of each teacher layer (powers of 2, at least 2).
    channels : sequence of int
        Channels of each teacher layer.
    width : int
        Channels of the first stage.
    """

    def __init__(self, strides, channels, width):
        super().__init__()
        self.strides = [int(s) for s in strides]
        stages, heads, c_in = [], [], 3
        for j in range(1, int(np.log2(max(self.strides))) + 1):
            w = int(width) * 2 ** min(j - 1, 2)
            stages.append(nn.Sequential(
                nn.Conv2d(c_in, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                nn.ReLU(inplace=True)))
            c_in = w
        for s, c in zip(self.strides, channels, strict=True):
            w = int(width) * 2 ** min(int(np.log2(s)) - 1, 2)
            heads.append(nn.Conv2d(w, int(c), 1))
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)

    def forward(self, x):
        at = {}
        for j, stage in enumerate(self.stages, start=1):
            x = stage(x)
            at[2**j] = x
        return [head(at[s]) for s, head in zip(self.strides, self.heads, strict=True)]


class StudentTeacherDetector(TrainedDetector):
    """Uninformed Students: students regress a pretrained teacher's descriptors on good images.

    Student-teacher anomaly detection (Bergmann et al., 2020). A *teacher* maps the patches
    of an image to descriptors, one per position of a grid; here the teacher is a frozen
    network pretrained on ImageNet (EfficientNet-Lite0), whose ``teacher_layers`` are the
    descriptors, one set per layer (one receptive field, i.e. patch size, per layer).
    ``n_students`` *students*, randomly initialised networks that differ only by their
    initialisation, learn to predict the teacher's descriptors, normalised by their
    training mean and std per dimension, on the good images only. The teacher knows patches
    of every kind, the students only those of the good images: on a defect their mean
    misses the teacher (regression error) and they disagree (predictive variance).

    Anomaly map, per grid position and teacher layer: ``e = ||mean_i S_i - (T - mu) /
    sigma||^2`` (the regression error of the students' mean) plus ``v = mean_i ||S_i||^2 -
    ||mean_i S_i||^2`` (their predictive variance), each standardised by its mean and std
    over the map positions of held-out good training images (a validation set, as in the
    paper); the maps of the layers are brought to the finest layer's grid and averaged.
    Maps are higher = more anomalous, in units of a validation position's spread (0 is a
    typical good position; they can be negative). The image anomaly score is the maximum
    of the map upsampled to the input and smoothed by a Gaussian of 4 input pixels.
    ``score_samples`` is its opposite (lower = more abnormal) and ``decision_function =
    score_samples - offset_`` is negative for predicted defects, as
    :class:`sklearn.ensemble.IsolationForest`.

    Parameters
    ----------
    teacher_layers : tuple of str, default=('blocks.2', 'blocks.3')
        Layers of the pretrained EfficientNet-Lite0 that are the teacher's descriptors, each
        one scale of the paper's multi-scale ensemble: 'blocks.1' (stride 4, 24 channels),
        'blocks.2' (stride 8, 40), 'blocks.3' (stride 16, 80) or 'blocks.4' (stride 16,
        112); distinct. The maps are on the grid of the finest one (stride 8 at the default:
        16 x 16 at 128 px).
    n_students : int, default=3
        Students (the paper's M = 3). With 1 there is no predictive variance and the map is
        the regression error alone.
    width : int, default=32
        Channels of the students' first stage (doubling at each stage, at most four times
        it): the cost of training and scoring grows with its square.
    normalize_images : bool, default=True
        Map each image's grey levels to median 0.5 and a spread of 0.15 (interquartile
        range / 1.349; all channels together) before resizing: exposure differences between
        good images (MTD's mean grey levels range over a factor of three) are then not
        anomalies, and a small defect barely changes the mapping. Not in the paper; False
        feeds the images as they are.
    image_size : int, default=128
        Side of the square network input (the paper's 256).
    resize_mode : {'stretch', 'letterbox', 'pad'}, default='stretch'
        'stretch' fills the square (the paper resizes MVTec's images to 256 x 256);
        'letterbox' keeps the aspect ratio and pads with mid grey, which the students learn
        as easily as anything.
    max_epochs : int, default=20
        Passes over the training images to train the students, a fixed budget (no early
        stopping); one optimisation step per batch of whole frames.
    batch_size : int, default=8
        Frames per optimisation step.
    learning_rate : float, default=1e-3
        Adam's learning rate (the paper: 1e-4, for 100 epochs); weight decay 1e-5 as in the
        paper.
    validation_fraction : float in (0, 0.5), default=0.1
        Share of the good training images held out (at least 2) to set ``offset_``.
    contamination : 'auto' or float in (0, 0.5], default='auto'
        Sets ``offset_`` from the held-out images' scores: a float puts the threshold at
        that quantile, 'auto' at Tukey's fence (Q3 + 1.5 IQR of their anomaly scores).
    device : str, default='auto'
        Where the networks run ('auto': CUDA when available).
    random_state : int, RandomState instance or None, default=None
        Seeds the hold-out splits, the initialisations and the batches: two fits with the
        same int give identical scores (on the same device).
    verbose : bool, default=False
        Progress bars (with the loss) for training and scoring.

    Attributes
    ----------
    teacher_mean_, teacher_std_ : ndarray of shape (n_descriptor_dims,), float64
        Mean and std of each teacher descriptor dimension (the channels of the
        ``teacher_layers``, concatenated) over the students' training images: the students
        regress ``(T - teacher_mean_) / teacher_std_``.
    error_stats_, variance_stats_ : ndarray of shape (n_teacher_layers, 2), float64
        Mean and std (columns) of the regression error and of the predictive variance over
        the pixels of the statistics images, per teacher layer, which standardise the maps
        (the variance's are (0, 1) with one student).
    train_loss_ : list of float
        Mean student loss of each epoch (squared error per normalised descriptor dimension,
        averaged over students and teacher layers).
    n_epochs_ : int
        Student epochs run (``max_epochs``).
    n_stats_images_ : int
        Training images held out of the students' training to set ``error_stats_`` and
        ``variance_stats_`` (10 %, at least one).
    offset_ : float
        ``decision_function = score_samples - offset_``.
    n_train_images_, n_validation_images_ : int
        Images given to the training (the students' and the statistics images), and
        held-out good images that set ``offset_``.
    weights_sha256_ : str
        SHA-256 of the pretrained teacher's weights file (checked when a model is loaded:
        the scores depend on it).

    See Also
    --------
    DistillationDetector : One cloner network regressing a pretrained network, scored by
        the gradient of its loss.
    PatchCoreDetector : Nearest neighbours among pretrained patch features, no training.

    Notes
    -----
    Why the teacher is the pretrained network itself. The paper distils a patch-wise
    teacher from ResNet-18 on ImageNet, i.e. on patches of every kind, then trains the
    students on the good images: outside the good images' patches the teacher keeps
    describing what it sees while the students can only guess. Without ImageNet, an earlier
    version of this class distilled its teachers from the same backbone on the good training
    images only. Teachers and students then had the same architecture and learnt from the
    same patches, so on a defect the students extrapolated as the teacher did, and the
    error followed the texture's energy instead: image AUROC 0.503, pixel AUROC 0.655 on
    the MTD subset of ``benchmarks/trained_subset.py`` (0.487 with random teachers; the
    rows of docs/benchmarks.md for that version). Its maps were hottest on the frames'
    edges and in high-contrast streaks, and MTD's defective tiles have lower contrast than
    the good ones, so ranking by texture energy ranks them below chance. The frozen
    pretrained network is the part of the paper's teacher that carries the knowledge of
    other patches, so here it is the teacher, unchanged.

    Differences from the paper, for want of ImageNet or for the CPU budget:

    * Teacher: EfficientNet-Lite0's ``blocks.2`` and ``blocks.3`` (strides 8 and 16, 40 and
      80 channels, 120 descriptor dimensions against the paper's 128), not a patch network
      distilled from ResNet-18; its receptive fields, not chosen patch sizes (the paper's
      17, 33 and 65), are the scales. The paper's descriptors are dense (one per pixel,
      by its multi-pooling trick); here they are at the layers' strides, and the maps are
      upsampled bilinearly.
    * Students: not copies of the teacher's architecture, but small plain CNNs (two 3 x 3
      convolutions with batch normalisation and ReLU per stride-2 stage, ``width`` 32 to
      128 channels, a 1 x 1 head per teacher layer: receptive fields 43 and 91 input
      pixels), one network per student predicting every teacher layer, trained on whole
      frames with the same batches in the same order (they differ by their
      initialisation), with learning rate 1e-3 (paper 1e-4) for 20 epochs (paper 100).
    * Input 128 x 128 (paper 256); ``normalize_images`` is not in the paper.
    * The statistics that standardise the error and the variance come from 10 % of the
      training images held out of the students' training, as the paper's validation set;
      the images held out by ``validation_fraction`` set ``offset_`` (for which the maps
      must already be standardised).
    * The image score: the paper evaluates maps only; here it is the maximum of the map
      smoothed by a Gaussian of std 4 input pixels.

    Accuracy on the fixed subsets of ``benchmarks/trained_subset.py`` (150 training, 100
    test images; ``python benchmarks/trained_subset.py ../shared/datasets/mtd --method
    students --threads 1 [--param NAME=VALUE]``, and the same for ``../shared/datasets/tire``),
    image AUROC / pixel AUROC, fit seconds on one thread:

    * defaults: MTD 0.813 / 0.797 (fit 99 s), tire 0.681 / 0.947 (104 s);
    * ``max_epochs=30``: MTD 0.839 / 0.801 (155 s), tire 0.657 / 0.935 (160 s);
    * ``teacher_layers=('blocks.3',)``: MTD 0.872 / 0.828 (99 s), tire 0.632 / 0.830
      (100 s);
    * ``teacher_layers=('blocks.3', 'blocks.4')``: MTD 0.826 / 0.816 (101 s);
    * ``normalize_images=False``: MTD 0.832 / 0.761 (105 s);
    * the earlier patch teachers (docs/benchmarks.md): MTD 0.503 / 0.655, tire 0.478 /
      0.723.

    The coarser layer alone suits MTD's larger defects and misses tire's small ones; the
    default keeps the paper's ensemble of two scales.

    On all of MTD (634 training, 710 test images), at the defaults on one thread of a 2-core
    CPU (``OMP_NUM_THREADS=1 python -m skpatchcore.evaluate ../shared/datasets/mtd --method
    students``): image AUROC 0.870, pixel AUROC 0.809, AUPRO@0.3 0.756; fit 439 s (about
    22 s per student epoch), 28 ms per test image, peak RSS 1.6 GB.

    References
    ----------
    P. Bergmann, M. Fauser, D. Sattlegger and C. Steger, "Uninformed Students:
    Student-Teacher Anomaly Detection with Discriminative Latent Embeddings", CVPR 2020
    (arXiv:1911.02357).

    Examples
    --------
    >>> from skpatchcore import StudentTeacherDetector
    >>> from skpatchcore.datasets import make_defect_images
    >>> X, y, masks = make_defect_images(8, 2, image_size=64, random_state=0)
    >>> det = StudentTeacherDetector(image_size=32, n_students=2, width=8, max_epochs=1,
    ...                              random_state=0).fit(X[:8])
    >>> det.score_samples(X[8:]).shape, det.predict(X[8:]).shape
    ((2,), (2,))
    >>> det.predict_map(X[8:]).shape
    (2, 64, 64)
    """

    _parameter_constraints: dict = {
        **TrainedDetector._common_constraints,
        "teacher_layers": [tuple, list],
        "n_students": [Interval(Integral, 1, None, closed="left")],
        "width": [Interval(Integral, 1, None, closed="left")],
        "normalize_images": ["boolean"],
    }

    def __init__(
        self,
        *,
        teacher_layers=("blocks.2", "blocks.3"),
        n_students=3,
        width=32,
        normalize_images=True,
        image_size=128,
        resize_mode="stretch",
        max_epochs=20,
        batch_size=8,
        learning_rate=1e-3,
        validation_fraction=0.1,
        contamination="auto",
        device="auto",
        random_state=None,
        verbose=False,
    ):
        self.teacher_layers = teacher_layers
        self.n_students = n_students
        self.width = width
        self.normalize_images = normalize_images
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

    # ------------------------------------------------------------------ parameters
    @property
    def _pretrained(self):
        return _BACKBONE, tuple(self._layers())

    def _layers(self):
        """``teacher_layers`` checked: a non-empty sequence of distinct layers of stride 4 to
        16 (at least two map positions a side at the smallest ``image_size``, 32)."""
        layers = self.teacher_layers
        known = {k: v for k, v in get_backbone_spec(_BACKBONE).layers.items()
                 if 4 <= v[0] <= 16}
        ok = (isinstance(layers, tuple | list) and len(layers) > 0
              and all(isinstance(k, str) and k in known for k in layers)
              and len(set(layers)) == len(layers))
        if not ok:
            raise ValueError(
                f"teacher_layers={layers!r}: give a non-empty tuple of distinct layers of "
                f"{_BACKBONE} among {sorted(known)} (e.g. ('blocks.2', 'blocks.3')).")
        return tuple(layers)

    def _strides(self):
        spec = get_backbone_spec(_BACKBONE)
        return [spec.layers[k][0] for k in self._layers()]

    def _check_before_training(self):
        self._layers()

    def _fitted_arrays(self):
        n, d = len(self._layers()), sum(self._pretrained_channels())
        return {"teacher_mean_": (np.float64, (d,)), "teacher_std_": (np.float64, (d,)),
                "error_stats_": (np.float64, (n, 2)), "variance_stats_": (np.float64, (n, 2))}

    def _build(self):
        return {f"student{i}": StudentNet(self._strides(), self._pretrained_channels(),
                                          self.width)
                for i in range(self.n_students)}

    # ------------------------------------------------------------------ images
    def _prepare(self, image):
        """Each image standardised first when ``normalize_images`` (before the letterbox,
        so the grey fill does not count)."""
        return standardize_image(image) if self.normalize_images else image

    # ------------------------------------------------------------------ helpers
    def _students(self):
        return [self._nets[f"student{i}"] for i in range(self.n_students)]

    def _input(self, frames, device):
        """uint8 frames -> the teacher's and students' normalised input."""
        mean, std = self._normalisation(device)
        return (self._float(frames, device) - mean) / std

    def _teacher(self, x):
        """The teacher's descriptors of a normalised batch, one (b, c, h, w) map per layer,
        each normalised by ``teacher_mean_`` and ``teacher_std_`` once they are fitted."""
        network, _ = self._pretrained_network()
        maps = [f.float() for f in network(x)]
        if "teacher_mean_" not in self.__dict__:
            return maps
        return self._standardise_descriptors(maps)

    def _standardise_descriptors(self, maps):
        """Teacher maps (one (b, c, h, w) per layer) in units of ``teacher_mean_`` and
        ``teacher_std_`` (the layers' channels concatenated)."""
        out, start = [], 0
        for m in maps:
            c = m.shape[1]
            mean = torch.as_tensor(self.teacher_mean_[start : start + c], dtype=torch.float32,
                                   device=m.device).view(1, -1, 1, 1)
            std = torch.as_tensor(self.teacher_std_[start : start + c], dtype=torch.float32,
                                  device=m.device).view(1, -1, 1, 1)
            out.append((m - mean) / std)
            start += c
        return out

    # ------------------------------------------------------------------ training
    def _train(self, frames, rng):
        device = self._device()
        n = len(frames)
        n_stats = max(1, int(round(_STATS_FRACTION * n)))
        order = rng.permutation(n)
        stats_idx, train_idx = np.sort(order[:n_stats]), np.sort(order[n_stats:])
        self.n_stats_images_ = int(n_stats)
        self.__dict__.pop("teacher_mean_", None)
        self.__dict__.pop("teacher_std_", None)
        # the teacher's descriptors of every training frame, once (frozen network)
        parts = []
        with torch.no_grad():
            for a in range(0, len(train_idx), _CHUNK):
                idx = torch.as_tensor(train_idx[a : a + _CHUNK])
                parts.append([m.cpu() for m in self._teacher(self._input(frames[idx], device))])
        targets = [torch.cat(layer) for layer in zip(*parts, strict=True)]
        del parts
        self.teacher_mean_ = np.concatenate(
            [t.double().mean(dim=(0, 2, 3)).numpy() for t in targets])
        self.teacher_std_ = np.maximum(np.concatenate(
            [t.double().std(dim=(0, 2, 3)).numpy() for t in targets]), 1e-6)
        targets = self._standardise_descriptors(targets)

        students = self._students()
        optimisers = [torch.optim.Adam(s.parameters(), lr=self.learning_rate,
                                       weight_decay=_WEIGHT_DECAY) for s in students]
        for s in students:
            s.train()
        losses = []
        bar = self._epochs("training students of")
        for _ in range(self.max_epochs):
            total, count = 0.0, 0
            for idx in self._batches(len(train_idx), rng):
                x = self._input(frames[torch.as_tensor(train_idx[idx.numpy()])], device)
                target = [t[idx].to(device) for t in targets]
                step = 0.0
                for student, optimiser in zip(students, optimisers, strict=True):
                    loss = sum(F.mse_loss(p, t) for p, t in
                               zip(student(x), target, strict=True)) / len(target)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    step += float(loss.detach())
                total += step / len(students)
                count += 1
            losses.append(total / count)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
        bar.close()
        for s in students:
            s.eval()
        self.error_stats_, self.variance_stats_ = self._map_stats(
            frames[torch.as_tensor(stats_idx)], device)
        return losses

    def _map_stats(self, frames, device):
        """Mean and std of the regression error and the predictive variance per teacher
        layer over the frames' map positions."""
        n_layers = len(self._layers())
        sums, count = np.zeros((n_layers, 4)), 0
        with torch.no_grad():
            for a in range(0, len(frames), _CHUNK):
                x = self._float(frames[a : a + _CHUNK], device)
                for k, (e, v) in enumerate(self._raw_maps(x)):
                    e, v = e.double(), v.double()
                    sums[k] += [float(e.sum()), float(e.pow(2).sum()),
                                float(v.sum()), float(v.pow(2).sum())]
                count += e.numel()
        m = sums / count
        stats = np.empty((n_layers, 2, 2))
        for j in range(2):
            mean = m[:, 2 * j]
            std = np.sqrt(np.maximum(m[:, 2 * j + 1] - mean**2, 0.0))
            stats[:, j, 0], stats[:, j, 1] = mean, std
        error, variance = stats[:, 0], stats[:, 1]
        error[:, 1] = np.maximum(error[:, 1], 1e-12)
        if self.n_students == 1:
            variance[:] = (0.0, 1.0)
        variance[:, 1] = np.maximum(variance[:, 1], 1e-12)
        return np.ascontiguousarray(error), np.ascontiguousarray(variance)

    # ------------------------------------------------------------------ scoring
    def _raw_maps(self, x):
        """For each teacher layer: the students' regression error and predictive variance,
        (b, h, w) each on the finest layer's grid, of a float batch in [0, 1]."""
        mean, std = self._normalisation(x.device)
        xn = (x - mean) / std
        teacher = self._teacher(xn)
        preds = [s(xn) for s in self._students()]
        grid = max((t.shape[-2:] for t in teacher), key=lambda hw: hw[0] * hw[1])
        out = []
        for k, target in enumerate(teacher):
            stack = torch.stack([p[k] for p in preds])
            centre = stack.mean(0)
            error = (centre - target).pow(2).sum(1, keepdim=True)
            variance = (stack - centre).pow(2).sum(2).mean(0)[:, None]
            if tuple(error.shape[-2:]) != tuple(grid):
                error, variance = (F.interpolate(m, size=tuple(grid), mode="bilinear",
                                                 align_corners=False)
                                   for m in (error, variance))
            out.append((error[:, 0], variance[:, 0]))
        return out

    def _anomaly(self, x):
        with torch.no_grad():
            total = 0.0
            for k, (e, v) in enumerate(self._raw_maps(x)):
                total = total + (e - float(self.error_stats_[k, 0])) / float(
                    self.error_stats_[k, 1])
                if self.n_students > 1:
                    total = total + ((v - float(self.variance_stats_[k, 0]))
                                     / float(self.variance_stats_[k, 1]))
            maps = (total / len(self.error_stats_)).float().cpu().numpy()
        # the maximum of the map as the maps are shown: upsampled to the input, smoothed
        scores = upsample_maps(maps, x.shape[-2:], _SCORE_SIGMA).max(axis=(1, 2))
        return scores.astype(np.float64), maps
