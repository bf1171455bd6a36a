"""Scoring a model exported by :func:`skpatchcore.export.export_onnx` with onnxruntime.

This module imports neither torch nor onnx (onnxruntime only when a model is loaded), so
``skpatchcore predict MODEL.onnx`` runs where torch is not installed. It also holds the
graph's interface (input name, outputs, the metadata keys), which the exporter writes and
this reader checks, in one place.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

__all__ = ["GRAPH_FORMAT_VERSION", "INPUT_CONVENTION", "INPUT_NAME", "META_PREFIX", "OUTPUT_NAMES",
           "OnnxModel", "is_onnx_file", "read_frame"]

#: Name of the graph's one input.
INPUT_NAME = "image"
#: Its outputs, in order.
OUTPUT_NAMES = ("score", "decision", "label", "patch_map", "anomaly_map")
#: Prefix of the graph's metadata keys.
META_PREFIX = "skpatchcore."
#: Version of the graph's interface (input, outputs, metadata); raised when any changes.
GRAPH_FORMAT_VERSION = "1"
#: The input convention, as the graph's metadata states it.
INPUT_CONVENTION = (
    "image: uint8 (N, H, W, 3), RGB, channels last, 0..255, upright (EXIF orientation "
    "applied), (H, W) = the frame size the graph was exported for, any batch size N; "
    "grayscale as three equal channels")

_ONNX_MAGIC = b"\x08"  # a ModelProto starts with field 1 (ir_version), a varint


def is_onnx_file(path):
    """Whether ``path`` names an ONNX model file (by its '.onnx' extension)."""
    return Path(os.fspath(path)).suffix.lower() == ".onnx"


def read_frame(images, i):
    """Image ``i`` of an :class:`~skpatchcore._images.ImageList` as the graph's input:
    uint8 RGB (H, W, 3), upright, at full resolution, decoded as the library decodes it
    (grayscale repeated to three channels, alpha dropped).

    Raises ValueError for images that are not 8-bit (16-bit or float pixels): the graph
    takes 8-bit frames, and the library would read such images with more precision.
    """
    with images.pixels(i) as px:
        height = px.shape[0]
        rows = px.rows(0, height)
        if rows.dtype != np.uint8:
            raise ValueError(
                f"{images.name(i)} has {rows.dtype} pixels; an exported (ONNX) model takes "
                "8-bit images. Convert the image to 8 bits, or score it with the .npz model.")
        return np.ascontiguousarray(px.rgb8(0, height))


def _runtime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("Scoring an .onnx model needs onnxruntime: pip install "
                          "'skpatchcore[onnx]'.") from None
    return onnxruntime


class OnnxModel:
    """A model exported by ``export_onnx``, scored with onnxruntime (no torch).

    Parameters
    ----------
    path : str or path-like
        The ``.onnx`` file.
    threads : int or None, default=None
        Threads onnxruntime may use within an operator (None: its default, all cores).

    Attributes
    ----------
    frame_size : (int, int)
        (H, W) of the frames the graph takes.
    offset_ : float
        The exported ``offset_``: ``decision = score - offset_``.
    metadata : dict of str -> str
        The graph's ``skpatchcore.*`` metadata, without the prefix.
    """

    def __init__(self, path, threads=None):
        path = Path(os.fspath(path))
        if not path.exists():
            raise FileNotFoundError(f"Model file {str(path)!r} does not exist.")
        if path.is_dir():
            raise ValueError(f"Model file {str(path)!r} is a folder; give the .onnx file "
                             "written by 'skpatchcore export'.")
        with open(path, "rb") as fh:
            head = fh.read(1)
        ort = _runtime()
        options = ort.SessionOptions()
        # idle threads sleep instead of spinning: an idle model costs no CPU
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            if head != _ONNX_MAGIC:
                raise ValueError("not a protobuf model")
            session = ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(
                f"{str(path)!r} is not a readable ONNX model ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else exc}); give the file written "
                "by 'skpatchcore export MODEL.npz -o MODEL.onnx'.") from None
        props = session.get_modelmeta().custom_metadata_map
        meta = {k[len(META_PREFIX):]: v for k, v in props.items() if k.startswith(META_PREFIX)}
        names = [o.name for o in session.get_outputs()]
        inputs = session.get_inputs()
        if ("format_version" not in meta or tuple(names) != OUTPUT_NAMES
                or [i.name for i in inputs] != [INPUT_NAME]):
            raise ValueError(
                f"{str(path)!r} is an ONNX model but not one exported by skpatchcore (its "
                "inputs, outputs or metadata differ); export the model with 'skpatchcore "
                "export MODEL.npz -o MODEL.onnx'.")
        if meta["format_version"] != GRAPH_FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} was exported in graph format {meta['format_version']} by "
                f"skpatchcore {meta.get('version', '?')}; this version reads format "
                f"{GRAPH_FORMAT_VERSION}: export the model again with this version.")
        self.path = path
        self.metadata = meta
        self.frame_size = (int(meta["frame_height"]), int(meta["frame_width"]))
        self.offset_ = float(meta["offset"])
        self._session = session

    def description(self):
        """A stand-in for the fitted pipeline in ``skpatchcore predict``'s report: ``[0]``
        has the extractor's parameters and ``[-1]`` the detector's threshold, with the
        detector's class name, as the metadata records them (display only)."""
        meta = self.metadata
        extractor = SimpleNamespace(backbone=meta["backbone"], image_size=meta["image_size"],
                                    resize_mode=meta["resize_mode"],
                                    patch_size=int(meta["patch_size"]), scales=(1.0,))
        contamination = meta.get("contamination", "auto")
        fpr = meta.get("calibration_fpr", "")
        n_cal = meta.get("calibration_n_samples", "")
        detector = type(meta["detector"], (SimpleNamespace,), {})(
            offset_=self.offset_,
            contamination=contamination if contamination == "auto" else float(contamination),
            calibration_fpr_=float(fpr) if fpr else None,
            calibration_n_samples_=int(n_cal) if n_cal else None)
        return [extractor, detector]

    def run(self, images):
        """Score a batch of frames.

        Parameters
        ----------
        images : ndarray of shape (N, H, W, 3), uint8
            RGB frames at :attr:`frame_size` (the graph's input convention).

        Returns
        -------
        outputs : dict of str -> ndarray
            'score' (N,) (lower = more abnormal), 'decision' (N,), 'label' (N,) (+1 / -1),
            'patch_map' (N, h, w) and 'anomaly_map' (N, H, W) (higher = more anomalous).
        """
        images = np.asarray(images)
        H, W = self.frame_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (H, W, 3):
            raise ValueError(
                f"The ONNX model takes uint8 RGB frames of shape (N, {H}, {W}, 3), got "
                f"{images.dtype} {images.shape}; export the model again with frame_size set "
                "to your images' (height, width) for other sizes.")
        values = self._session.run(list(OUTPUT_NAMES),
                                   {INPUT_NAME: np.ascontiguousarray(images)})
        return dict(zip(OUTPUT_NAMES, values, strict=True))
