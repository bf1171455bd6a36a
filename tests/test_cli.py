import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skpatchcore import load_model
from skpatchcore.cli import main
from skpatchcore.datasets import make_defect_images


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    X, y, _ = make_defect_images(20, 4, image_size=64, random_state=2)
    (root / "good").mkdir()
    (root / "new").mkdir()
    for i in range(16):
        Image.fromarray(X[i]).save(root / "good" / f"g{i:02d}.png")
    for i in range(16, 24):
        Image.fromarray(X[i]).save(root / "new" / f"n{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def model(folders):
    path = folders / "model.npz"
    code = main(["fit", str(folders / "good"), "-o", str(path), "--image-size", "64",
                 "--coreset-ratio", "0.1", "--quiet"])
    assert code == 0 and path.is_file()
    return path


def test_fit_and_predict_write_scores_overlays_masks(folders, model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", str(model), str(folders / "new"), "--out", str(out)]) == 0
    assert "scored 8 images" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["path"].split("/")[-1] for r in rows] == [f"n{i:02d}.png" for i in range(16, 24)]
    labels = [int(r["label"]) for r in rows]
    assert labels[4:] == [-1, -1, -1, -1]  # the four defective parts
    # the CSV holds 6 decimals, so the offset is constant to their rounding
    assert all(float(r["score"]) - float(r["decision"]) == pytest.approx(
        float(rows[0]["score"]) - float(rows[0]["decision"]), abs=2e-6) for r in rows)
    assert len(list((out / "overlays").glob("*.png"))) == 8
    masks = sorted((out / "masks").glob("*.png"))
    assert len(masks) == 8 and Image.open(masks[0]).size == (64, 64)
    # scores.csv agrees with the model loaded in Python
    pipe = load_model(model)
    expected = pipe.score_samples(sorted((folders / "new").glob("*.png")))
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected, atol=1e-6)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["fit", "/no/such/dir", "-o", "m.npz"], "/no/such/dir: no such file or directory"),
        (["predict", "/no/model.npz", ".", "--out", "x"], "does not exist"),
    ],
)
def test_bad_paths_exit_2_with_one_line(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err


def test_empty_folder_and_unreadable_image(tmp_path, model, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["fit", str(tmp_path / "empty"), "-o", str(tmp_path / "m.npz")]) == 2
    assert "contains no image file" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    assert main(["predict", str(model), str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "not a readable image" in err
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    assert main(["predict", str(junk), str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not a complete skpatchcore model" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["spade", "padim"])
def test_fit_predict_other_methods(folders, tmp_path, method):
    path = tmp_path / f"{method}.npz"
    assert main(["fit", str(folders / "good"), "-o", str(path), "--image-size", "64",
                 "--method", method, "--quiet"]) == 0
    out = tmp_path / "out"
    assert main(["predict", str(path), str(folders / "new"), "--out", str(out),
                 "--no-images", "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    scores = np.array([float(r["score"]) for r in rows])
    assert scores[4:].max() < scores[:4].min()  # defective parts score lower


@pytest.mark.parametrize(("method", "options"), [
    ("mkd", ["--image-size", "64", "--max-epochs", "2"]),
    ("fyd", ["--image-size", "64", "--max-epochs", "1"]),
    ("students", ["--image-size", "64", "--max-epochs", "1"]),
])
def test_fit_predict_trained_methods(folders, tmp_path, method, options, capsys):
    path = tmp_path / f"{method}.npz"
    assert main(["fit", str(folders / "good"), "-o", str(path), "--method", method,
                 "--quiet", *options]) == 0
    model = load_model(path)
    assert type(model).__name__ == {"mkd": "DistillationDetector",
                                    "fyd": "FocusDistributionDetector",
                                    "students": "StudentTeacherDetector"}[method]
    assert model.image_size == 64 and model.n_epochs_ == int(options[-1])
    out = tmp_path / "out"
    assert main(["predict", str(path), str(folders / "new"), "--out", str(out),
                 "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    new = sorted((folders / "new").glob("*.png"))
    np.testing.assert_allclose([float(r["score"]) for r in rows], model.score_samples(new),
                               rtol=1e-5)
    # the masks are the model's own maps above its pixel threshold
    mask = np.asarray(Image.open(sorted((out / "masks").glob("*.png"))[-1])) > 0
    np.testing.assert_array_equal(mask, model.predict_mask([new[-1]])[0])
    assert main(["predict", str(path), str(folders / "new"), "--out", str(tmp_path / "o2"),
                 "--scheduler", "tcp://127.0.0.1:1", "--quiet"]) == 2
    assert "drop --scheduler" in capsys.readouterr().err


def test_fit_with_an_image_pyramid(folders, tmp_path):
    path = tmp_path / "pyramid.npz"
    assert main(["fit", str(folders / "good"), "-o", str(path), "--image-size", "64",
                 "--scales", "1", "0.5", "--coreset-ratio", "0.1", "--quiet"]) == 0
    features = load_model(path)[0]
    assert tuple(features.scales_) == (1.0, 0.5)
    assert features.feature_dim_ == 2 * 168  # two levels of Lite2 blocks.2 + blocks.4
    assert main(["fit", str(folders / "good"), "-o", str(path), "--scales", "0.5",
                 "--quiet"]) == 2


def test_fit_and_evaluate_accept_both_spellings_of_the_coreset_ratio():
    from skpatchcore.cli import _parser
    from skpatchcore.evaluate import _parse

    for flag in ("--coreset-ratio", "--sampling-ratio"):
        args = _parser().parse_args(["fit", "good", "-o", "m.npz", flag, "0.05"])
        assert args.sampling_ratio == 0.05
        assert _parse(["root", flag, "0.05"]).sampling_ratio == 0.05


@pytest.fixture
def no_feature_work(monkeypatch):
    """Fails the test if any image is embedded: bad options must be refused before that."""
    from skpatchcore.features import FeatureExtractor

    def refuse(*args, **kwargs):
        raise AssertionError("features were extracted before the options were checked")

    monkeypatch.setattr(FeatureExtractor, "_iter_batches", refuse)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--calibrate", "/no/such/held-out"], "/no/such/held-out"),
        (["--calibrate", "{good}", "--fpr", "0"], "--fpr 0.0"),
        (["--calibrate", "{good}", "--fpr", "1"], "--fpr 1.0"),
        (["-o", ""], "-o/--output is empty"),
        (["-o", "{file}/model.npz"], "cannot write in"),
        (["-o", "{dir}"], "is a folder"),
        (["--patch-size", "99"], "patch_size=99 averages over the whole"),
        (["--border", "40"], "border=40 replaces every cell"),
        (["--method", "mkd", "--patch-size", "3"], "--patch-size does not apply to --method mkd"),
        (["--method", "students", "--backbone", "resnet18", "--coreset-ratio", "0.1"],
         "--backbone, --sampling-ratio do not apply to --method students"),
        (["--max-epochs", "3"], "--max-epochs does not apply to --method patchcore"),
        (["--method", "padim", "--coreset-ratio", "0.1"],
         "--sampling-ratio does not apply to --method padim"),
        (["--method", "fyd", "--scheduler", "tcp://127.0.0.1:1"], "fits --method patchcore"),
    ],
)
def test_fit_refuses_bad_options_before_any_work(folders, tmp_path, capsys, no_feature_work,
                                                 extra, fragment):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    fill = {"good": str(folders / "good"), "file": str(tmp_path / "a_file"),
            "dir": str(tmp_path / "a_dir")}
    extra = [e.format(**fill) for e in extra]
    argv = ["fit", str(folders / "good"), "-o", str(tmp_path / "m.npz"), "--image-size", "64",
            "--quiet"] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("*.npz"))


@pytest.mark.parametrize(("argv", "fragment"), [
    (["fit", "good", "-o", "m.npz", "--contamination", "0.9"], "--contamination must be"),
    (["fit", "good", "-o", "m.npz", "--contamination", "high"], "--contamination must be"),
    (["predict", "m.npz", "x", "--out", "o", "--threshold", "nan"], "finite number"),
    (["predict", "m.npz", "x", "--out", "o", "--threshold=-inf"], "finite number"),
])
def test_bad_option_values_are_usage_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_a_failed_save_keeps_the_fit(folders, tmp_path, monkeypatch, capsys):
    import skpatchcore.persistence as persistence

    real = persistence.save_model
    target = tmp_path / "m.npz"

    def full_disk(model, path):
        if str(path) == str(target):
            raise OSError(28, "No space left on device")
        return real(model, path)

    monkeypatch.setattr(persistence, "save_model", full_disk)
    assert main(["fit", str(folders / "good"), "-o", str(target), "--image-size", "64",
                 "--coreset-ratio", "0.1", "--quiet"]) == 2
    err = capsys.readouterr().err
    fallback = err.split("saved to '")[1].split("'")[0]
    assert str(target) in err and load_model(fallback)[-1].offset_ < 0
    Path(fallback).unlink()


def test_predict_never_mixes_runs(folders, model, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", str(model), str(folders / "new"), "--out", str(out), "--quiet"]
    assert main(args) == 0
    (out / "notes.txt").write_text("mine")
    first = sorted(p.name for p in (out / "overlays").iterdir())
    # a second run into the same folder is refused before any work...
    assert main(args[:2] + [str(folders / "good")] + args[3:]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "overlays").iterdir()) == first
    # ...and with --overwrite it replaces the earlier results whole, keeping the user's file
    assert main(args[:2] + [str(folders / "good")] + args[3:] + ["--overwrite"]) == 0
    overlays = list((out / "overlays").iterdir())
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(overlays) == len(rows) == 16 and all("/good/" in r["path"] for r in rows)
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]  # no staging
    (tmp_path / "afile").write_text("x")
    assert main(args[:3] + ["--out", str(tmp_path / "afile")]) == 2
    assert "a file of that name exists" in capsys.readouterr().err


def test_a_concurrent_run_into_the_same_folder_loses_nothing(folders, model, tmp_path,
                                                            monkeypatch, capsys):
    """Two predicts into one empty --out at once: the one that finishes second finds the
    folder filled, writes nothing into it and says where its own results are."""
    from skpatchcore import cli

    out = tmp_path / "out"
    real = cli._predict_into

    def other_run_finishes_first(model_, paths, staging, args):
        n_bad = real(model_, paths, staging, args)
        out.mkdir(exist_ok=True)
        (out / "scores.csv").write_text("path,score,decision,label\nother,1,1,1\n")
        return n_bad

    monkeypatch.setattr(cli, "_predict_into", other_run_finishes_first)
    args = ["predict", str(model), str(folders / "new"), "--out", str(out), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "was filled by something else during this run; the results are in" in err
    assert (out / "scores.csv").read_text().endswith("other,1,1,1\n")  # theirs, untouched
    staging = Path(err.split("the results are in ")[1].strip().rstrip(".").strip("'"))
    rows = list(csv.DictReader(open(staging / "scores.csv")))
    assert len(rows) == 8 and len(list((staging / "overlays").iterdir())) == 8  # ours, kept


def test_evaluate_refuses_missing_masks_before_fitting(tmp_path, capsys, no_feature_work):
    from skpatchcore._demo import write_demo_dataset

    root = write_demo_dataset(tmp_path / "data")
    masks = sorted((root / "ground_truth" / "defect").iterdir())
    masks[0].unlink()
    assert main(["evaluate", str(root), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "No ground-truth mask" in err and "--skip-missing-masks" in err
    for m in masks[1:]:
        m.unlink()
    assert main(["evaluate", str(root), "--quiet", "--skip-missing-masks"]) == 2
    err = capsys.readouterr().err
    assert "Defect type 'defect' has no ground-truth mask" in err


def test_max_image_pixels_option(folders, model, tmp_path, capsys):
    args = ["predict", str(model), str(folders / "new"), "--out", str(tmp_path / "o"),
            "--quiet"]
    assert main(args + ["--max-image-pixels", "100"]) == 2
    err = capsys.readouterr().err
    assert "4096" in err and "--max-image-pixels" in err or "SKPATCHCORE_MAX_IMAGE_PIXELS" in err
    assert main(args + ["--max-image-pixels", "none"]) == 0
    with pytest.raises(SystemExit):
        main(args + ["--max-image-pixels", "-5"])


# ------------------------------------------------------------ predict in bounded memory
def _rows(path):
    return list(csv.DictReader(open(path)))


def test_predict_streams_chunks_with_the_scores_of_score_samples(folders, model, tmp_path,
                                                                  monkeypatch):
    import skpatchcore.pipeline as pipeline

    pipe = load_model(model)
    paths = sorted((folders / "good").glob("*.png")) + sorted((folders / "new").glob("*.png"))
    expected = pipe.score_samples(paths)
    for chunk_size in (None, 5, 1):
        parts = list(pipe.iter_score_and_grids(paths, chunk_size=chunk_size))
        scores = np.concatenate([s for _, s, _ in parts])
        np.testing.assert_array_equal(scores, expected)  # exactly, whatever the chunks
        grids = np.concatenate([g for _, _, g in parts])
        assert grids.shape == (24, 8, 8) and grids.dtype == np.float32
    assert [start for start, _, _ in parts] == list(range(24))
    _, ref_grids = pipe[-1].score_and_map(pipe[0].transform(paths))
    np.testing.assert_array_equal(grids, ref_grids)
    # the command, forced to stream 8 images at a time (3 chunks)
    monkeypatch.setattr(pipeline, "SCORE_CHUNK_ROWS", 64)
    calls = []
    real = pipeline.PatchCorePipeline.score_and_map
    monkeypatch.setattr(pipeline.PatchCorePipeline, "score_and_map",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "out"
    assert main(["predict", str(model), str(folders / "good"), str(folders / "new"), "--out",
                 str(out), "--quiet"]) == 0
    assert not calls  # the full-resolution maps of every image are never built at once
    rows = _rows(out / "scores.csv")
    offset = pipe[-1].offset_
    assert [r["score"] for r in rows] == [f"{s:.6f}" for s in expected]
    assert [int(r["label"]) for r in rows] == list(np.where(expected - offset < 0, -1, 1))
    assert [r["decision"] for r in rows] == [f"{s - offset:.6f}" for s in expected]


def test_predict_masks_and_overlays_are_the_maps_of_the_python_api(folders, model, tmp_path,
                                                                    monkeypatch):
    import skpatchcore._visualize as visualize

    scales = []
    real = visualize.colour_scale
    monkeypatch.setattr(visualize, "colour_scale",
                        lambda *a, **k: scales.append(real(*a, **k)) or scales[-1])
    monkeypatch.setattr(visualize, "_BAND_PIXELS", 300)  # bands of 2 rows of 2 x 64 pixels
    out = tmp_path / "out"
    assert main(["predict", str(model), str(folders / "new"), "--out", str(out), "--quiet",
                 "--threshold", "0.5"]) == 0
    pipe = load_model(model)
    paths = sorted((folders / "new").glob("*.png"))
    maps = pipe.predict_map(paths, sigma=4.0)
    (vmin, vmax), = scales
    for i, p in enumerate(paths):
        mask = np.asarray(Image.open(out / "masks" / f"{i:04d}_{p.stem}_mask.png"))
        np.testing.assert_array_equal(mask, (maps[i] > 0.5) * 255)
        overlay_file, = (out / "overlays").glob(f"{i:04d}_{p.stem}_score*_overlay.png")
        pair = np.asarray(Image.open(overlay_file))
        rgb = np.asarray(Image.open(p).convert("RGB"))
        np.testing.assert_array_equal(pair[:, :64], rgb)
        np.testing.assert_array_equal(pair[:, 64:], visualize.overlay(
            rgb, maps[i], vmin=vmin, vmax=vmax, threshold=0.5))
    # the shared scale comes from the maps at network-input resolution, close to the old one
    old_vmin, old_vmax = real(list(maps), 0.5)
    assert abs(vmin - old_vmin) < 0.05 * (old_vmax - old_vmin)
    assert abs(vmax - old_vmax) < 0.05 * (old_vmax - old_vmin)
    assert "turbo" in (out / "report.html").read_text()


def test_predict_shrinks_a_large_image_and_maps_it_back_whole(folders, model, tmp_path):
    from skpatchcore._geometry import upsample_maps
    from skpatchcore._images import check_images

    rng = np.random.RandomState(5)
    base = np.asarray(Image.open(folders / "new" / "n20.png").convert("RGB"))
    big = np.asarray(Image.fromarray(base).resize((500, 600), Image.BILINEAR))
    big = np.clip(big.astype(int) + rng.randint(-3, 4, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    pipe = load_model(model)
    geometry = pipe[0]._geometry
    assert geometry.reduction_factor((600, 500)) == 4  # 150 x 125 before the 64 px resize
    out = tmp_path / "out"
    assert main(["predict", str(model), str(tmp_path / "big.png"), "--out", str(out),
                 "--quiet"]) == 0
    score = float(_rows(out / "scores.csv")[0]["score"])
    shrunk = check_images([tmp_path / "big.png"]).for_geometry(geometry)
    expected = pipe[-1].score_samples(pipe[0].transform(shrunk))[0]
    assert f"{score:.6f}" == f"{expected:.6f}"
    # the same pixels in another form: the same score
    (_, from_array, grids), = pipe.iter_score_and_grids(big[None])
    assert from_array[0] == expected
    mask = np.asarray(Image.open(out / "masks" / "0000_big_mask.png"))
    assert mask.shape == (600, 500)
    full = geometry.to_image(upsample_maps(grids, geometry.input_size, 4.0)[0], (600, 500))
    np.testing.assert_array_equal(mask, (full > -pipe[-1].offset_) * 255)
    overlay_file, = (out / "overlays").glob("0000_big_score*_overlay.png")
    assert Image.open(overlay_file).size == (1000, 600)


def test_report_reads_overlays_larger_than_pillows_limit(tmp_path):
    import struct
    import zlib

    from skpatchcore._report import _image_size

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    path = tmp_path / "huge_overlay.png"  # the header of a 24000 x 12000 overlay
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 24000, 12000,
                                                                          8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert _image_size(path) == (24000, 12000)


# ------------------------------------------------------------- overlays and masks, banded
@pytest.mark.parametrize("channels", [1, 3])
def test_png_written_in_bands_reads_back(tmp_path, channels):
    from skpatchcore._visualize import _PNGWriter

    rng = np.random.RandomState(6)
    shape = (53, 41) if channels == 1 else (53, 41, 3)
    smooth = np.cumsum(rng.randint(-2, 3, shape), axis=1) % 256  # all five filters get used
    x = np.where(rng.rand(*shape) < 0.5, smooth, rng.randint(0, 256, shape)).astype(np.uint8)
    with _PNGWriter(tmp_path / "x.png", 53, 41, channels) as png:
        for y in range(0, 53, 7):
            png.write(x[y : y + 7])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), x)
    with pytest.raises(ValueError, match="10 of 53 rows"):  # no partial file is kept
        with _PNGWriter(tmp_path / "y.png", 53, 41, channels) as png:
            png.write(x[:10])
    assert not (tmp_path / "y.png").exists()


def test_overlay_written_in_bands_equals_the_whole_overlay(tmp_path, monkeypatch):
    import skpatchcore._visualize as visualize

    rng = np.random.RandomState(7)
    image = (rng.rand(31, 24, 3) * 255).astype(np.uint8)
    amap = rng.rand(31, 24).astype(np.float32)
    gt = np.zeros((31, 24), bool)
    gt[5:20, 3:9] = True
    monkeypatch.setattr(visualize, "_BAND_PIXELS", 100)  # bands of 2 rows
    visualize.write_overlay(tmp_path / "o.png", lambda a, b: image[a:b], lambda a, b: amap[a:b],
                            (31, 24), vmin=0.1, vmax=0.9, threshold=0.6,
                            mask_rows=lambda a, b: gt[a:b], mask_path=tmp_path / "m.png")
    whole = visualize.overlay(image, amap, vmin=0.1, vmax=0.9, threshold=0.6, mask=gt)
    pair = np.asarray(Image.open(tmp_path / "o.png"))
    np.testing.assert_array_equal(pair, np.concatenate([image, whole], axis=1))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")), (amap > 0.6) * 255)
    visualize.write_mask(tmp_path / "m2.png", lambda a, b: amap[a:b], (31, 24), 0.6)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m2.png")),
                                  (amap > 0.6) * 255)


# ------------------------------------------------------------------ export / ONNX predict
@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory):
    """A float32 model of the 'good' images (the library's numbers the graph must equal),
    as .npz and as ONNX for their 64 x 64 frames."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from skpatchcore import make_patchcore, save_model

    root = tmp_path_factory.mktemp("onnx")
    pipe = make_patchcore(backbone="efficientnet_lite0", image_size=64, precision="float32",
                          sampling_ratio=0.1, random_state=0)
    pipe.fit(sorted((folders / "good").glob("*.png")))
    npz = save_model(pipe, root / "model.npz")
    onnx_path = root / "model.onnx"
    assert main(["export", str(npz), "-o", str(onnx_path), "--like",
                 str(folders / "new" / "n16.png"), "--quiet"]) == 0
    return npz, onnx_path


def test_predict_with_onnx_needs_no_torch_and_writes_the_same_results(folders, exported,
                                                                      tmp_path):
    import subprocess
    import sys

    npz, onnx_path = exported
    assert main(["predict", str(npz), str(folders / "new"), "--out", str(tmp_path / "lib"),
                 "--quiet"]) == 0
    code = ("import sys; sys.modules['torch'] = None; from skpatchcore.cli import main; "
            f"sys.exit(main(['predict', {str(onnx_path)!r}, {str(folders / 'new')!r}, "
            f"'--out', {str(tmp_path / 'ort')!r}, '--quiet']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lib, ort = _rows(tmp_path / "lib" / "scores.csv"), _rows(tmp_path / "ort" / "scores.csv")
    assert [r["path"] for r in ort] == [r["path"] for r in lib]
    assert [r["label"] for r in ort] == [r["label"] for r in lib]
    np.testing.assert_allclose([float(r["score"]) for r in ort],
                               [float(r["score"]) for r in lib], rtol=1e-4)
    for name in ("overlays", "masks"):
        assert len(list((tmp_path / "ort" / name).glob("*.png"))) == 8
    for a, b in zip(sorted((tmp_path / "lib" / "masks").glob("*.png")),
                    sorted((tmp_path / "ort" / "masks").glob("*.png")), strict=True):
        agree = np.asarray(Image.open(a)) == np.asarray(Image.open(b))
        assert agree.mean() > 0.99  # the same maps, up to pixels at the threshold
    assert "model.onnx" in (tmp_path / "ort" / "report.html").read_text()


def test_export_and_onnx_predict_errors_exit_2(folders, exported, tmp_path, capsys):
    npz, onnx_path = exported
    assert main(["export", str(npz), "-o", str(onnx_path), "--frame-size", "64", "64"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(onnx_path), "-o", str(tmp_path / "x.onnx"),
                 "--frame-size", "64", "64"]) == 2
    assert "already an ONNX model" in capsys.readouterr().err
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(odd / "small.png")
    assert main(["predict", str(onnx_path), str(odd), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "small.png" in err and "40 x 50" in err and "--frame-size 40 50" in err
    assert not (tmp_path / "o").exists()
    text = tmp_path / "notes.onnx"
    text.write_text("hello")
    assert main(["predict", str(text), str(odd), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
    assert main(["predict", str(onnx_path), str(folders / "new"), "--out",
                 str(tmp_path / "o"), "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "onnxruntime on this machine: drop --scheduler" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _closed_port_address():
    import socket

    with socket.socket() as s:  # nothing listens on it once closed
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_scheduler_option_fits_and_predicts_as_this_machine(folders, model, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  protocol="tcp", host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        path = tmp_path / "m.npz"
        assert main(["fit", str(folders / "good"), "-o", str(path), "--image-size", "64",
                     "--coreset-ratio", "0.1", "--quiet", "--scheduler", address]) == 0
        remote, local = load_model(path), load_model(model)
        assert np.array_equal(remote[-1].memory_bank_, local[-1].memory_bank_)
        assert np.array_equal(remote[-1].bank_sample_index_, local[-1].bank_sample_index_)
        assert remote[-1].offset_ == local[-1].offset_
        outs = {}
        for name, extra in (("here", []), ("cluster", ["--scheduler", address])):
            outs[name] = tmp_path / name
            assert main(["predict", str(model), str(folders / "new"), "--out", str(outs[name]),
                         "--quiet", "--no-report", *extra]) == 0
    assert (outs["here"] / "scores.csv").read_text() == (
        outs["cluster"] / "scores.csv").read_text()
    for kind in ("overlays", "masks"):
        here = sorted((outs["here"] / kind).iterdir())
        cluster = sorted((outs["cluster"] / kind).iterdir())
        assert [p.name for p in here] == [p.name for p in cluster] and len(here) == 8
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(here, cluster, strict=True))


def test_an_unreachable_scheduler_exits_2_naming_it(folders, model, tmp_path, capsys):
    dask = pytest.importorskip("dask")
    pytest.importorskip("distributed")
    address = _closed_port_address()
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert main(["fit", str(folders / "good"), "-o", str(tmp_path / "m.npz"),
                     "--image-size", "64", "--quiet", "--scheduler", address]) == 2
        assert f"Could not reach a Dask scheduler at '{address}'" in capsys.readouterr().err
        assert not (tmp_path / "m.npz").exists()
        assert main(["predict", str(model), str(folders / "new"), "--out",
                     str(tmp_path / "o"), "--quiet", "--scheduler", address]) == 2
        assert f"Could not reach a Dask scheduler at '{address}'" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
    assert main(["fit", str(folders / "good"), "-o", str(tmp_path / "m.npz"), "--method",
                 "spade", "--scheduler", address]) == 2
    assert "--scheduler fits --method patchcore only" in capsys.readouterr().err


def test_fit_predict_an_ensemble(folders, tmp_path, capsys):
    path = tmp_path / "ensemble.npz"
    assert main(["fit", str(folders / "good"), "-o", str(path), "--ensemble",
                 "--coreset-ratio", "0.1"]) == 0
    said = capsys.readouterr()
    assert "fitted an ensemble of 2 patchcore models on 16 images" in said.out
    # 2 of 16 images held out: the threshold is rough, and fit says so in one line
    assert said.err.count("note: Only 2 held-out good images") == 1
    model = load_model(path)
    assert type(model).__name__ == "AnomalyEnsemble"
    assert [m[0].image_size for m in model.members_] == [320, 384]
    out = tmp_path / "out"
    assert main(["predict", str(path), str(folders / "new"), "--out", str(out),
                 "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    new = sorted((folders / "new").glob("*.png"))
    scores = np.array([float(r["score"]) for r in rows])
    np.testing.assert_allclose(scores, model.score_samples(new), rtol=1e-5, atol=1e-5)
    assert scores[4:].max() < scores[:4].min()  # defective parts score lower
    # the masks are the ensemble's maps above its pixel threshold
    mask = np.asarray(Image.open(sorted((out / "masks").glob("*.png"))[-1])) > 0
    np.testing.assert_array_equal(mask, model.predict_mask([new[-1]])[0])
    report = (out / "report.html").read_text()
    assert "ensemble of 2 models" in report and "Member lite1_384" in report
    assert "held-out good training images" in report
    assert main(["predict", str(path), str(folders / "new"), "--out", str(tmp_path / "o2"),
                 "--scheduler", "tcp://127.0.0.1:1", "--quiet"]) == 2
    assert "holds an ensemble" in capsys.readouterr().err


@pytest.mark.parametrize(("options", "fragment"), [
    (["--method", "padim"], "drop --method padim or --ensemble"),
    (["--backbone", "efficientnet_lite0"], "drop --backbone"),
    (["--image-size", "64"], "drop --image-size"),
    (["--scheduler", "tcp://127.0.0.1:1"], "not --ensemble"),
])
def test_ensemble_refuses_options_it_cannot_honour(folders, tmp_path, capsys, no_feature_work,
                                                    options, fragment):
    assert main(["fit", str(folders / "good"), "-o", str(tmp_path / "m.npz"), "--ensemble",
                 *options]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
