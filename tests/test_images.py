import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from skpatchcore._images import check_images


def _all(images):
    return [images[i] for i in range(len(images))]


def test_forms_give_identical_pixels(tmp_path, rng_images):
    X = rng_images
    paths = []
    for i, x in enumerate(X):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(x).save(p)
        paths.append(p)
    ref = _all(check_images(X))
    forms = [
        [str(p) for p in paths],
        paths,
        str(tmp_path),
        [Image.fromarray(x) for x in X],
        X.astype(np.float32) / 255.0,
        X.astype(np.float64) / 255.0,
        list(X),
        torch.from_numpy(X).permute(0, 3, 1, 2),
        torch.from_numpy(X).permute(0, 3, 1, 2).float() / 255.0,
        np.concatenate([X, np.full(X.shape[:3] + (1,), 7, np.uint8)], axis=-1),  # RGBA
    ]
    for form in forms:
        got = _all(check_images(form))
        assert len(got) == len(ref)
        for a, b in zip(got, ref, strict=True):
            assert a.dtype == torch.float32 and a.shape == (3, 40, 56)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = (np.arange(12 * 10).reshape(12, 10) % 256).astype(np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    for form in (g[None], [g], [Image.fromarray(g)], [tmp_path / "g.png"], g[None, ..., None]):
        t = check_images(form)[0]
        assert t.shape == (3, 12, 10)
        torch.testing.assert_close(t[0], torch.from_numpy(g).float() / 255)
        torch.testing.assert_close(t[0], t[2])


def test_sixteen_bit(tmp_path):
    a = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "a.png")
    t = check_images([tmp_path / "a.png"])[0]
    np.testing.assert_allclose(t[0].numpy(), a / 65535.0, atol=1e-6)


def test_sizes_without_decoding(tmp_path):
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(tmp_path / "a.png")
    imgs = check_images([tmp_path / "a.png", np.zeros((5, 7, 3), np.uint8)])
    assert imgs.sizes() == [(30, 20), (5, 7)]


@pytest.mark.parametrize(
    ("X", "exc", "match"),
    [
        ([], ValueError, "empty"),
        (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "empty"),
        (np.zeros((8, 8)), ValueError, r"shape \(n, H, W\)"),
        (np.zeros((2, 8, 8, 5), np.uint8), ValueError, "C in"),
        (np.zeros((64, 64, 3), np.uint8), ValueError, "one RGB image"),
        (np.full((2, 8, 8), np.nan), ValueError, r"X\[0\].*NaN"),
        (np.full((2, 8, 8), 2.0), ValueError, r"\[0, 1\]"),
        (np.zeros((2, 8, 8), np.int32), ValueError, "dtype int32"),
        ([1, 2], ValueError, r"X\[0\] has unsupported type int"),
        (torch.zeros(2, 5, 8, 8), ValueError, r"\(n, C, H, W\)"),
        (42, ValueError, "not a supported image collection"),
        ("/definitely/not/here", FileNotFoundError, "no such file"),
        (["/definitely/not/here.png"], FileNotFoundError, r"X\[0\].*here.png"),
    ],
)
def test_bad_input_messages(X, exc, match):
    with pytest.raises(exc, match=match):
        _all(check_images(X))


def test_corrupt_and_empty_files_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"broken\.png.*not a readable image"):
        _all(check_images([bad]))
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated.png"):
        _all(check_images([good, truncated]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no image file"):
        check_images(tmp_path / "empty")


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    gray=st.booleans(),
)
def test_property_uint8_float_list_tensor_agree(h, w, seed, gray):
    rng = np.random.RandomState(seed)
    shape = (2, h, w) if gray else (2, h, w, 3)
    X = rng.randint(0, 256, size=shape).astype(np.uint8)
    ref = _all(check_images(X))
    tensor = torch.from_numpy(X if gray else X.transpose(0, 3, 1, 2).copy())
    for form in (X / 255.0, list(X), [Image.fromarray(x) for x in X], tensor):
        for a, b in zip(_all(check_images(form)), ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
