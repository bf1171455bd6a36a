"""Export a fitted PatchCore model to one ONNX graph, for runtimes without Python or torch.

:func:`export_onnx` wraps the fitted pipeline's own pieces in one ``torch.nn.Module``
(:class:`_PatchCoreGraph`) and traces it: the decoded camera frame goes in, and the image
score, the decision, the label, the patch-score grid and the smoothed anomaly map at the
frame's resolution come out. What the library computes with code that cannot be traced
(the antialiased resize, the map's upsampling, smoothing and inverse letterbox, the bank's
neighbour lists of the reweighting) is put into the graph as constant tables computed by
the library's own code at export time, for the one frame size the graph is made for.

:mod:`skpatchcore._onnx` scores an exported file with onnxruntime, without torch.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._geometry import as_hw, check_sigma, frame_geometry
from ._onnx import GRAPH_FORMAT_VERSION, INPUT_CONVENTION, INPUT_NAME, META_PREFIX, OUTPUT_NAMES
from ._utils import check_writable
from ._version import __version__
from .backbones import file_sha256
from .detector import PatchCoreDetector
from .features import FeatureExtractor
from .methods import is_trained

__all__ = ["export_onnx"]

#: ONNX operator set of the exported graphs.
OPSET = 18
# Bank rows compared with the queries at once: the graph's largest temporary is
# (cells per image x this) float32 per image (1600 x 4096 x 4 B = 26 MB at 320 px).
_BANK_CHUNK = 4096


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("export_onnx needs the 'onnx' package: pip install "
                          "'skpatchcore[onnx]'.") from None
    return onnx


def _parts(model):
    """(FeatureExtractor, PatchCoreDetector) of a fitted pipeline; ValueError otherwise."""
    if is_trained(model):
        raise ValueError(
            f"export_onnx supports PatchCoreDetector pipelines; {type(model).__name__} (a "
            "trained method) cannot be exported yet: score it with the library ('skpatchcore "
            "predict MODEL.npz').")
    if hasattr(model, "members"):  # an AnomalyEnsemble
        raise ValueError(
            "export_onnx exports one PatchCore pipeline; an AnomalyEnsemble cannot be exported "
            "yet: score it with the library ('skpatchcore predict MODEL.npz'), or export one "
            "of its members (ensemble.members_[i], in its own units).")
    if not isinstance(model, Pipeline):
        raise ValueError(
            f"export_onnx needs a fitted pipeline (FeatureExtractor -> ... -> "
            f"PatchCoreDetector, as make_patchcore or 'skpatchcore fit' make), got a "
            f"{type(model).__name__}: the graph starts from images.")
    detector = model.steps[-1][1]
    extractors = [s for _, s in model.steps[:-1] if isinstance(s, FeatureExtractor)]
    if not isinstance(detector, PatchCoreDetector):
        raise ValueError(
            f"export_onnx supports PatchCoreDetector pipelines; this one ends in a "
            f"{type(detector).__name__}. SPADE and PaDiM models cannot be exported yet: score "
            "them with the library ('skpatchcore predict MODEL.npz').")
    if not extractors:
        raise ValueError("export_onnx needs a FeatureExtractor step (the graph starts from "
                         "images).")
    extractor = extractors[0]
    for step in (extractor, detector):
        check_is_fitted(step)
    if tuple(extractor.scales_) != (1.0,):
        raise ValueError(
            f"export_onnx does not support image pyramids yet (this model has scales="
            f"{tuple(extractor.scales_)}); fit the model with scales=(1.0,) to export it.")
    if detector.memory_bank_.shape[1] != extractor.feature_dim_:
        raise ValueError("The pipeline's detector was not fitted on this extractor's "
                         "features.")
    return extractor, detector


def _destination(path, overwrite):
    """The .onnx file to write ('.onnx' appended when missing), checked before any work:
    not a folder, not an existing file unless ``overwrite``, in a writable folder."""
    raw = os.fspath(path)
    if not str(raw).strip():
        raise ValueError("export_onnx: path is empty; give the file to write, e.g. "
                         "'model.onnx'.")
    given = Path(raw)
    dest = given if given.suffix == ".onnx" else given.with_name(given.name + ".onnx")
    if given.is_dir() or dest.is_dir():
        raise ValueError(f"export_onnx: {raw!r} is a folder; give a file name inside it, "
                         f"e.g. {str(given / 'model.onnx')!r}.")
    if dest.exists() and not overwrite:
        raise FileExistsError(
            f"export_onnx: {str(dest)!r} already exists; choose another name, or pass "
            "overwrite=True (--overwrite) to replace it.")
    check_writable(dest.parent, "export_onnx")
    return dest


def _map_matrices(extractor, grid_hw, frame_hw, sigma):
    """``(ay, ax)``, float32 (H, h) and (W, w), such that ``ay @ grid @ ax.T`` is
    ``extractor.maps_to_images([grid], [frame_hw], sigma)[0]`` up to float32 rounding.

    The map of a grid (upsample, smooth, undo the crop and letterbox, resize) is linear and
    separable, ``A_y G A_x^T``; the two factors are read off the library's own maps of
    probe grids (each row of ones, each column of ones, all ones), one map at a time."""
    h, w = grid_hw

    def image_map(grid):
        return extractor.maps_to_images(grid[None].astype(np.float32), [frame_hw], sigma)[0]

    ones = image_map(np.ones((h, w)))
    y0, x0 = np.unravel_index(np.argmax(np.abs(ones)), ones.shape)
    if ones[y0, x0] == 0:
        raise ValueError("The model's maps are empty at this frame size (its crop covers no "
                         "part of the image).")
    ay = np.empty((ones.shape[0], h), dtype=np.float64)
    ax = np.empty((ones.shape[1], w), dtype=np.float64)
    for i in range(h):
        probe = np.zeros((h, w))
        probe[i] = 1.0
        ay[:, i] = image_map(probe)[:, x0]
    for j in range(w):
        probe = np.zeros((h, w))
        probe[:, j] = 1.0
        ax[:, j] = image_map(probe)[y0, :]
    ax /= float(ones[y0, x0])
    return ay.astype(np.float32), ax.astype(np.float32)


class _PatchCoreGraph(nn.Module):
    """The fitted pipeline as one module from uint8 frames to scores and maps.

    Built from the library's own pieces: the extractor's network and ``_embed``
    (normalisation, patch aggregation), its geometry's ``place`` (letterbox, crop) and
    resize weights, its border tables, the detector's bank and ``offset_``, the neighbour
    lists of the reweighting from the detector's own index, and the map matrices from
    ``maps_to_images``.
    """

    def __init__(self, extractor, detector, frame_hw, sigma):
        super().__init__()
        self.extractor = extractor
        self.network = extractor._network  # registered, so its weights become initializers
        geometry = extractor._geometry
        H, W = frame_hw
        f = geometry.reduction_factor(frame_hw)
        self.shrink = int(f)
        src = (-(-H // f), -(-W // f))
        self.src_hw = src
        if f > 1:  # _images' box filter: block sums, rounded half up, in the pixels' type
            rows = np.minimum(f, H - np.arange(0, H, f))
            cols = np.minimum(f, W - np.arange(0, W, f))
            counts = (rows[:, None] * cols[None, :]).astype(np.float32)
            self.register_buffer("counts", torch.from_numpy(counts))
        _, _, nh, nw = frame_geometry(src, geometry.frame, geometry.resize_mode)
        self.resize = src != (nh, nw)
        if self.resize:
            wy, wx = geometry.resize_weights(src)
            self.register_buffer("wy", torch.from_numpy(wy))
            self.register_buffer("wxt", torch.from_numpy(np.ascontiguousarray(wx.T)))
        grid_hw = tuple(extractor.grid_shape_)
        self.border = extractor.border_ > 0
        if self.border:
            rows, cols = extractor._border_cells(src, grid_hw)
            self.register_buffer("border_rows", torch.as_tensor(rows, dtype=torch.int64))
            self.register_buffer("border_cols", torch.as_tensor(cols, dtype=torch.int64))
        bank = np.asarray(detector.memory_bank_, dtype=np.float64)
        centre = bank.mean(axis=0)  # distances are computed about the bank's mean
        centred = (bank - centre).astype(np.float32)
        self.register_buffer("centre", torch.from_numpy(centre.astype(np.float32)))
        # the bank in chunks, each stored once (no transposed or sliced copies in the file)
        self.chunks = []
        for i, start in enumerate(range(0, len(centred), _BANK_CHUNK)):
            part = np.ascontiguousarray(centred[start : start + _BANK_CHUNK])
            self.register_buffer(f"bank_{i}", torch.from_numpy(part))
            self.register_buffer(f"bank_sq_{i}", torch.from_numpy(
                (part.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)[:, None]))
            self.chunks.append((start, len(part)))
        self.k = int(detector._k(np.empty((1, 1, 1, 1))))
        m = len(bank)
        self.k = min(self.k, m)
        b = min(int(detector.n_reweight_neighbors), m)
        self.reweight = b > 1
        if self.reweight:  # N_b(m) of every bank row, by the detector's own search
            index = detector._index("bank", detector.memory_bank_)
            _, neighbours = index.query(detector.memory_bank_, k=b)
            self.register_buffer("neighbours", torch.from_numpy(
                np.ascontiguousarray(neighbours, dtype=np.int64)))
        self.offset = float(detector.offset_)
        ay, ax = _map_matrices(extractor, grid_hw, frame_hw, sigma)
        self.register_buffer("ay", torch.from_numpy(ay))
        self.register_buffer("axt", torch.from_numpy(np.ascontiguousarray(ax.T)))

    def _network_input(self, image):
        x = image.permute(0, 3, 1, 2).to(torch.float32)
        if self.shrink > 1:
            f = self.shrink
            h, w = self.counts.shape
            x = nn.functional.pad(x, (0, w * f - x.shape[3], 0, h * f - x.shape[2]))
            x = x.reshape(-1, 3, h, f, w, f).sum(dim=(3, 5))
            x = torch.floor((x + torch.floor(self.counts / 2)) / self.counts)
        x = x / 255.0
        if self.resize:
            x = torch.matmul(torch.matmul(self.wy, x), self.wxt)
        return self.extractor._geometry.place(x, self.src_hw)

    def _nearest(self, queries):
        """Squared distances (n, k, cells) of the k nearest bank rows, ascending, and the
        index (n, cells) of the nearest; the bank a chunk at a time, the first of equals
        kept. ``|b|^2 - 2 b.q + |q|^2`` on centred features, clamped at 0."""
        q_sq = (queries * queries).sum(dim=-1)[:, None, :]  # (n, 1, cells)
        q_t = queries.transpose(1, 2)  # (n, d, cells)
        best = best_idx = None
        for i, (start, size) in enumerate(self.chunks):
            d2 = getattr(self, f"bank_sq_{i}") - 2.0 * torch.matmul(
                getattr(self, f"bank_{i}"), q_t) + q_sq  # (n, size, cells)
            if self.k == 1:
                value, idx = torch.min(d2, dim=1, keepdim=True)
            else:
                value, idx = torch.topk(d2, min(self.k, size), dim=1, largest=False)
            idx = idx + start
            if best is None:
                best, best_idx = value, idx
            elif self.k == 1:
                closer = value < best
                best = torch.where(closer, value, best)
                best_idx = torch.where(closer, idx, best_idx)
            else:
                best, pick = torch.topk(torch.cat([best, value], dim=1), self.k, dim=1,
                                        largest=False)
                best_idx = torch.gather(torch.cat([best_idx, idx], dim=1), 1, pick)
        return torch.clamp(best, min=0.0), best_idx[:, 0]

    def _bank_rows(self, rows):
        """Bank rows (centred) at the flat indices ``rows``, gathered chunk by chunk."""
        out = None
        for i, (start, size) in enumerate(self.chunks):
            local = torch.clamp(rows - start, 0, size - 1)
            part = getattr(self, f"bank_{i}").index_select(0, local)
            if out is None:
                out = part
            else:
                inside = ((rows >= start) & (rows < start + size))[:, None]
                out = torch.where(inside, part, out)
        return out

    def forward(self, image):
        grids = self.extractor._embed(self._network_input(image))
        if self.border:
            grids = grids.index_select(1, self.border_rows).index_select(2, self.border_cols)
        h, w, d = grids.shape[1:]
        patches = grids.reshape(-1, h * w, d) - self.centre
        d2, nearest = self._nearest(patches)
        dist = torch.sqrt(d2).mean(dim=1)  # (n, cells): the patch scores
        worst = torch.argmax(dist, dim=1, keepdim=True)  # the first cell of the maximum
        s_star = torch.gather(dist, 1, worst)[:, 0]
        if self.reweight:
            t_star = torch.gather(patches, 1, worst[:, :, None].expand(-1, 1, d))  # (n, 1, d)
            m_star = torch.gather(nearest, 1, worst)[:, 0]
            rows = self.neighbours.index_select(0, m_star)  # (n, b)
            near = self._bank_rows(rows.reshape(-1)).reshape(-1, rows.shape[1], d)
            dn = torch.sqrt(((near - t_star) ** 2).sum(dim=-1))  # (n, b)
            top = torch.maximum(dn.max(dim=1).values, s_star)
            denom = torch.exp(dn - top[:, None]).sum(dim=1)
            anomaly = s_star * (1.0 - torch.exp(s_star - top) / denom)
        else:
            anomaly = s_star
        score = -anomaly
        decision = score - self.offset
        label = torch.where(decision >= 0, torch.ones_like(worst[:, 0]),
                            -torch.ones_like(worst[:, 0]))
        patch_map = dist.reshape(-1, h, w)
        anomaly_map = torch.matmul(torch.matmul(self.ay, patch_map), self.axt)
        return score, decision, label, patch_map, anomaly_map


def _float32_extractor(extractor):
    """The extractor to trace: a shallow copy whose network runs eagerly (the tracer
    records its operators), in float32, on the CPU."""
    ex = type(extractor).__new__(type(extractor))
    ex.__dict__.update(extractor.__dict__)  # shares the network (copy.copy would drop it)
    ex.precision_ = "float32"
    ex.device = "cpu"
    ex.jit = False
    network = ex.__dict__.get("_network")
    if network is not None and any(p.device.type != "cpu" for p in network.parameters()):
        ex._network = copy.deepcopy(network).to("cpu")
    ex._ensure_network()
    if any(p.dtype != torch.float32 for p in ex._network.parameters()):
        ex._network = copy.deepcopy(ex._network).float()
    return ex


def export_onnx(model, path, *, frame_size, sigma=4.0, overwrite=False):
    """Write a fitted PatchCore pipeline as one ONNX graph, from camera frames to scores
    and maps.

    The graph holds the whole model: the resize into the network frame (letterbox or
    stretch, crop), the frozen network to the needed layers, patch aggregation, border
    handling, the exact nearest-neighbour search against the memory bank (matrix products
    of centred features, never a cells x bank x d buffer), the image score with PatchCore's
    reweighting, the decision against the fitted (or calibrated) ``offset_``, and the
    smoothed anomaly map at the frame's resolution. Scored with onnxruntime it gives the
    library's answers for the same images (docs/deployment.md, "Parity").

    Parameters
    ----------
    model : PatchCorePipeline or str or path-like
        A fitted pipeline of :class:`FeatureExtractor` -> (:class:`CoresetSampler`) ->
        :class:`PatchCoreDetector` (what :func:`make_patchcore` and ``skpatchcore fit``
        make), or the ``.npz`` file of one (:func:`save_model`). SPADE and PaDiM models and
        image pyramids (``scales`` other than ``(1.0,)``) are not supported (ValueError).
    path : str or path-like
        The ``.onnx`` file to write ('.onnx' is appended when missing). It is written to a
        temporary file beside it and renamed when complete.
    frame_size : int or (int, int)
        (height, width) of the camera frames the graph takes. The graph's input is fixed to
        this size (see Notes); images of other sizes need another export.
    sigma : float, default=4.0
        Gaussian smoothing of the anomaly map, in network-input pixels (as
        :meth:`PatchCorePipeline.predict_map` and ``skpatchcore predict``).
    overwrite : bool, default=False
        Replace an existing file at ``path``; otherwise FileExistsError.

    Returns
    -------
    path : pathlib.Path
        The file written.

    Notes
    -----
    Input ``image``: uint8, shape ``(N, H, W, 3)``, RGB, channels last, ``(H, W) ==
    frame_size``, upright (EXIF orientation applied), any batch size N. Grayscale frames are
    given as three equal channels. This is what ``PIL.Image.open(f).convert("RGB")`` (after
    ``ImageOps.exif_transpose``) or OpenCV's ``imread`` followed by a BGR-to-RGB conversion
    give for 8-bit files.

    Outputs, one value per image unless stated:

    * ``score`` float32 (N,): :meth:`PatchCoreDetector.score_samples`, lower = more abnormal.
    * ``decision`` float32 (N,): ``score - offset_``; negative for outliers.
    * ``label`` int64 (N,): +1 normal, -1 anomalous (``decision >= 0``; NaN gives -1).
    * ``patch_map`` float32 (N, h, w): the patch scores (higher = more anomalous), the
      grid of :meth:`PatchCoreDetector.predict_map`.
    * ``anomaly_map`` float32 (N, H, W): the map at the frame's own pixels, as
      :meth:`PatchCorePipeline.predict_map` with this ``sigma``.

    The graph's metadata (``skpatchcore.*`` keys) states the input convention, the frame
    size, the backbone, the threshold (``-offset_`` on the anomaly score), the skpatchcore
    version and the SHA-256 of the model file.

    A model whose network runs in bfloat16 (``precision_ == 'bfloat16'``) is exported with
    its float32 weights, computing in float32; a UserWarning says so. Its scores then equal
    those of the same model with ``precision_ = 'float32'``, which differ from the bfloat16
    ones by the network's rounding (about 2-4% of the features).

    The file holds the network's float32 weights and the memory bank (``m`` rows of ``d``
    features), plus small tables: the map matrices (``H * h + W * w`` floats), the int64
    neighbour lists of the reweighting (``m * b``, ``b = n_reweight_neighbors``) and the
    resize and border tables; :func:`graph_size_bytes` gives the exact formula
    (docs/deployment.md).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from skpatchcore import make_patchcore
    >>> from skpatchcore.datasets import make_defect_images
    >>> from skpatchcore.export import export_onnx
    >>> X, _, _ = make_defect_images(8, 0, image_size=64, random_state=0)
    >>> pipe = make_patchcore(backbone="efficientnet_lite0", image_size=64,
    ...                       precision="float32", random_state=0).fit(X)
    >>> path = export_onnx(pipe, pathlib.Path(tempfile.mkdtemp()) / "m.onnx",
    ...                    frame_size=(64, 64))
    >>> path.suffix
    '.onnx'
    """
    onnx = _onnx()
    frame_hw = as_hw(frame_size, "frame_size")
    check_sigma(sigma)
    dest = _destination(path, overwrite)
    model_sha = ""
    source = None
    if isinstance(model, str | os.PathLike):
        from .persistence import load_model

        source = Path(model)
        model = load_model(source, require_detector=True)
        model_sha = file_sha256(source if source.is_file() else
                                 source.with_name(source.name + ".npz"))
    extractor, detector = _parts(model)
    if extractor.precision_ == "bfloat16":
        warnings.warn(
            "This model's network runs in bfloat16; the ONNX graph computes in float32 "
            "(the model's float32 weights), so its scores equal those of the model with "
            "precision_='float32' and differ from bfloat16 scores by the network's rounding.",
            UserWarning, stacklevel=2)
    ex = _float32_extractor(extractor)
    graph = _PatchCoreGraph(ex, detector, frame_hw, sigma).eval()
    example = torch.zeros((2,) + frame_hw + (3,), dtype=torch.uint8)
    batch = {0: "batch"}
    tmp = dest.with_name(dest.name + ".partial")
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-side constants
            torch.onnx.export(
                graph, (example,), str(tmp), dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={name: batch for name in (INPUT_NAME,) + OUTPUT_NAMES},
                do_constant_folding=True)
        proto = onnx.load(str(tmp))
        H, W = frame_hw
        meta = {
            "format_version": GRAPH_FORMAT_VERSION,
            "version": __version__,
            "input": INPUT_CONVENTION,
            "frame_height": str(H),
            "frame_width": str(W),
            "backbone": ex.backbone,
            "layers": ",".join(ex.layers_),
            "image_size": str(ex.image_size),
            "resize_mode": ex.resize_mode,
            "crop_size": "" if ex.crop_size is None else "{},{}".format(*as_hw(
                ex.crop_size, "crop_size")),
            "patch_size": str(ex.patch_size),
            "border": str(ex.border_),
            "grid_shape": "{},{}".format(*ex.grid_shape_),
            "precision": "float32",
            "model_precision": str(extractor.precision_),
            "sigma": repr(float(sigma)),
            "detector": type(detector).__name__,
            "n_neighbors": str(graph.k),
            "n_reweight_neighbors": str(int(detector.n_reweight_neighbors)),
            "bank_rows": str(detector.memory_bank_.shape[0]),
            "feature_dim": str(detector.memory_bank_.shape[1]),
            "offset": repr(float(detector.offset_)),
            "threshold": repr(-float(detector.offset_)),
            "contamination": str(getattr(detector, "contamination", "")),
            "calibration_fpr": str(getattr(detector, "calibration_fpr_", None) or ""),
            "calibration_n_samples": str(getattr(detector, "calibration_n_samples_", None)
                                         or ""),
            "model_file": "" if source is None else source.name,
            "model_sha256": model_sha,
            "bank_sha256": hashlib.sha256(np.ascontiguousarray(
                detector.memory_bank_, dtype=np.float32).tobytes()).hexdigest(),
            "weights_sha256": ex.weights_sha256_ or "",
        }
        del proto.metadata_props[:]
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = META_PREFIX + key, value
        proto.producer_name = "skpatchcore"
        proto.producer_version = __version__
        proto.doc_string = "skpatchcore PatchCore model. Input: " + INPUT_CONVENTION
        onnx.save(proto, str(tmp))
        tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def graph_size_bytes(model, frame_size):
    """The bytes of constant tables :func:`export_onnx` stores for ``model``.

    ``4 * (n_weights + m * (d + 1) + d + H * h + W * w + resize + shrink) + 8 * (m * b + h +
    w)``: the network's float32 weights, the bank (m rows of d features) with its squared
    norms and mean, the map matrices, the resize matrices (``nh * H' + nw * W'`` when the
    frame is resized) and block counts (``H' * W'`` when it is first shrunk to (H', W')),
    and the int64 neighbour lists (``b = n_reweight_neighbors``, when above 1) and border
    tables. The file adds the graph itself, about 100 kB (docs/deployment.md, "Size").

    Parameters
    ----------
    model : PatchCorePipeline
    frame_size : int or (int, int)

    Returns
    -------
    n_bytes : int
    """
    extractor, detector = _parts(model)
    H, W = as_hw(frame_size, "frame_size")
    ex = _float32_extractor(extractor)
    weights = sum(t.numel() for t in ex._network.state_dict().values()
                  if t.dtype.is_floating_point)
    m, d = detector.memory_bank_.shape
    b = min(int(detector.n_reweight_neighbors), m)
    h, w = ex.grid_shape_
    geometry = ex._geometry
    f = geometry.reduction_factor((H, W))
    src = (math.ceil(H / f), math.ceil(W / f))
    _, _, nh, nw = frame_geometry(src, geometry.frame, geometry.resize_mode)
    tables = src[0] * src[1] if f > 1 else 0
    if src != (nh, nw):
        tables += nh * src[0] + nw * src[1]
    floats = weights + m * (d + 1) + d + (H * h + W * w) + tables
    return int(4 * floats + (8 * m * b if b > 1 else 0) + 8 * (h + w))
