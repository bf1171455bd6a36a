"""export_onnx: one ONNX graph from camera frames to scores and maps, equal to the library."""

import hashlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from skpatchcore import export as export_module  # noqa: E402
from skpatchcore import (  # noqa: E402
    export_onnx,
    make_anomaly_pipeline,
    make_ensemble,
    make_patchcore,
    save_model,
)
from skpatchcore._images import check_images  # noqa: E402
from skpatchcore._onnx import OnnxModel, read_frame  # noqa: E402
from skpatchcore.datasets import make_defect_images  # noqa: E402

# The documented input convention, pinned here as text: a change to the graph's input must
# change this test (and docs/deployment.md), never pass silently.
PINNED_INPUT = (
    "image: uint8 (N, H, W, 3), RGB, channels last, 0..255, upright (EXIF orientation "
    "applied), (H, W) = the frame size the graph was exported for, any batch size N; "
    "grayscale as three equal channels")
PINNED_OUTPUTS = [("score", "tensor(float)", 1), ("decision", "tensor(float)", 1),
                  ("label", "tensor(int64)", 1), ("patch_map", "tensor(float)", 3),
                  ("anomaly_map", "tensor(float)", 3)]

SCORE_RTOL = 1e-4  # image scores: relative
MAP_TOL = 1e-3  # maps: of the library map's range


def _fit(X, **params):
    params = {"backbone": "efficientnet_lite0", "image_size": 64, "precision": "float32",
              "sampling_ratio": 0.2, "random_state": 0, **params}
    return make_patchcore(**params).fit(X)


def _assert_parity(pipe, model, inputs, frames):
    """The exported graph on ``frames`` equals the library on ``inputs`` (the same images)."""
    out = model.run(frames)
    scores, maps = pipe.score_and_map(inputs)
    labels = pipe.predict(inputs)
    grids = pipe[-1].predict_map(pipe[:-1].transform(inputs))
    maps = np.asarray(maps)
    np.testing.assert_allclose(out["score"], scores, rtol=SCORE_RTOL)
    np.testing.assert_allclose(out["decision"], scores - pipe[-1].offset_, rtol=0,
                               atol=SCORE_RTOL * np.abs(scores).max())
    np.testing.assert_array_equal(out["label"], labels)
    assert out["anomaly_map"].shape == maps.shape
    assert np.abs(out["anomaly_map"] - maps).max() <= MAP_TOL * np.ptp(maps)
    assert np.abs(out["patch_map"] - grids).max() <= MAP_TOL * np.ptp(grids)
    return out, scores


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A fitted lite0 model on 64 px synthetic images, its .npz and its ONNX export for
    non-square 72 x 96 frames. It reweights (b = 9) so the graph carries the neighbour lists;
    the variants below use the pipelines' default b = 1."""
    X, y, _ = make_defect_images(12, 4, image_size=96, random_state=0)
    X = np.ascontiguousarray(X[:, 12:84])  # 72 x 96 frames
    pipe = _fit(X[:10], n_reweight_neighbors=9)  # the paper's reweighting: neighbour lists
    folder = tmp_path_factory.mktemp("export")
    npz = save_model(pipe, folder / "model.npz")
    onnx_path = export_onnx(npz, folder / "model.onnx", frame_size=(72, 96))
    return pipe, X[10:], npz, onnx_path


