"""One HTML page a quality engineer opens in a browser: ``report.html``.

``skpatchcore predict ... --out OUT`` writes ``OUT/report.html`` and ``skpatchcore evaluate
ROOT --report DIR`` writes ``DIR/report.html``. The page holds a summary (model, method,
threshold and where it came from, counts, time), a histogram of the image anomaly scores
with the threshold, the colour scale of the overlays, and a gallery of every image's overlay
from most to least anomalous, which a pure-CSS checkbox filters to the flagged images. The
evaluate page adds the ROC and PRO curves, a table per defect type, the confusion counts at
the model's threshold and at the best-F1 threshold, and the median-score overlay of each type.

The page is rendered by Jinja2 from ``templates/report.html.j2``; the plots are drawn by
matplotlib as SVG and embedded in the page as ``data:`` URIs, so the page needs no file
beside it but the overlays. The overlays are linked by relative path (move the folder as a
whole), or embedded as ``data:`` URIs with ``embed=True``. No script, no network access.
Images in the gallery load lazily, so the page holds up with 10,000 images (about 0.6 KB
of HTML per image; docs/cli.md).
"""

from __future__ import annotations

import base64
import datetime
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ._utils import labels_from_decision
from ._version import __version__
from .methods import METHOD_OF_CLASS, final_estimator, is_trained

__all__ = ["ReportItem", "evaluation_report", "predict_report", "threshold_source",
           "write_report"]

#: Colours of the plots (Okabe-Ito: distinguishable with colour-blindness).
_GOOD, _BAD, _LINE, _ALT = "#0072B2", "#D55E00", "#000000", "#009E73"
#: points of the PRO curve drawn (the AUPRO shown is computed exactly by metrics.aupro)
_PRO_POINTS = 400


@dataclass
class ReportItem:
    """One image of the gallery.

    score is the anomaly score, ``-score_samples``: higher = more anomalous; label is the
    model's decision, +1 good / -1 defect; overlay the overlay file (None: no image); kind the
    defect type when known (evaluate).
    """

    name: str
    path: str
    score: float
    label: int
    overlay: Path | None = None
    kind: str | None = None


# --------------------------------------------------------------------------------------------
# Model description
# --------------------------------------------------------------------------------------------


def threshold_source(detector):
    """Where the detector's ``offset_`` came from, in words."""
    fpr = getattr(detector, "calibration_fpr_", None)
    if fpr is not None:
        n = getattr(detector, "calibration_n_samples_", None)
        on = f" on {n} held-out good images" if n is not None else ""
        return (f"calibrated{on} for a false-positive rate of {fpr:g} "
                "('skpatchcore fit --calibrate')")
    contamination = getattr(detector, "contamination", None)
    held = getattr(detector, "n_validation_images_", None)
    images = ("leave-one-out anomaly scores of the good training images" if held is None
              else f"anomaly scores of the {held} held-out good training images")
    if contamination == "auto":
        return f"fitted by contamination='auto': Tukey's fence (Q3 + 1.5 IQR) on the {images}"
    if contamination is not None:
        which = ("good training images score above it (leave-one-out)" if held is None
                 else f"the {held} held-out good training images score above it")
        return f"fitted by contamination={contamination:g}: about {contamination:.1%} of {which}"
    return "the model's offset_"


def _model_rows(pipe):
    detector = final_estimator(pipe)
    name = type(detector).__name__
    if hasattr(detector, "members_"):  # an AnomalyEnsemble: one row per member
        rows = [("Method", f"ensemble of {len(detector.members_)} models ({name}): the mean "
                           "of their standardised scores and maps"),
                ("Training", f"members fitted on {detector.n_train_images_} good images; "
                             f"{detector.n_validation_images_} held out set their units")]
        for (member_name, _), member in zip(detector.members, detector.members_,
                                             strict=True):
            described = dict(_model_rows(member))
            rows.append((f"Member {member_name}", "; ".join(
                described.get(key, "") for key in ("Method", "Backbone", "Training")
                if key in described)))
        return rows
    rows = [("Method", f"{METHOD_OF_CLASS.get(name, name)} ({name})")]
    if is_trained(detector):
        rows.append(("Training", f"image size {detector.image_size} ({detector.resize_mode}), "
                                 f"{detector.n_epochs_} epochs on {detector.n_train_images_} "
                                 f"good images, {detector.n_validation_images_} held out"))
        return rows
    extractor = pipe[0]
    if hasattr(extractor, "backbone"):
        scales = ", ".join(f"{s:g}" for s in getattr(extractor, "scales", (1.0,)))
        rows.append(("Backbone", f"{extractor.backbone}, image size {extractor.image_size} "
                                 f"({extractor.resize_mode}), patch size "
                                 f"{extractor.patch_size}, scales {scales}"))
    return rows


