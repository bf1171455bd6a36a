"""report.html of ``predict`` and ``evaluate``: its content, its links, and a real browser."""

import csv
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from skpatchcore import load_model
from skpatchcore._demo import write_demo_dataset
from skpatchcore._report import ReportItem, write_report
from skpatchcore._visualize import COLORMAP, colorize, overlay, save_overlays
from skpatchcore.cli import main as cli_main
from skpatchcore.evaluate import main as evaluate_main

FAST = ["--image-size", "96", "--quiet"]


# --------------------------------------------------------------------------------------------
# Fixtures: the demo's synthetic data set, one model, one predict run, one evaluate run
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = write_demo_dataset(root / "data")
    model = root / "model.npz"
    assert cli_main(["fit", str(data), "-o", str(model), "--coreset-ratio", "0.1", *FAST]) == 0
    return root, data, model


@pytest.fixture(scope="module")
def predicted(demo):
    root, data, model = demo
    out = root / "predict"
    assert cli_main(["predict", str(model), str(data / "test" / "defect"),
                     str(data / "test" / "good"), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def evaluated(demo):
    root, data, _ = demo
    out = root / "evaluate"
    assert evaluate_main([str(data), "--sampling-ratio", "0.1", "--report", str(out),
                          "--json", str(root / "results.json"), *FAST]) == 0
    return out, json.loads((root / "results.json").read_text())


class Page(HTMLParser):
    """The parts of report.html the tests look at."""

    def __init__(self, path):
        super().__init__()
        self.images, self.links, self.items, self.ids, self.tags = [], [], [], {}, set()
        self.confusion = []
        self._text_of = None
        self.feed(Path(path).read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(attrs)
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "li" and "data-score" in attrs:
            self.items.append({"score": float(attrs["data-score"]),
                               "label": int(attrs["data-label"]), "class": attrs["class"],
                               "kind": attrs.get("data-kind"), "img": None, "name": None})
        if tag == "tr" and "data-tp" in attrs:
            self.confusion.append({k: int(attrs[f"data-{k}"]) for k in ("tp", "fn", "fp", "tn")})
        if tag == "img" and self.items and "data-score" not in attrs:
            self.items[-1]["img"] = self.items[-1]["img"] or attrs
        if "id" in attrs:
            self._text_of = attrs["id"]
            self.ids[attrs["id"]] = ""
        if tag == "span" and attrs.get("class") == "name":
            self._text_of = "name"

    def handle_data(self, data):
        if self._text_of == "name" and self.items:
            self.items[-1]["name"] = data.strip()
            self._text_of = None
        elif self._text_of is not None:
            self.ids[self._text_of] += data

    def handle_endtag(self, tag):
        self._text_of = None


def _relative(refs):
    return [r for r in refs if not r.startswith(("data:", "#", "http:", "https:", "file:"))]


def _check_links_resolve(folder, page):
    refs = _relative([img["src"] for img in page.images] + page.links)
    assert refs, "no relative link to check"
    for ref in refs:
        assert (folder / unquote(ref)).exists(), ref
    return refs


# --------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------


def test_predict_report_content(demo, predicted):
    _, data, model = demo
    page = Page(predicted / "report.html")
    rows = list(csv.DictReader(open(predicted / "scores.csv")))
    labels = [int(r["label"]) for r in rows]
    n_bad = labels.count(-1)
    # the counts, as scores.csv has them
    assert len(rows) == 40 and len(page.items) == 40
    assert page.ids["count-total"].split()[0] == "40"
    assert page.ids["count-flagged"].split()[0] == str(n_bad)
    assert page.ids["count-passed"].split()[0] == str(40 - n_bad)
    assert f"({n_bad} of 40)" in Path(predicted / "report.html").read_text()
    # the threshold: -offset_ of the model, on the anomaly score
    threshold = -load_model(model)[-1].offset_
    assert page.ids["threshold-value"].strip() == f"{threshold:.6g}"
    # the gallery: most anomalous first, anomaly score = -score_samples, labels as the CSV
    by_name = {Path(r["path"]).name: r for r in rows}
    scores = [item["score"] for item in page.items]
    assert scores == sorted(scores, reverse=True)
    for item in page.items:
        row = by_name[item["name"]]
        assert item["score"] == pytest.approx(-float(row["score"]), abs=1e-6)
        assert item["label"] == int(row["label"])
        assert ("flagged" in item["class"]) == (item["label"] == -1)
        assert (item["score"] > threshold) == (item["label"] == -1)
        assert item["img"]["loading"] == "lazy" and item["name"] in item["img"]["alt"]
    # every image has alt text; links are relative and resolve; nothing from the network
    assert all(img.get("alt", "").strip() for img in page.images)
    refs = _check_links_resolve(predicted, page)
    assert sum(r.startswith("overlays/") for r in refs) == 2 * 40  # <a> and <img>
    assert "script" not in page.tags and "http://" not in "".join(page.links)
    text = (predicted / "report.html").read_text()
    assert "efficientnet_lite2" in text and str(model.resolve()) in text
    assert "contamination=&#39;auto&#39;" in text and f"'{COLORMAP}'" in text
    # the folder can be moved: links are relative to it
    moved = predicted.parent / "moved"
    shutil.copytree(predicted, moved)
    _check_links_resolve(moved, Page(moved / "report.html"))


def test_predict_report_embed_no_images_and_no_report(demo, tmp_path, capsys):
    _, data, model = demo
    new = str(data / "test" / "defect")
    assert cli_main(["predict", model.as_posix(), new, "--out", str(tmp_path / "e"), "--embed",
                     "--quiet"]) == 0
    page = Page(tmp_path / "e" / "report.html")
    assert len(page.items) == 20 and all(i["img"] for i in page.items)
    assert not _relative([img["src"] for img in page.images])  # no relative image link
    assert all(img["src"].startswith("data:image/") for img in page.images)
    # alone in another folder, the page has all it shows
    (tmp_path / "alone").mkdir()
    shutil.copy(tmp_path / "e" / "report.html", tmp_path / "alone")
    assert not _relative([img["src"] for img in Page(tmp_path / "alone/report.html").images])

    assert cli_main(["predict", str(model), new, "--out", str(tmp_path / "n"), "--no-images",
                     "--quiet"]) == 0
    page = Page(tmp_path / "n" / "report.html")
    assert len(page.items) == 20 and not any(i["img"] for i in page.items)
    assert all(i["name"].startswith("part_") for i in page.items)
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["report.html", "scores.csv"]

    assert cli_main(["predict", str(model), new, "--out", str(tmp_path / "r"), "--no-report",
                     "--quiet"]) == 0
    assert not (tmp_path / "r" / "report.html").exists()
    assert cli_main(["predict", str(model), new, "--out", str(tmp_path / "x"), "--no-report",
                     "--embed", "--quiet"]) == 2
    assert "--no-report" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_threshold_source_names_calibration_or_contamination(demo, tmp_path):
    from types import SimpleNamespace

    from skpatchcore._report import predict_report, threshold_source

    assert "contamination='auto'" in threshold_source(SimpleNamespace(contamination="auto"))
    assert "contamination=0.05" in threshold_source(SimpleNamespace(contamination=0.05))
    _, data, model = demo
    pipe = load_model(model)
    good = sorted((data / "test" / "good").glob("*.png"))
    pipe.calibrate(good, fpr=0.05)
    paths = sorted((data / "test" / "defect").glob("*.png"))[:4]
    path = predict_report(tmp_path, model_file="m.npz", pipe=pipe, paths=paths,
                          scores=pipe.score_samples(paths), overlays=None, seconds=1.5)
    text = path.read_text()
    assert "calibrated on 20 held-out good images for a false-positive rate of 0.05" in text
    assert f"{-pipe[-1].offset_:.6g}" in Page(path).ids["threshold-value"]
    assert "1.5 s" in text


def test_overwrite_replaces_the_report_with_the_run(demo, tmp_path):
    _, data, model = demo
    out = tmp_path / "out"
    args = ["predict", str(model), "--out", str(out), "--quiet"]
    assert cli_main(args[:2] + [str(data / "test" / "defect")] + args[2:]) == 0
    assert cli_main(args[:2] + [str(data / "test" / "good")] + args[2:] +
                    ["--overwrite", "--no-report"]) == 0
    assert not (out / "report.html").exists()  # never the report of the earlier run
    assert cli_main(args[:2] + [str(data / "test" / "good")] + args[2:] + ["--overwrite"]) == 0
    assert len(Page(out / "report.html").items) == 20


def test_evaluate_report_content(evaluated):
    out, results = evaluated
    page = Page(out / "report.html")
    text = (out / "report.html").read_text()
    assert len(page.items) == 40
    scores = [item["score"] for item in page.items]
    assert scores == sorted(scores, reverse=True)
    _check_links_resolve(out, page)
    assert all(img.get("alt", "").strip() for img in page.images)
    alts = " ".join(img["alt"] for img in page.images)
    assert "ROC curve" in alts
    assert "Per-region-overlap curve up to a false-positive rate of 0.3" in alts
    assert f"AUPRO {results['aupro@0.3']:.3f}" in alts
    assert "Median-score overlay of type good" in alts
    assert "Median-score overlay of type defect" in alts
    assert f"{results['image_auroc_by_type']['defect']:.3f}" in text
    assert f"{results['pixel_auroc_by_type']['defect']:.3f}" in text
    assert "model threshold" in text and "best-F1 threshold" in text
    assert "Histogram of the anomaly scores of 40 images, good and defective" in alts
    # confusion counts at the model's threshold agree with the gallery; best F1 is at least
    # as good
    kinds = [i["kind"] for i in page.items]
    assert kinds.count("good") == kinds.count("defect") == 20
    flagged = [i["label"] == -1 for i in page.items]
    at_model, at_best = page.confusion
    assert at_model == {
        "tp": sum(f and k == "defect" for f, k in zip(flagged, kinds, strict=True)),
        "fn": sum(not f and k == "defect" for f, k in zip(flagged, kinds, strict=True)),
        "fp": sum(f and k == "good" for f, k in zip(flagged, kinds, strict=True)),
        "tn": sum(not f and k == "good" for f, k in zip(flagged, kinds, strict=True))}
    assert sum(at_best.values()) == 40
    assert 2 * at_best["tp"] / (2 * at_best["tp"] + at_best["fp"] + at_best["fn"]) >= (
        2 * at_model["tp"] / (2 * at_model["tp"] + at_model["fp"] + at_model["fn"]))
    assert len(list((out / "overlays").glob("*_overlay.png"))) == 40


def test_evaluate_refuses_unwritable_report_before_any_work(demo, tmp_path, capsys,
                                                             monkeypatch):
    from skpatchcore.features import FeatureExtractor

    def refuse(*args, **kwargs):
        raise AssertionError("features were extracted before --report was checked")

    monkeypatch.setattr(FeatureExtractor, "_iter_batches", refuse)
    _, data, _ = demo
    (tmp_path / "a_file").write_text("x")
    assert evaluate_main([str(data), "--report", str(tmp_path / "a_file" / "r"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report") and "Traceback" not in err
    assert cli_main(["evaluate", str(data), "--embed", *FAST]) == 2
    assert "--report" in capsys.readouterr().err


def test_page_bytes_per_image_stay_small(tmp_path):
    """10,000 images: the page grows by well under 1 KB per image (docs/cli.md)."""
    (tmp_path / "overlays").mkdir()
    png = tmp_path / "overlays" / "0000_a b#c_overlay.png"
    Image.new("RGB", (64, 32)).save(png)
    rng = np.random.RandomState(0)

    def size(n):
        items = [ReportItem(f"part_{i:05d}.png", f"/data/line_3/part_{i:05d}.png",
                            float(rng.rand()), -1 if i % 7 == 0 else 1, png)
                 for i in range(n)]
        path = write_report(tmp_path, items, title="t", summary=[], threshold=0.9,
                            colour_scale=(0.0, 1.0))
        return path.stat().st_size

    small, large = size(100), size(10_000)
    per_image = (large - small) / 9_900
    assert per_image < 1000, per_image
    page = Page(tmp_path / "report.html")
    assert len(page.items) == 10_000 and all(i["img"]["loading"] == "lazy" for i in page.items)
    _check_links_resolve(tmp_path, page)  # names with a space and '#' are quoted


# --------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------


def test_overlay_colours_come_from_the_matplotlib_colormap():
    from matplotlib import colormaps

    values = np.linspace(0, 1, 257)
    expected = np.round(colormaps[COLORMAP](values)[:, :3] * 255)
    assert np.abs(colorize(values).astype(int) - expected).max() <= 12  # 256-entry table
    np.testing.assert_array_equal(colorize([0.0, 1.0]), expected[[0, -1]].astype(np.uint8))
    assert colorize(np.array([-5.0, np.nan, 7.0])).dtype == np.uint8


def test_overlay_outlines_and_dtype():
    image = np.full((20, 30, 3), 128, np.uint8)
    amap = np.zeros((20, 30), np.float64)
    amap[5:15, 10:20] = 1.0
    mask = np.zeros((20, 30), bool)
    mask[8:12, 2:6] = True
    out = overlay(image, amap, vmin=0.0, vmax=2.0, threshold=0.5, mask=mask)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert (out[5, 12] == 255).all() and (out[8, 3] == (0, 255, 0)).all()
    assert not (out[10, 15] == 255).all()  # inside the region: colours, not outline


def test_save_overlays_shares_one_scale(tmp_path):
    images = [np.full((8, 8, 3), 100, np.uint8)] * 2
    maps = [np.zeros((8, 8), np.float32), np.ones((8, 8), np.float32)]
    paths = save_overlays(images, maps, tmp_path, scores=[0.1, 0.2])
    assert [p.name for p in paths] == ["0000_00000_score0.100_overlay.png",
                                       "0001_00001_score0.200_overlay.png"]
    low, high = (np.asarray(Image.open(p))[:, 8:] for p in paths)
    assert not np.array_equal(low, high)  # one scale: 0 and 1 get different colours


# --------------------------------------------------------------------------------------------
# A real browser
# --------------------------------------------------------------------------------------------

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run",
          "--disable-dev-shm-usage", "--remote-debugging-port=0"]


@pytest.fixture(scope="session")
def chromium():
    """The browser's executable; looked for first, so a skip costs no fitting."""
    explicit = os.environ.get("SKPATCHCORE_CHROMIUM")
    found = explicit or next(filter(None, map(shutil.which, _BROWSERS)), None)
    if not found:
        pytest.skip("no Chromium installed (make test installs Debian's 'chromium'; or set "
                    "SKPATCHCORE_CHROMIUM to a Chromium/Chrome executable)")
    return found


class DevTools:
    """Chromium driven over the DevTools protocol: console errors, exceptions, evaluation."""

    def __init__(self, executable, profile):
        websocket = pytest.importorskip("websocket", reason="needs websocket-client")
        self.proc = subprocess.Popen([executable, *_FLAGS, f"--user-data-dir={profile}",
                                      "about:blank"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not start (exit code {self.proc.poll()})")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            page = next(t for t in json.load(resp) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30,
                                              suppress_origin=True)
        self.next_id, self.errors, self.events = 0, [], []
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(method)

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def _event(self, message):
        method, params = message.get("method"), message.get("params", {})
        self.events.append(method)
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append(("console", [a.get("value") for a in params["args"]]))
        elif method == "Runtime.exceptionThrown":
            self.errors.append(("exception", params["exceptionDetails"].get("text")))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(("log", params["entry"]["text"], params["entry"].get("url")))

    def open(self, url):
        self.events.clear()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        while "Page.loadEventFired" not in self.events:
            assert time.monotonic() < deadline, "the page did not finish loading"
            self._event(json.loads(self.ws.recv()))

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True,
                           returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def close(self):
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_VISIBLE = "[...document.querySelectorAll('#gallery .item')].filter(e => e.offsetParent).length"
# every image of the page, lazy or not, loaded and decoded: names of those that fail
_ALL_DECODE = """Promise.all([...document.images].map(img => {
    img.loading = 'eager';
    return img.decode().then(() => null, () => img.alt);
})).then(failed => failed.filter(x => x !== null))"""


def test_report_in_a_real_browser(chromium, predicted, evaluated, tmp_path):
    browser = DevTools(chromium, tempfile.mkdtemp(dir=tmp_path, prefix="profile-"))
    try:
        # the harness sees what it must: a broken image and a script's console error
        bad = tmp_path / "bad.html"
        bad.write_text('<!doctype html><img src="missing.png" alt="x">'
                       '<script>console.error("seen")</script>')
        browser.open(bad.as_uri())
        kinds = sorted({error[0] for error in browser.errors})
        assert kinds == ["console", "log"], browser.errors
        browser.errors.clear()
        for folder, n_images in ((predicted, 40), (evaluated[0], 40)):
            page = Page(folder / "report.html")
            n_flagged = sum(item["label"] == -1 for item in page.items)
            browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=900,
                         deviceScaleFactor=1, mobile=False)
            browser.open((folder / "report.html").as_uri())
            assert browser.js("document.querySelectorAll('#gallery .item').length") == n_images
            assert browser.js(_VISIBLE) == n_images
            assert browser.js("document.querySelectorAll('script').length") == 0
            # the pure-CSS filter: tick "flagged only", the passed images disappear
            browser.js("document.getElementById('flagged-only').click()")
            assert browser.js("document.getElementById('flagged-only').checked") is True
            assert browser.js(_VISIBLE) == n_flagged
            browser.js("document.getElementById('flagged-only').click()")
            assert browser.js(_VISIBLE) == n_images
            assert browser.js(_ALL_DECODE) == []  # every overlay and plot loads
            # a phone's width: no sideways scrolling of the page (wide tables scroll alone)
            browser.call("Emulation.setDeviceMetricsOverride", width=390, height=844,
                         deviceScaleFactor=2, mobile=True)
            browser.open((folder / "report.html").as_uri())
            assert browser.js("document.documentElement.scrollWidth") <= 390
            assert browser.js(_VISIBLE) == n_images
            assert browser.errors == [], browser.errors
    finally:
        browser.close()