def test_input_convention_and_metadata_are_pinned(small):
    import onnx

    pipe, _, npz, path = small
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["image"]
    tensor = proto.graph.input[0].type.tensor_type
    assert tensor.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    assert dims == ["batch", 72, 96, 3]
    outputs = [(o.name, len(o.type.tensor_type.shape.dim)) for o in proto.graph.output]
    assert outputs == [(name, rank) for name, _, rank in PINNED_OUTPUTS]
    assert all(o.type.tensor_type.shape.dim[0].dim_param == "batch" for o in proto.graph.output)
    assert min(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["skpatchcore.input"] == PINNED_INPUT
    assert meta["skpatchcore.format_version"] == "1"
    assert (meta["skpatchcore.frame_height"], meta["skpatchcore.frame_width"]) == ("72", "96")
    assert meta["skpatchcore.backbone"] == "efficientnet_lite0"
    assert float(meta["skpatchcore.threshold"]) == -pipe[-1].offset_
    assert float(meta["skpatchcore.offset"]) == pipe[-1].offset_
    assert meta["skpatchcore.model_sha256"] == hashlib.sha256(npz.read_bytes()).hexdigest()
    import skpatchcore

    assert meta["skpatchcore.version"] == skpatchcore.__version__
    model = OnnxModel(path)
    types = {o.name: o.type for o in model._session.get_outputs()}
    assert [(name, types[name]) for name, _, _ in PINNED_OUTPUTS] == [
        (name, kind) for name, kind, _ in PINNED_OUTPUTS]


def test_batch_of_one_and_of_many(small):
    pipe, X, _, path = small
    model = OnnxModel(path, threads=2)
    many, _ = _assert_parity(pipe, model, list(X), X)
    one = [model.run(X[i : i + 1]) for i in range(len(X))]
    for name in ("score", "patch_map", "anomaly_map"):
        np.testing.assert_allclose(np.concatenate([o[name] for o in one]), many[name],
                                   rtol=1e-5, atol=1e-6)
    assert (many["label"] == -1).any() and (many["label"] == 1).any()


def test_file_size_is_weights_plus_bank(small):
    import onnx

    pipe, _, _, path = small
    proto = onnx.load(str(path))
    stored = sum(len(t.raw_data) for t in proto.graph.initializer)
    formula = export_module.graph_size_bytes(pipe, (72, 96))
    assert abs(stored - formula) <= 0.01 * formula  # the tables are what the formula says
    assert formula <= path.stat().st_size <= formula + 256 * 1024  # plus the graph itself
    m, d = pipe[-1].memory_bank_.shape
    bank_copies = sum(int(np.prod(t.dims)) for t in proto.graph.initializer
                      if list(t.dims) in ([m, d], [d, m]))
    assert bank_copies == m * d  # the bank is stored once


@pytest.mark.parametrize("params, frame", [
    ({"image_size": 80, "crop_size": 64}, None),  # crop (border cells inside the crop)
    ({"n_neighbors": 3, "n_reweight_neighbors": 1}, None),  # mean of 3, no reweighting
    ({"image_size": 128}, None),  # a grid of 16: one ring of border cells
    ({}, (5, 6)),  # frames 5 x 6 times larger: shrunk by a box filter first
    ({"image_size": 96}, (1 / 3, 1 / 2)),  # frames smaller than the network input
])
def test_parity_variants(tmp_path, params, frame):
    X, y, _ = make_defect_images(12, 4, image_size=64, random_state=1)
    if frame is not None and frame[0] >= 1:
        X = np.stack([np.kron(im, np.ones(frame + (1,), dtype=np.uint8)) for im in X])
    elif frame is not None:
        X = np.ascontiguousarray(X[:, :: round(1 / frame[0]), :: round(1 / frame[1])])
    pipe = _fit(list(X[:10]), **params)
    if params.get("image_size") == 128:
        assert pipe[0].border_ == 1
    if frame == (5, 6):
        assert pipe[0]._geometry.reduction_factor(X.shape[1:3]) > 1  # shrunk first
    path = export_onnx(pipe, tmp_path / "m.onnx", frame_size=X.shape[1:3])
    _assert_parity(pipe, OnnxModel(path), list(X[10:]), X[10:])


def test_bank_searched_in_chunks(monkeypatch, tmp_path):
    """A bank larger than one chunk: the chunks' nearest rows combine to the whole search's
    (the first of equal distances kept), for k = 1 and k = 3."""
    monkeypatch.setattr(export_module, "_BANK_CHUNK", 40)
    X, _, _ = make_defect_images(12, 4, image_size=64, random_state=2)
    for k in (1, 3):
        pipe = _fit(list(X[:10]), n_neighbors=k)
        assert len(pipe[-1].memory_bank_) > 3 * 40
        path = export_onnx(pipe, tmp_path / f"m{k}.onnx", frame_size=(64, 64))
        _assert_parity(pipe, OnnxModel(path), list(X[10:]), X[10:])


def test_bfloat16_model_exports_float32_with_a_warning(tmp_path):
    X, _, _ = make_defect_images(12, 4, image_size=64, random_state=0)
    pipe = _fit(list(X[:10]))
    pipe[0].precision_ = "bfloat16"  # as fitted on a CPU with native bfloat16
    with pytest.warns(UserWarning, match="bfloat16.*float32"):
        path = export_onnx(pipe, tmp_path / "m.onnx", frame_size=(64, 64))
    assert pipe[0].precision_ == "bfloat16"  # the model itself is left as it was
    assert OnnxModel(path).metadata["model_precision"] == "bfloat16"
    pipe[0].precision_ = "float32"
    _assert_parity(pipe, OnnxModel(path), list(X[10:]), X[10:])


def _mtd_crops(root, folder, n_train=4):
    """Real MTD images: training files as they are; test files (good and defective) cut to
    one 160 x 112 frame size and written as PNG files."""
    train = sorted((root / "train" / "good").iterdir())[:n_train]
    test = []
    for kind in ("good", "blowhole", "crack", "fray", "uneven"):
        for p in sorted((root / "test" / kind).iterdir()):
            img = Image.open(p)
            if img.height >= 160 and img.width >= 112:
                top, left = (img.height - 160) // 2, (img.width - 112) // 2
                out = folder / f"{kind}_{p.stem}.png"
                img.crop((left, top, left + 112, top + 160)).save(out)
                test.append(out)
                break
    return train, test


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite2"])
@pytest.mark.parametrize("resize_mode", ["letterbox", "stretch"])
def test_parity_on_mtd_files(mtd_root, tmp_path, backbone, resize_mode):
    """End to end from the same files: the library reads the paths, the graph the frames
    read_frame decodes from them (what ``skpatchcore predict MODEL.onnx`` does)."""
    train, test = _mtd_crops(mtd_root, tmp_path)
    assert len(test) == 5
    pipe = _fit(train, backbone=backbone, image_size=128, resize_mode=resize_mode,
                sampling_ratio=0.1)
    scores = np.sort(pipe.score_samples(test))
    pipe[-1].offset_ = float(scores[1] + scores[2]) / 2  # a threshold that splits them
    path = export_onnx(pipe, tmp_path / "m.onnx", frame_size=(160, 112))
    images = check_images(test)
    frames = np.stack([read_frame(images, i) for i in range(len(test))])
    assert frames.dtype == np.uint8 and frames.shape == (5, 160, 112, 3)
    out, _ = _assert_parity(pipe, OnnxModel(path, threads=2), test, frames)
    assert set(out["label"]) == {-1, 1}
    if backbone == "efficientnet_lite0" and resize_mode == "letterbox":
        # one file at its own size (no crop), with its own export
        original = sorted((mtd_root / "test" / "crack").iterdir())[0]
        frame = read_frame(check_images([original]), 0)
        path = export_onnx(pipe, tmp_path / "own.onnx", frame_size=frame.shape[:2])
        _assert_parity(pipe, OnnxModel(path), [original], frame[None])


# ------------------------------------------------------------------------------ errors
def test_unsupported_models_are_refused_before_export(small, tmp_path):
    X, _, _ = make_defect_images(3, 0, image_size=64, random_state=0)
    # the method is checked first, before fitting matters
    with pytest.raises(ValueError, match="SPADEDetector.*SPADE and PaDiM"):
        export_onnx(make_anomaly_pipeline("spade"), tmp_path / "s.onnx", frame_size=64)
    with pytest.raises(ValueError, match="ends in a PaDiMDetector"):
        export_onnx(make_anomaly_pipeline("padim"), tmp_path / "p.onnx", frame_size=64)
    with pytest.raises(ValueError, match="not fitted|fitted"):
        export_onnx(make_patchcore(), tmp_path / "u.onnx", frame_size=64)
    pyramid = make_patchcore(backbone="efficientnet_lite0", image_size=64, scales=(1.0, 0.5),
                             precision="float32", sampling_ratio=0.5, random_state=0).fit(X)
    with pytest.raises(ValueError, match="scales=.*scales=\\(1.0,\\)"):
        export_onnx(pyramid, tmp_path / "py.onnx", frame_size=64)
    with pytest.raises(ValueError, match="needs a fitted pipeline"):
        export_onnx(small[0][-1], tmp_path / "d.onnx", frame_size=64)
    with pytest.raises(ValueError, match="AnomalyEnsemble cannot be exported yet"):
        export_onnx(make_ensemble(), tmp_path / "e.onnx", frame_size=64)
    assert list(tmp_path.iterdir()) == []  # nothing written, no partial files


def test_existing_file_is_never_clobbered_silently(small, tmp_path):
    pipe = small[0]
    target = tmp_path / "model.onnx"
    target.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="already exists.*overwrite"):
        export_onnx(pipe, target, frame_size=(72, 96))
    assert target.read_bytes() == b"mine"
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(pipe, tmp_path, frame_size=(72, 96))
    written = export_onnx(pipe, tmp_path / "model", frame_size=(72, 96), overwrite=True)
    assert written == target and OnnxModel(target).frame_size == (72, 96)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_onnx_model_errors_name_the_file(small, tmp_path):
    import onnx

    _, X, _, path = small
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="notes.onnx.*not a readable ONNX model"):
        OnnxModel(text)
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(ValueError, match="foreign.onnx.*not one exported by skpatchcore"):
        OnnxModel(foreign)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxModel(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match=r"uint8 RGB frames of shape \(N, 72, 96, 3\)"):
        OnnxModel(path).run(X[:, :64])
    with pytest.raises(ValueError, match="uint16 pixels.*8-bit"):
        read_frame(check_images([np.zeros((72, 96), np.uint16)]), 0)


def test_import_skpatchcore_imports_no_torch_onnx_or_onnxruntime():
    code = ("import sys, skpatchcore, skpatchcore._onnx, skpatchcore.cli; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_warnings_are_not_leaked(small, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_onnx(small[0], tmp_path / "m.onnx", frame_size=(72, 96))