def _threshold_rows(detector, threshold, pixel_threshold=None):
    rows = [("Threshold", f"{threshold:.6g} on the anomaly score (−offset_; offset_ = "
                          f"{detector.offset_:.6g}): an image scoring above it is flagged −1"),
            ("Threshold source", threshold_source(detector))]
    if pixel_threshold is not None and pixel_threshold != threshold:
        rows.append(("Pixel threshold", f"{pixel_threshold:.6g} (--threshold, or the model's "
                                        "pixel_threshold_): the masks and the white outlines "
                                        "of the overlays"))
    return rows


# --------------------------------------------------------------------------------------------
# Images and plots
# --------------------------------------------------------------------------------------------


def _data_uri(data, mime):
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _image_src(folder, path, embed):
    """A relative, URL-quoted link to ``path`` from ``folder``, or a data URI."""
    path = Path(path)
    if embed:
        mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(
            path.suffix.lower(), "application/octet-stream")
        return _data_uri(path.read_bytes(), mime)
    rel = Path(os.path.relpath(path, folder)).as_posix()
    return quote(rel)


def _image_size(path):
    from ._images import open_image_file

    # the header only, and without Pillow's decompression-bomb check, which refuses the
    # overlay of a very large image (our own file, and never decoded here)
    with open_image_file(path, "report") as img:
        return img.size


