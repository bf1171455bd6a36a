import csv

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
