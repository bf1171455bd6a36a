import json

import numpy as np
import pytest
from PIL import Image

from skpatchcore._visualize import colorize
from skpatchcore.datasets import make_defect_images
from skpatchcore.evaluate import evaluate, main


@pytest.fixture(scope="module")
def tiny_mvtec(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    X, y, masks = make_defect_images(24, 8, image_size=(64, 96), random_state=1)
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (root / sub).mkdir(parents=True)
    for i in range(16):
        Image.fromarray(X[i]).save(root / "train/good" / f"{i:03d}.png")
    for i in range(16, 24):
        Image.fromarray(X[i]).save(root / "test/good" / f"{i:03d}.jpg", quality=95)
    for i in range(24, 32):
        Image.fromarray(X[i]).save(root / "test/spot" / f"{i:03d}.png")
        Image.fromarray(masks[i].astype(np.uint8) * 255).save(
            root / "ground_truth/spot" / f"{i:03d}_mask.png")
    return root


def test_evaluate_reports_the_fields_metrics(tiny_mvtec, tmp_path):
    res = evaluate(tiny_mvtec, image_size=64, sampling_ratio=0.1, random_state=0,
                   save_maps=tmp_path / "maps")
    assert res["n_train"] == 16 and res["n_test"] == 16 and res["n_anomalous"] == 8
    assert res["image_auroc"] > 0.9
    assert res["pixel_auroc"] > 0.9
    assert res["aupro@0.3"] > 0.5
    # one defect type: against the good images it is the whole test set
    assert res["image_auroc_by_type"] == {"spot": pytest.approx(res["image_auroc"], abs=1e-12)}
    assert res["pixel_auroc_by_type"] == {"spot": pytest.approx(res["pixel_auroc"], abs=1e-12)}
    assert res["fit_seconds"] > 0 and res["ms_per_image"] > 0 and res["peak_rss_mb"] > 50
    overlays = sorted((tmp_path / "maps").glob("*_overlay.png"))
    assert len(overlays) == 16
    assert Image.open(overlays[0]).size == (192, 64)  # original | overlay


def test_cli_writes_json_and_fails_cleanly(tiny_mvtec, tmp_path, capsys):
    out = tmp_path / "res.json"
    code = main([str(tiny_mvtec), "--image-size", "64", "--sampling-ratio", "0.1",
                 "--json", str(out), "--quiet"])
    assert code == 0
    assert json.loads(out.read_text())["image_auroc"] > 0.9
    assert "image_auroc" in capsys.readouterr().out
    assert main([str(tmp_path / "missing"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and "Traceback" not in err
    assert main([str(tiny_mvtec), "--sigma", "-1", "--quiet"]) == 2
    assert "sigma=-1.0" in capsys.readouterr().err


def test_sigma_smooths_maps_but_leaves_image_scores(tiny_mvtec):
    params = dict(image_size=64, sampling_ratio=0.1, random_state=0)
    sharp = evaluate(tiny_mvtec, sigma=0.0, **params)
    smooth = evaluate(tiny_mvtec, sigma=8.0, **params)
    assert (sharp["sigma"], smooth["sigma"]) == (0.0, 8.0)
    assert sharp["image_auroc"] == smooth["image_auroc"]
    assert sharp["pixel_auroc"] != smooth["pixel_auroc"]


def test_colorize_is_ordered():
    c = colorize(np.linspace(0, 1, 5)).astype(int)
    assert c.shape == (5, 3)
    assert c[0].sum() < c[2].sum()  # dark at the bottom of the scale
    assert c[-1, 0] > c[-1, 2]  # red at the top


def test_evaluate_an_ensemble_with_its_report(tiny_mvtec, tmp_path):
    res = evaluate(tiny_mvtec, ensemble=True, sampling_ratio=0.1, report=tmp_path / "r")
    assert res["ensemble"] is True and res["image_auroc"] > 0.9 and res["pixel_auroc"] > 0.9
    assert res["params"]["lite1_384__features__image_size"] == 384
    assert res["params"]["validation_fraction"] == 0.1
    json.dumps(res)  # every parameter is plain data
    html = (tmp_path / "r" / "report.html").read_text()
    assert "ensemble of 2 models" in html and "Member lite2_320" in html