def _figure(width=6.4, height=3.6):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _svg(fig):
    """The figure as an SVG data URI (text kept as text, deterministic ids)."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "skpatchcore"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return _data_uri(buf.getvalue(), "image/svg+xml")


def _style(ax):
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.25)


def _histogram(scores, threshold, is_anomalous=None):
    from matplotlib.ticker import MaxNLocator

    scores = np.asarray(scores, dtype=np.float64)
    fig = _figure()
    ax = fig.add_subplot()
    n_bins = int(min(80, max(30, math.ceil(2 * math.sqrt(scores.size)))))
    lo, hi = min(scores.min(), threshold), max(scores.max(), threshold)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, n_bins + 1)
    if is_anomalous is None:
        ax.hist(scores, bins=bins, color=_GOOD, label="images")
    else:
        ax.hist([scores[~is_anomalous], scores[is_anomalous]], bins=bins, stacked=True,
                color=[_GOOD, _BAD], label=["good (ground truth)", "defective (ground truth)"])
    ax.axvline(threshold, color=_LINE, linestyle="--", linewidth=1.5,
               label=f"threshold {threshold:.4g}")
    ax.set_xlabel("anomaly score = −score_samples (higher = more anomalous)")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(frameon=False)
    _style(ax)
    return _svg(fig)


def _colour_bar(vmin, vmax, pixel_threshold, colormap):
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fig = _figure(6.4, 1.25)
    ax = fig.add_subplot()
    mappable = ScalarMappable(Normalize(vmin, vmax), colormaps[colormap])
    bar = fig.colorbar(mappable, cax=ax, orientation="horizontal")
    bar.solids.set_rasterized(True)  # one small bitmap, not a rectangle per colour
    bar.set_label(f"anomaly map value (matplotlib colormap '{colormap}', one scale for all "
                  "overlays)")
    if pixel_threshold is not None and vmin <= pixel_threshold <= vmax:
        ax.axvline(pixel_threshold, color="white", linewidth=2)
        ax.axvline(pixel_threshold, color="black", linewidth=0.8)
    return _svg(fig)


def _roc(is_anomalous, scores, points):
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(is_anomalous, scores)
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999999", linewidth=1, linestyle=":", label="chance")
    ax.plot(fpr, tpr, color=_GOOD, linewidth=2, label="ROC")
    styles = [dict(marker="o", markersize=13, markerfacecolor="none", markeredgewidth=2,
                   color=_LINE),
              dict(marker="s", markersize=6, color=_BAD)]
    for (label, x, y), style in zip(points, styles, strict=False):
        ax.plot([x], [y], linestyle="none", label=label, clip_on=False, zorder=3, **style)
    ax.set_xlabel("false-positive rate (good images flagged)")
    ax.set_ylabel("true-positive rate (defective images flagged)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(frameon=False, loc="lower right")
    _style(ax)
    return _svg(fig)


def _pro(masks, maps, fpr_limit):
    from .metrics import pro_curve

    fpr, pro, _ = pro_curve(masks, maps, num_thresholds=_PRO_POINTS)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit and keep.sum() < fpr.size:  # the curve's value at the limit
        x = np.r_[x, fpr_limit]
        y = np.r_[y, np.interp(fpr_limit, fpr, pro)]
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    ax.plot(x, y, color=_GOOD, linewidth=2, label="PRO")
    ax.fill_between(x, y, color=_GOOD, alpha=0.12)
    ax.set_xlabel(f"false-positive rate of defect-free pixels (up to {fpr_limit:g})")
    ax.set_ylabel("per-region overlap")
    ax.set_xlim(0, fpr_limit)
    ax.set_ylim(-0.01, 1.01)
    _style(ax)
    return _svg(fig)


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------


def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("skpatchcore", "templates"),
        autoescape=True, trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )


def _alt(item):
    decision = "flagged as defect (−1)" if item.label == -1 else "passed as good (+1)"
    kind = f", ground truth: {item.kind}" if item.kind else ""
    return (f"Overlay of {item.name}: the image, then its anomaly colours over it; "
            f"anomaly score {item.score:.4f}, {decision}{kind}")


def _gallery(folder, items, embed):
    order = sorted(range(len(items)), key=lambda i: (-items[i].score, items[i].name, i))
    entries = []
    for rank, i in enumerate(order, 1):
        item = items[i]
        entry = {"rank": rank, "name": item.name, "path": item.path, "score": item.score,
                 "label": item.label, "kind": item.kind, "alt": _alt(item), "src": None}
        if item.overlay is not None:
            entry["width"], entry["height"] = _image_size(item.overlay)
            entry["src"] = _image_src(folder, item.overlay, embed)
        entries.append(entry)
    return entries


def write_report(folder, items, *, title, summary, threshold, is_anomalous=None,
                 colour_scale=None, pixel_threshold=None, evaluation=None, embed=False,
                 links=()):
    """Render ``folder/report.html``; returns its path.

    Parameters
    ----------
    folder : Path
        Where the page goes; overlays are linked relative to it.
    items : list of ReportItem
    title : str
    summary : list of (str, str)
        Rows of the summary table.
    threshold : float
        The image threshold on the anomaly score (``-offset_``).
    is_anomalous : bool array, optional
        Ground truth per item, to split the histogram.
    colour_scale : (vmin, vmax), optional
        The overlays' shared scale; drawn when given.
    pixel_threshold : float, optional
        The white outline's threshold, marked on the colour scale.
    evaluation : dict, optional
        The evaluate sections (:func:`evaluation_report`).
    embed : bool
        Embed the overlays as data URIs instead of linking them.
    links : sequence of (str, str)
        (label, file name in ``folder``) of other results to link.
    """
    from ._visualize import COLORMAP

    folder = Path(folder)
    scores = np.array([item.score for item in items], dtype=np.float64)
    flagged = sum(item.label == -1 for item in items)
    context = {
        "title": title,
        "version": __version__,
        "generated": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "summary": summary,
        "n_images": len(items),
        "n_flagged": flagged,
        "n_passed": len(items) - flagged,
        "threshold": threshold,
        "histogram": _histogram(scores, threshold, is_anomalous) if len(items) else None,
        "colormap": COLORMAP,
        "colour_bar": None if colour_scale is None else _colour_bar(
            *colour_scale, pixel_threshold, COLORMAP),
        "colour_scale": colour_scale,
        "pixel_threshold": threshold if pixel_threshold is None else pixel_threshold,
        "gallery": _gallery(folder, items, embed),
        "has_images": any(item.overlay is not None for item in items),
        "has_truth": is_anomalous is not None,
        "evaluation": evaluation,
        "embed": embed,
        "links": [(label, quote(name)) for label, name in links
                  if not embed and (folder / name).exists()],
    }
    html = _environment().get_template("report.html.j2").render(**context)
    path = folder / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


def predict_report(folder, *, model_file, pipe, paths, scores, overlays, seconds,
                   pixel_threshold=None, colour_scale=None, embed=False):
    """``report.html`` of a ``predict`` run: ``scores`` are ``score_samples`` values (lower =
    more abnormal), ``overlays`` the written files in input order, or None."""
    detector = final_estimator(pipe)
    anomaly = -np.asarray(scores, dtype=np.float64)
    threshold = -float(detector.offset_)
    labels = labels_from_decision(-anomaly - detector.offset_)  # as scores.csv: NaN -> -1
    items = [ReportItem(Path(p).name, str(p), float(s), int(lab),
                        None if overlays is None else Path(overlays[i]))
             for i, (p, s, lab) in enumerate(zip(paths, anomaly, labels, strict=True))]
    n_bad = int((labels == -1).sum())
    summary = [("Model file", str(model_file)), *_model_rows(pipe),
               *_threshold_rows(detector, threshold,
                                None if overlays is None else pixel_threshold),
               ("Images", f"{len(items)} scored: {n_bad} flagged (−1 defect), "
                          f"{len(items) - n_bad} passed (+1 good)"),
               ("Time taken", _duration(seconds, len(items)))]
    return write_report(folder, items, title="skpatchcore predict report", summary=summary,
                        threshold=threshold, colour_scale=colour_scale,
                        pixel_threshold=pixel_threshold, embed=embed,
                        links=[("scores.csv", "scores.csv"), ("masks/", "masks")])


def _duration(seconds, n):
    per = f" ({1000.0 * seconds / n:.0f} ms per image)" if n else ""
    return f"{seconds:.1f} s{per}"


def _confusion(is_anomalous, flagged):
    tp = int((flagged & is_anomalous).sum())
    fp = int((flagged & ~is_anomalous).sum())
    fn = int((~flagged & is_anomalous).sum())
    tn = int((~flagged & ~is_anomalous).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall,
            "f1": f1, "fpr": fp / (fp + tn) if fp + tn else float("nan")}


def evaluation_report(folder, *, pipe, test_paths, types, scores, overlays, pixel_masks,
                      pixel_maps, results, fpr_limit, seconds, root, colour_scale=None,
                      embed=False):
    """``report.html`` of an ``evaluate`` run: the predict page plus the ROC and PRO curves,
    a table per defect type, confusion counts and the median overlay of each type.

    ``scores`` are ``score_samples`` values of the test images (lower = more abnormal),
    ``types`` their defect type ('good' for good ones), ``overlays`` the written overlay files
    in test order (or None), ``pixel_masks``/``pixel_maps`` the images of the pixel metrics.
    """
    from sklearn.metrics import precision_recall_curve

    detector = final_estimator(pipe)
    anomaly = -np.asarray(scores, dtype=np.float64)
    types = np.asarray(types)
    is_anomalous = types != "good"
    threshold = -float(detector.offset_)
    labels = labels_from_decision(-anomaly - detector.offset_)  # as predict: NaN -> -1
    model_flags = labels == -1
    items = [ReportItem(Path(p).name, str(p), float(s), int(lab),
                        None if overlays is None else Path(overlays[i]), str(t))
             for i, (p, s, lab, t) in enumerate(zip(test_paths, anomaly, labels, types,
                                                     strict=True))]

    at_model = _confusion(is_anomalous, model_flags)
    precision, recall, cuts = precision_recall_curve(is_anomalous, anomaly)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision[:-1] * recall[:-1] / (precision[:-1] + recall[:-1]))
    best_cut = float(cuts[int(np.argmax(f1))])
    at_best = _confusion(is_anomalous, anomaly >= best_cut)
    points = [(f"model threshold {threshold:.4g}", at_model["fpr"], at_model["recall"]),
              (f"best-F1 threshold {best_cut:.4g}", at_best["fpr"], at_best["recall"])]

    by_type = []
    medians = []
    for kind in ["good", *sorted(set(types.tolist()) - {"good"})]:
        pick = np.flatnonzero(types == kind)
        if pick.size == 0:
            continue
        by_type.append({
            "kind": kind, "n": int(pick.size), "flagged": int(model_flags[pick].sum()),
            "image_auroc": results.get("image_auroc_by_type", {}).get(kind),
            "pixel_auroc": results.get("pixel_auroc_by_type", {}).get(kind),
        })
        median = int(pick[np.argsort(anomaly[pick], kind="stable")[(pick.size - 1) // 2]])
        item = items[median]
        entry = {"kind": kind, "name": item.name, "score": item.score, "label": item.label,
                 "src": None, "alt": f"Median-score overlay of type {kind}: {_alt(item)}"}
        if item.overlay is not None:
            entry["width"], entry["height"] = _image_size(item.overlay)
            entry["src"] = _image_src(folder, item.overlay, embed)
        medians.append(entry)

    aupro_key = f"aupro@{fpr_limit:g}"
    metrics = [("Image AUROC", results["image_auroc"]), ("Pixel AUROC", results["pixel_auroc"]),
               (f"AUPRO up to FPR {fpr_limit:g}", results[aupro_key])]
    evaluation = {
        "metrics": metrics,
        "roc": _roc(is_anomalous, anomaly, points),
        "roc_alt": (f"ROC curve of the image scores: image AUROC "
                    f"{results['image_auroc']:.3f}; the model's threshold flags "
                    f"{at_model['tp']} of {at_model['tp'] + at_model['fn']} defective and "
                    f"{at_model['fp']} of {at_model['fp'] + at_model['tn']} good images"),
        "pro": _pro(pixel_masks, pixel_maps, fpr_limit),
        "pro_alt": (f"Per-region-overlap curve up to a false-positive rate of {fpr_limit:g}: "
                    f"AUPRO {results[aupro_key]:.3f}"),
        "fpr_limit": fpr_limit,
        "by_type": by_type,
        "confusion": [
            {"name": "model threshold", "threshold": threshold, "rule": ">",
             "note": "set from good images only (the model's offset_)", **at_model},
            {"name": "best-F1 threshold", "threshold": best_cut, "rule": "≥",
             "note": "chosen with the test labels: optimistic, for comparison only",
             **at_best},
        ],
        "medians": medians,
        "n_missing_masks": results.get("n_missing_masks", 0),
    }
    n_bad = int(model_flags.sum())
    summary = [("Model", f"fitted in this run on {results['n_train']} good images of "
                         f"{Path(root) / 'train' / 'good'}"),
               ("Test set", f"{len(items)} images of {Path(root) / 'test'}: "
                            f"{int(is_anomalous.sum())} defective, "
                            f"{int((~is_anomalous).sum())} good"),
               *_model_rows(pipe), *_threshold_rows(detector, threshold),
               ("Images", f"{len(items)} scored: {n_bad} flagged (−1 defect), "
                          f"{len(items) - n_bad} passed (+1 good)"),
               ("Time taken", f"{seconds:.1f} s: fit {results['fit_seconds']:.1f} s, scoring "
                              f"{results['ms_per_image']:.0f} ms per image")]
    return write_report(folder, items, title="skpatchcore evaluation report", summary=summary,
                        threshold=threshold, is_anomalous=is_anomalous,
                        colour_scale=colour_scale, evaluation=evaluation, embed=embed)
