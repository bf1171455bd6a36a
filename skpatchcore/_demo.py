"""``skpatchcore demo``: the main job end to end on a built-in, generated example."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import make_defect_images
from .evaluate import evaluate
from .persistence import save_model

__all__ = ["run_demo", "write_demo_dataset"]


def write_demo_dataset(root, random_state=0):
    """Write a small MVTec-layout dataset of textured parts with drawn defects.

    40 good training images, 20 good and 20 defective test images (192 x 256 px) with exact
    masks. Deterministic for a given random_state; nothing is downloaded.
    """
    root = Path(root)
    X, y, masks = make_defect_images(60, 20, image_size=(192, 256), random_state=random_state)
    folders = {"train": root / "train" / "good", "good": root / "test" / "good",
               "defect": root / "test" / "defect", "gt": root / "ground_truth" / "defect"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(60):
        target = folders["train"] if i < 40 else folders["good"]
        Image.fromarray(X[i]).save(target / f"part_{i:03d}.png")
    for i in range(60, 80):
        Image.fromarray(X[i]).save(folders["defect"] / f"part_{i:03d}.png")
        Image.fromarray(masks[i].astype(np.uint8) * 255).save(
            folders["gt"] / f"part_{i:03d}_mask.png")
    return root


def run_demo(out, verbose=True):
    """Generate the example, fit on good parts, evaluate, save the model, the heat maps and
    the HTML report (``out/report.html``)."""
    out = Path(out)
    data = write_demo_dataset(out / "data")
    results, pipe = evaluate(
        data, image_size=256, sampling_ratio=0.1, random_state=0, verbose=verbose,
        report=out, return_model=True,
    )
    model_path = save_model(pipe, out / "model.npz")
    test = sorted((data / "test").glob("*/*.png"))
    scores = pipe.score_samples(test)
    labels = np.where(scores - pipe[-1].offset_ < 0, -1, 1)
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "decision", "label"])
        for p, s, lab in zip(test, scores, labels, strict=True):
            writer.writerow([str(p), f"{s:.6f}", f"{s - pipe[-1].offset_:.6f}", int(lab)])
    truth = np.array([p.parent.name == "defect" for p in test])
    caught = int(((labels == -1) & truth).sum())
    false_alarms = int(((labels == -1) & ~truth).sum())
    print(f"""
skpatchcore demo: fitted on {results['n_train']} good parts in {results['fit_seconds']:.1f} s,
scored {results['n_test']} test parts ({results['ms_per_image']:.0f} ms each).

  image AUROC  {results['image_auroc']:.3f}   how well scores rank defective above good parts
  pixel AUROC  {results['pixel_auroc']:.3f}   the same for every pixel of the heat maps
  AUPRO@0.3    {results['aupro@0.3']:.3f}   overlap with each true defect region, 1 = perfect

At the model's threshold: {caught} of {int(truth.sum())} defective parts flagged, \
{false_alarms} false alarms on {int((~truth).sum())} good parts.

  {out / 'data'}        the generated images (train/good, test/, ground_truth/)
  {model_path}   the fitted model (safe format; skpatchcore predict {model_path} IMAGES --out DIR)
  {out / 'scores.csv'}  per part: score (lower = more abnormal), decision, label
                          (+1 good, -1 defect)
  {out / 'overlays'}    heat maps: image | anomaly colours ('turbo': blue = low, red =
                          high), white = predicted region, green = true defect

The report, with all of this on one page (open it in a browser):
{(out / 'report.html').resolve()}
""")
    return results
