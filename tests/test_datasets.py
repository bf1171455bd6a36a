"""Tests of skpatchcore.datasets: synthetic defects and MVTec-layout folders."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skpatchcore.datasets import _generate_defect_images as generate
from skpatchcore.datasets import (
    image_shapes,
    list_images,
    load_mask,
    load_masks,
    load_mvtec,
    make_defect_images,
)

# The shared MTD data set beside the checkout (see /work/shared/datasets/mtd/README.md).
MTD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mtd"

# --------------------------------------------------------------------------------------------
# make_defect_images
# --------------------------------------------------------------------------------------------


def test_shapes_dtypes_and_labels():
    X, y, masks = make_defect_images(5, 3, image_size=32, random_state=0)
    assert X.shape == (8, 32, 32, 3) and X.dtype == np.uint8
    assert y.dtype == np.int64 and y.tolist() == [1] * 5 + [-1] * 3
    assert masks.shape == (8, 32, 32) and masks.dtype == bool
    X, y, masks = make_defect_images(2, 2, image_size=(24, 40), grayscale=True, random_state=0)
    assert X.shape == (4, 24, 40) and masks.shape == (4, 24, 40)
    X, y, masks = make_defect_images(0, 2, image_size=16, random_state=0)
    assert y.tolist() == [-1, -1]


def test_determinism():
    a = make_defect_images(3, 3, image_size=32, random_state=42)
    b = make_defect_images(3, 3, image_size=32, random_state=42)
    c = make_defect_images(3, 3, image_size=32, random_state=np.random.RandomState(42))
    for u, v, w in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(u, v)
        np.testing.assert_array_equal(u, w)
    d = make_defect_images(3, 3, image_size=32, random_state=43)
    assert not np.array_equal(a[0], d[0])


@pytest.mark.parametrize("grayscale", [False, True])
def test_masks_are_exactly_the_changed_pixels(grayscale):
    n_normal, n_anomalous = 4, 24
    X, y, masks, X_clean, kinds = generate(
        n_normal, n_anomalous, image_size=(48, 64), grayscale=grayscale, random_state=0
    )
    public = make_defect_images(
        n_normal, n_anomalous, image_size=(48, 64), grayscale=grayscale, random_state=0
    )
    for u, v in zip((X, y, masks), public, strict=True):
        np.testing.assert_array_equal(u, v)
    diff = np.abs(X.astype(int) - X_clean.astype(int))
    if not grayscale:
        diff = diff.max(axis=-1)
    np.testing.assert_array_equal(diff > 0, masks)
    assert not masks[:n_normal].any()
    assert set(kinds[:n_normal]) == {"none"}
    assert set(kinds[n_normal:]) == {"scratch", "blob", "spot"}
    for i in range(n_normal, n_normal + n_anomalous):
        mask = masks[i]
        assert mask.sum() >= 8, "each defect covers several pixels"
        # Clearly visible: every defect pixel changes by at least 10 grey levels, the mean by
        # far more.
        assert diff[i][mask].min() >= 10 and diff[i][mask].mean() >= 40
        # Fully inside the image, spanning roughly 5-35% of the shorter side.
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        extent = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
        assert 3 <= extent <= 0.35 * 48


def test_normal_images_look_alike():
    X, y, masks = make_defect_images(8, 0, image_size=48, grayscale=True, random_state=1)
    X = X.astype(float)
    assert np.ptp(X.mean(axis=(1, 2))) < 15  # only a small brightness jitter
    assert np.ptp(X.std(axis=(1, 2))) < 5  # the same texture contrast in every image


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 8}, "image_size"),
        ({"image_size": (32, 32, 3)}, "image_size"),
        ({"image_size": "64"}, "image_size"),
        ({"n_normal": -1}, "n_normal"),
        ({"n_anomalous": 1.5}, "n_anomalous"),
        ({"n_normal": 0, "n_anomalous": 0}, "at least 1"),
    ],
)
def test_make_defect_images_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_defect_images(**kwargs)


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode=mode).save(path)


def _mvtec_tree(root):
    """A tiny MVTec AD category: 3 train, 2 good, 2 crack, 1 hole test images."""
    rng = np.random.RandomState(0)
    for name in ("002.png", "000.png", "001.PNG"):
        _save(root / "train" / "good" / name, rng.randint(0, 255, (10, 12, 3), dtype=np.uint8))
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    for name in ("000.png", "001.png"):
        _save(root / "test" / "good" / name, rng.randint(0, 255, (10, 12), dtype=np.uint8))
    _save(root / "test" / "crack" / "000.jpg", rng.randint(0, 255, (8, 6, 3), dtype=np.uint8))
    _save(root / "test" / "crack" / "001.png", rng.randint(0, 255, (10, 12), dtype=np.uint8))
    _save(root / "test" / "hole" / "000.bmp", rng.randint(0, 255, (10, 12), dtype=np.uint8))
    # RGB mask with grey values 0/127/128/255 in its columns, and an 'L' mask.
    rgb = np.zeros((8, 6, 3), dtype=np.uint8)
    rgb[:, 1], rgb[:, 2], rgb[:, 3] = 127, 128, 255
    _save(root / "ground_truth" / "crack" / "000_mask.png", rgb)
    grey = np.zeros((10, 12), dtype=np.uint8)
    grey[2:4, 3:5] = 255
    _save(root / "ground_truth" / "crack" / "001_mask.png", grey)
    _save(root / "ground_truth" / "hole" / "000_mask.png", grey)


def test_list_images(tmp_path):
    _mvtec_tree(tmp_path)
    names = [p.name for p in list_images(tmp_path / "train" / "good")]
    assert names == ["000.png", "001.PNG", "002.png"]
    assert all(isinstance(p, Path) for p in list_images(str(tmp_path / "test" / "crack")))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="empty.*no image"):
        list_images(tmp_path / "empty")


def test_load_mvtec(tmp_path):
    _mvtec_tree(tmp_path / "widget")
    for data in (load_mvtec(tmp_path / "widget"), load_mvtec(tmp_path, category="widget")):
        assert [p.name for p in data.train] == ["000.png", "001.PNG", "002.png"]
        assert [f"{p.parent.name}/{p.name}" for p in data.test] == [
            "crack/000.jpg",
            "crack/001.png",
            "good/000.png",
            "good/001.png",
            "hole/000.bmp",
        ]
        assert data.y_test.dtype == np.int64
        assert data.y_test.tolist() == [-1, -1, 1, 1, -1]
        assert data.defect_type.tolist() == ["crack", "crack", "good", "good", "hole"]
        assert [p and p.name for p in data.mask_paths] == [
            "000_mask.png",
            "001_mask.png",
            None,
            None,
            "000_mask.png",
        ]
        assert data.root == tmp_path / "widget"
    masks = load_masks(data.mask_paths, image_shapes(data.test))
    assert [m.shape for m in masks] == [(8, 6), (10, 12), (10, 12), (10, 12), (10, 12)]
    assert masks[0][:, 2:4].all() and not masks[0][:, :2].any() and not masks[0][:, 4:].any()
    assert masks[1].sum() == 4 and not masks[2].any()


def test_load_mvtec_missing_mask(tmp_path):
    _mvtec_tree(tmp_path)
    (tmp_path / "ground_truth" / "hole" / "000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"000\.bmp.*allow_missing_masks=True"):
        load_mvtec(tmp_path)
    data = load_mvtec(tmp_path, allow_missing_masks=True)
    assert data.mask_paths[-1] is None and data.y_test[-1] == -1
    # A mask named like the image (no _mask suffix) is accepted too.
    _save(tmp_path / "ground_truth" / "hole" / "000.png", np.zeros((10, 12), np.uint8))
    assert load_mvtec(tmp_path).mask_paths[-1].name == "000.png"


def test_load_mvtec_wrong_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mvtec(tmp_path / "missing")
    _mvtec_tree(tmp_path / "widget")
    with pytest.raises(FileNotFoundError, match=r"train.*category="):
        load_mvtec(tmp_path)
    with pytest.raises(FileNotFoundError, match="gadget"):
        load_mvtec(tmp_path, category="gadget")
    for sub in ("good",):
        target = tmp_path / "widget" / "train" / sub
        target.rename(target.with_name("ok"))
    with pytest.raises(FileNotFoundError, match=r"train.good"):
        load_mvtec(tmp_path / "widget")


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------

_LEVELS = np.array([[0, 127, 128, 255]], dtype=np.uint8)
_EXPECTED = np.array([[False, False, True, True]])


def test_load_mask_modes(tmp_path):
    _save(tmp_path / "l.png", _LEVELS)
    _save(tmp_path / "rgb.png", np.repeat(_LEVELS[:, :, None], 3, axis=2))
    Image.fromarray(_LEVELS).convert("P").save(tmp_path / "p.png")
    Image.fromarray(_LEVELS.astype(np.uint16) * 257).save(tmp_path / "i16.png")
    Image.fromarray(_LEVELS > 127).save(tmp_path / "one.png")
    for name in ("l.png", "rgb.png", "p.png", "i16.png", "one.png"):
        mask = load_mask(tmp_path / name)
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, _EXPECTED, err_msg=name)
    with Image.open(tmp_path / "i16.png") as image:
        assert image.mode.startswith("I")
    # Colour masks use their largest channel: pure red marks a defect.
    red = np.zeros((1, 2, 3), dtype=np.uint8)
    red[0, 1, 0] = 200
    _save(tmp_path / "red.png", red)
    np.testing.assert_array_equal(load_mask(tmp_path / "red.png"), [[False, True]])


def test_load_mask_resize_and_none(tmp_path):
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2, :2] = 255
    _save(tmp_path / "m.png", mask)
    big = load_mask(tmp_path / "m.png", shape=(8, 12))
    assert big.shape == (8, 12) and big[:4, :6].all() and not big[4:].any()
    assert not big[:, 6:].any()
    np.testing.assert_array_equal(load_mask(None, shape=(2, 3)), np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="shape"):
        load_mask(None)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_mask(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="shape"):
        load_mask(tmp_path / "m.png", shape=(0, 3))


def test_load_masks(tmp_path):
    _save(tmp_path / "l.png", _LEVELS)
    masks = load_masks([tmp_path / "l.png", None], (2, 4))
    assert [m.shape for m in masks] == [(2, 4), (2, 4)] and not masks[1].any()
    masks = load_masks([tmp_path / "l.png", None], [(1, 4), (3, 3)])
    np.testing.assert_array_equal(masks[0], _EXPECTED)
    assert masks[1].shape == (3, 3)
    assert load_masks([tmp_path / "l.png"])[0].shape == (1, 4)
    with pytest.raises(ValueError, match=r"mask_paths\[1\] is None"):
        load_masks([tmp_path / "l.png", None])
    with pytest.raises(ValueError, match="shapes has 1 entries"):
        load_masks([None, None], [(2, 2)])


@pytest.mark.skipif(not MTD.is_dir(), reason="MTD data set not available")
def test_mtd_counts():
    data = load_mvtec(MTD)
    assert len(data.train) == 634
    assert len(data.test) == 710
    assert int((data.y_test == -1).sum()) == 392
    assert set(data.defect_type) == {"blowhole", "break", "crack", "fray", "good", "uneven"}
    is_good = data.defect_type == "good"
    assert [p is None for p in data.mask_paths] == is_good.tolist()
    # Masks are read at their images' sizes.
    anomalous = np.flatnonzero(data.y_test == -1)[:3]
    shapes = image_shapes([data.test[i] for i in anomalous])
    masks = load_masks([data.mask_paths[i] for i in anomalous], shapes)
    assert all(m.shape == s and m.any() for m, s in zip(masks, shapes, strict=True))
