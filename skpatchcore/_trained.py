"""What the trained detectors share: images in, networks trained on the good ones, scores
and maps out.

PatchCore, SPADE and PaDiM are steps after a :class:`FeatureExtractor`; the trained methods
(:class:`~skpatchcore.StudentTeacherDetector`, :class:`~skpatchcore.DistillationDetector`,
:class:`~skpatchcore.FocusDistributionDetector`) need the images themselves (they train on
them, and some differentiate with respect to them), so each is one estimator from images to
scores and maps. :class:`TrainedDetector` is everything they have in common, written once:

* images -> network frames with the same :class:`~skpatchcore._geometry.Geometry` as the
  feature extractor (resize / letterbox), and maps back onto each image's own pixels;
* the training set split into the images the networks learn from and held-out good images
  whose scores set ``offset_`` (a network scores the images it was trained on too well);
* seeded, deterministic training (``random_state``), a progress bar with the loss, the loss
  per epoch in ``train_loss_``;
* the frozen pretrained networks (offline weights, checked by SHA-256 when a model is loaded)
  and the trained weights as numpy arrays for the safe model files (:meth:`network_state`);
* ``score_samples`` / ``decision_function`` / ``predict`` with IsolationForest's signs,
  ``calibrate``, ``score_and_map``, ``iter_score_and_grids``, ``predict_map`` and
  ``predict_mask`` with the same meaning as :class:`~skpatchcore.PatchCorePipeline`'s.

A subclass implements :meth:`_build` (its trainable networks, from its parameters and fitted
scalars only), :meth:`_train` and :meth:`_anomaly` (scores and maps of a batch of frames).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import PixelThresholdMixin, ThresholdMixin, contamination_offset, warn_if_few_held_out
from ._geometry import Geometry, check_sigma, upsample_maps
from ._images import check_images
from ._utils import as_one_array, progress, resolve_device
from ._validation import normal_mask
from .backbones import file_sha256, get_backbone_spec, load_backbone

__all__ = ["TrainedDetector"]

#: Frames scored per network call when scoring (memory, not results, depends on it).
SCORE_BATCH = 8
#: The frozen pretrained networks of this process: (name, layers, device) -> (network,
#: (mean, std), weights file, its SHA-256). Frozen, so every estimator can share them.
_FROZEN = {}
_FROZEN_LOCK = threading.Lock()


def _on_cpu(net):
    return all(t.device.type == "cpu" for t in net.state_dict().values())


@contextlib.contextmanager
def seeded(seed):
    """torch's global generators forked and seeded for the block (module initialisation and
    dropout use them), restored afterwards: training is reproducible and leaves the caller's
    random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class TrainedDetector(PixelThresholdMixin, ThresholdMixin, OutlierMixin, BaseEstimator):
    """Base of the detectors that train networks on good images (not for direct use).

    Common parameters (every subclass takes them, with its own defaults): ``image_size``,
    ``resize_mode``, ``max_epochs``, ``batch_size``, ``learning_rate``,
    ``validation_fraction``, ``contamination``, ``device``, ``random_state``, ``verbose``.

    Fitted attributes common to all (fewer than 10 held-out images give a warning that the
    thresholds are rough): ``offset_`` (from the held-out images' scores, by
    ``contamination``), ``pixel_threshold_`` (the same rule on the peaks of their maps:
    :meth:`predict_mask`'s and the CLI's mask threshold), ``n_train_images_`` (images
    trained on), ``n_validation_images_`` (held-out good images that set ``offset_``),
    ``train_loss_``
    (mean training loss of each epoch), ``weights_sha256_`` (of the frozen pretrained
    network's weights file, or None).
    """

    _common_constraints: dict = {
        "image_size": [Interval(Integral, 32, None, closed="left")],
        "resize_mode": [StrOptions({"letterbox", "stretch", "pad"})],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "validation_fraction": [Interval(Real, 0, 0.5, closed="neither")],
        "contamination": [StrOptions({"auto"}), Interval(Real, 0, 0.5, closed="right")],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["boolean"],
    }
    #: The frozen pretrained network the method builds on: (backbone name, layers), or None
    #: (a class attribute, or a property computed from the parameters).
    _pretrained = None
    #: Fewest good images fit accepts (at least one to train on and two held out).
    _min_images = 4

    # ------------------------------------------------------------------ subclass hooks
    def _build(self):
        """The trainable networks, a dict name -> ``torch.nn.Module``, built from the
        parameters and fitted scalars only (so :meth:`load_network_state` can rebuild them)."""
        raise NotImplementedError

    def _train(self, frames, rng):
        """Train ``self._nets`` on ``frames`` (uint8 tensor (n, 3, H, W), the network
        input); return the mean loss of each epoch (a list of floats)."""
        raise NotImplementedError

    def _anomaly(self, x):
        """Anomaly scores (b,) float64 and maps (b, h, w) float32 of a float batch
        (b, 3, H, W) in [0, 1] on the device; both higher = more anomalous. The maps' (h, w)
        is the method's own (a grid or the input size); they are upsampled to the input
        size, smoothed and placed on each image's pixels by :meth:`maps_to_images`."""
        raise NotImplementedError

    def _anomaly_scores(self, x):
        """Anomaly scores (b,) alone, for ``score_samples``: those of :meth:`_anomaly` unless a
        subclass can skip work that only the maps need (a backward pass)."""
        return self._anomaly(x)[0]

    def _fitted_arrays(self):
        """Fitted array attributes beyond the networks, for the model-file checks: a dict
        name -> (dtype, shape) with None for any length."""
        return {}

    # ------------------------------------------------------------------ geometry
    @property
    def _geometry(self):
        return Geometry(self.image_size, self.resize_mode)

    def _frames(self, images, desc="decoding"):
        """Images (an ImageList) -> uint8 tensor (n, 3, H, W) of network frames."""
        geometry = self._geometry
        images = images.for_geometry(geometry)
        h, w = geometry.input_size
        out = torch.empty((len(images), 3, h, w), dtype=torch.uint8)
        bar = progress(total=len(images), desc=desc, unit="img",
                       disable=desc is None or not self.verbose or len(images) < 2)
        for i in range(len(images)):
            frame = geometry.to_input(self._prepare(images.decode(i, geometry)))
            out[i] = (frame.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
            bar.update(1)
        bar.close()
        return out

    def _prepare(self, image):
        """An image (3, h, w) in [0, 1] before its resize into the frame: unchanged here; a
        subclass may normalise it (before the letterbox, so the fill does not count)."""
        return image

    def _device(self):
        return resolve_device(self.device)

    @staticmethod
    def _float(frames, device):
        """uint8 frames -> float32 in [0, 1] on ``device``."""
        return frames.to(device).float().div_(255.0)

    # ------------------------------------------------------------------ pretrained network
    def _pretrained_network(self):
        """The frozen pretrained network of ``_pretrained`` (a
        :class:`~skpatchcore.backbones.TruncatedBackbone` returning the listed layers), on
        the device, and its input mean and std: built once per process for every estimator
        that uses the same network (clones in a grid search too), never pickled."""
        name, layers = self._pretrained
        device = self._device()
        key = (name, tuple(layers), str(device))
        with _FROZEN_LOCK:
            if key not in _FROZEN:
                network, _, _, path = load_backbone(name, layers, "imagenet")
                for p in network.parameters():
                    p.requires_grad_(False)
                _FROZEN[key] = (network.to(device).eval(), self._normalisation(device), path,
                                file_sha256(path))
            network, norm, path, sha = _FROZEN[key]
        known = self.__dict__.get("weights_sha256_")
        if known is not None and sha != known:
            raise ValueError(
                f"The weights file {str(path)!r} for backbone {name!r} has SHA-256 {sha}, but "
                f"this model was fitted with {known}. The scores would differ: install the "
                "original weights or refit the model.")
        self.__dict__["_weights_sha256"] = sha
        return network, norm

    def _normalisation(self, device):
        """(mean, std), (1, 3, 1, 1) tensors on ``device``, of the pretrained network's input
        (without loading the network)."""
        spec = get_backbone_spec(self._pretrained[0])
        return (torch.tensor(spec.mean, device=device).view(1, 3, 1, 1),
                torch.tensor(spec.std, device=device).view(1, 3, 1, 1))

    def _pretrained_channels(self):
        """Channels of each layer of the frozen network, in order."""
        name, layers = self._pretrained
        spec = get_backbone_spec(name)
        return [spec.layers[layer][1] for layer in layers]

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Train on good images; hold some out to set ``offset_``.

        Parameters
        ----------
        X : images
            Paths, a folder, PIL images, numpy arrays or a torch tensor of good images (see
            :func:`skpatchcore.datasets.check_images`).
        y : None or array-like of shape (n_images,) of +1 / -1, default=None
            Images labelled -1 are left out (as with the other detectors); any other label
            is an error.

        Returns
        -------
        self : object
        """
        images = check_images(X)
        keep = normal_mask(y, len(images))
        n = len(images) if keep is None else int(keep.sum())
        if n < self._min_images:
            raise ValueError(
                f"{type(self).__name__} needs at least {self._min_images} good training "
                f"images (some are held out to set offset_), got {n}.")
        rng = check_random_state(self.random_state)
        n_val = max(2, int(round(self.validation_fraction * n)))
        order = rng.permutation(n)
        held, kept = np.sort(order[:n_val]), np.sort(order[n_val:])
        self._check_before_training()
        frames = self._frames(images)
        if keep is not None:
            frames = frames[torch.as_tensor(np.flatnonzero(keep))]
        seed = int(rng.randint(np.iinfo(np.int32).max))
        device = self._device()
        self.weights_sha256_ = None
        if self._pretrained is not None:
            self._pretrained_network()
            self.weights_sha256_ = self.__dict__["_weights_sha256"]
        training = frames[torch.as_tensor(kept)]
        with seeded(seed):
            self._set_params_before_build(training)
            self._nets = {k: v.to(device) for k, v in self._build().items()}
            losses = self._train(training, rng)
        del training
        for net in self._nets.values():
            net.eval()
        self.train_loss_ = [float(v) for v in losses]
        self.n_epochs_ = len(self.train_loss_)
        self.n_train_images_ = int(len(kept))
        self.n_validation_images_ = int(len(held))
        warn_if_few_held_out(len(held), "the thresholds (offset_, pixel_threshold_)")
        held_scores, held_maps = self._score_frames(frames[torch.as_tensor(held)])
        name = type(self).__name__
        self.offset_ = contamination_offset(-held_scores, self.contamination, name)
        # the maps need not be in the scores' units (a gradient, a regression error): the
        # pixel threshold is the same rule on the held-out maps' peaks, at sigma = 4
        peaks = upsample_maps(held_maps, self._geometry.input_size, 4.0).max(axis=(1, 2))
        self.pixel_threshold_ = -contamination_offset(-peaks, self.contamination, name)
        return self

    def _check_before_training(self):
        """Raise on parameters that fail only in combination, before any image is read."""

    def _set_params_before_build(self, frames):
        """Fitted scalars computed from the training frames that :meth:`_build` needs."""

    def _epochs(self, desc="training", total=None):
        """A progress bar over ``total`` epochs (default ``max_epochs``) whose postfix shows
        the loss: ``bar.update(1)`` and ``bar.set_postfix(loss=...)`` after each epoch."""
        return progress(total=self.max_epochs if total is None else total,
                        desc=f"{desc} {type(self).__name__}", unit="epoch",
                        disable=not self.verbose)

    def _fit_epochs(self, desc, n, rng, optimizer, loss_of):
        """The training loop: ``max_epochs`` passes over shuffled batches (:meth:`_batches`)
        of ``n`` training items, one ``optimizer`` step on ``loss_of(indices)`` (a scalar
        tensor, the batch's mean loss) per batch; returns the mean loss of each epoch,
        shown on the progress bar as it goes."""
        device = self._device()
        losses = []
        bar = self._epochs(desc)
        for _ in range(self.max_epochs):
            total = 0.0
            for idx in self._batches(n, rng):
                loss = loss_of(idx.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / n)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
        bar.close()
        return losses

    def _batches(self, n, rng):
        """Shuffled index batches of ``batch_size`` over ``n`` frames (the last one may be
        smaller; a last batch of one is joined to the one before, for batch statistics)."""
        order = rng.permutation(n)
        cuts = list(range(0, n, self.batch_size))
        if len(cuts) > 1 and n - cuts[-1] == 1:
            cuts.pop()
        return [torch.as_tensor(order[a:b]) for a, b in
                zip(cuts, cuts[1:] + [n], strict=True)]

    # ------------------------------------------------------------------ scoring
    def _score_frames(self, frames, with_maps=True):
        """Anomaly scores (n,) float64 and maps (n, h, w) float32 (None without maps) of
        uint8 frames, ``SCORE_BATCH`` at a time."""
        device = self._device()
        for net in self._nets.values():
            net.to(device).eval()
        scores, maps = [], []
        for a in range(0, len(frames), SCORE_BATCH):
            x = self._float(frames[a : a + SCORE_BATCH], device)
            if with_maps:
                s, m = self._anomaly(x)
                maps.append(np.asarray(m, dtype=np.float32))
            else:
                s = self._anomaly_scores(x)
            scores.append(np.asarray(s, dtype=np.float64))
        return np.concatenate(scores), (np.concatenate(maps) if with_maps else None)

    def _check_images(self, X):
        check_is_fitted(self)
        return check_images(X)

    def score_samples(self, X):
        """Opposite of the anomaly score: lower = more abnormal (IsolationForest's sign).

        Parameters
        ----------
        X : images

        Returns
        -------
        scores : ndarray of shape (n_images,), float64
        """
        images = self._check_images(X)
        out = np.empty(len(images), dtype=np.float64)
        for start, scores, _ in self._iter(images, with_maps=False):
            out[start : start + len(scores)] = scores
        return out

    def _iter(self, images, chunk_size=None, with_maps=True):
        chunk_size = chunk_size or 4 * SCORE_BATCH
        images = images.for_geometry(self._geometry)
        bar = progress(total=len(images), desc="scoring", unit="img",
                       disable=not self.verbose or len(images) < 2)
        for start in range(0, len(images), chunk_size):
            part = images.take(start, start + chunk_size)
            scores, maps = self._score_frames(self._frames(part, desc=None), with_maps)
            bar.update(len(part))
            yield start, -scores, maps
        bar.close()

    def iter_score_and_grids(self, X, chunk_size=None):
        """Scores and maps a chunk of images at a time (memory does not grow with the number
        of images), as :meth:`PatchCorePipeline.iter_score_and_grids`.

        Parameters
        ----------
        X : images
        chunk_size : int or None, default=None
            Images per chunk; None: ``4 * SCORE_BATCH`` (32), whose network batches are those
            of :meth:`score_samples`, so the scores are equal. Other sizes can differ in the
            last float32 bit (a network batch of another size rounds differently).

        Yields
        ------
        start : int
        scores : ndarray (b,), float64
            ``score_samples`` of the chunk (lower = more abnormal).
        grids : ndarray (b, h, w), float32
            The maps at the method's resolution (higher = more anomalous):
            :meth:`maps_to_images` puts them on the images' pixels.
        """
        yield from self._iter(self._check_images(X), chunk_size)

    def maps_to_images(self, grids, image_sizes, sigma=4.0):
        """Maps from :meth:`iter_score_and_grids` -> one map per image at its own size:
        upsampled to the network input, smoothed (``sigma`` input pixels), the letterbox
        cut away, resized to the image."""
        return self._geometry.grids_to_images(np.asarray(grids, dtype=np.float32),
                                              image_sizes, sigma)

    def score_and_map(self, X, sigma=4.0):
        """Image scores and pixel anomaly maps in one pass.

        Parameters
        ----------
        X : images
        sigma : float, default=4.0
            Gaussian smoothing of the maps in network-input pixels (0 disables).

        Returns
        -------
        scores : ndarray (n,), float64
            ``score_samples(X)``: lower = more abnormal.
        maps : ndarray (n, H, W), or a list of (H_i, W_i) when sizes differ, float32
            Higher = more anomalous, on each image's own pixels.
        """
        check_sigma(sigma)
        images = self._check_images(X)
        sizes = images.sizes()
        scores = np.empty(len(images), dtype=np.float64)
        maps = []
        for start, s, grids in self._iter(images):
            scores[start : start + len(s)] = s
            maps += self.maps_to_images(grids, sizes[start : start + len(s)], sigma)
        return scores, as_one_array(maps)

    def predict_map(self, X, sigma=4.0):
        """Pixel anomaly maps on each image's own pixels (higher = more anomalous); see
        :meth:`score_and_map`."""
        return self.score_and_map(X, sigma)[1]

    # ------------------------------------------------------------------ persistence
    def network_state(self):
        """The trained weights as a dict of numpy arrays ('<network>.<tensor>'), for
        :func:`~skpatchcore.save_model`; the frozen pretrained network is not stored (it is
        rebuilt from its weights file, checked by ``weights_sha256_``)."""
        check_is_fitted(self)
        return {f"{name}.{k}": v.detach().cpu().numpy().copy()
                for name, net in self._nets.items() for k, v in net.state_dict().items()}

    def load_network_state(self, state):
        """Rebuild the trained networks from :meth:`network_state`'s arrays."""
        check_is_fitted(self)
        nets = self._build()
        expected = {f"{name}.{k}" for name, net in nets.items() for k in net.state_dict()}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"the weights do not fit {type(self).__name__} with these "
                             f"parameters (missing {missing[:3]}, unexpected {extra[:3]})")
        for name, net in nets.items():
            prefix = f"{name}."
            net.load_state_dict({k[len(prefix):]: torch.from_numpy(np.array(v))
                                 for k, v in state.items() if k.startswith(prefix)})
            net.eval()
        self._nets = nets
        return self

    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: pickling must not strip this object
        if "_nets" in state:  # on the CPU, without moving this object's networks
            state["_nets"] = {k: v if _on_cpu(v) else copy.deepcopy(v).to("cpu")
                              for k, v in state["_nets"].items()}
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        return tags
