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
