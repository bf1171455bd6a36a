import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from skpatchcore import _images
from skpatchcore._images import check_images, list_images, set_max_image_pixels

ORIENTATION = 0x0112
T = Image.Transpose
# Stored pixels for each EXIF orientation: the upright image transformed the opposite way, so
# that applying the tag gives the upright image back.
STORED_AS = {
    2: T.FLIP_LEFT_RIGHT,
    3: T.ROTATE_180,
    4: T.FLIP_TOP_BOTTOM,
    5: T.TRANSPOSE,
    6: T.ROTATE_90,
    7: T.TRANSVERSE,
    8: T.ROTATE_270,
}


def _all(images):
    return [images[i] for i in range(len(images))]


def _save_oriented(upright, path, tag, **kwargs):
    """Save ``upright`` as stored pixels plus an EXIF Orientation tag that undoes them."""
    stored = upright.transpose(STORED_AS[tag])
    exif = Image.Exif()
    exif[ORIENTATION] = tag
    stored.save(path, exif=exif, **kwargs)
    return path


@pytest.fixture
def default_limit():
    """Run with no set_max_image_pixels override and restore the previous setting after."""
    previous = set_max_image_pixels("default")
    yield
    set_max_image_pixels(previous)


# ------------------------------------------------------------------------ container forms
def test_forms_give_identical_pixels(tmp_path, rng_images):
    X = rng_images
    paths = []
    for i, x in enumerate(X):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(x).save(p)
        paths.append(p)
    ref = _all(check_images(X))
    chw = torch.from_numpy(X).permute(0, 3, 1, 2)
    forms = [
        [str(p) for p in paths],
        paths,
        tuple(paths),
        np.array([str(p) for p in paths]),
        str(tmp_path),
        [Image.fromarray(x) for x in X],
        [Image.open(p) for p in paths],
        X.astype(np.float32) / 255.0,
        X.astype(np.float64) / 255.0,
        list(X),
        chw,
        chw.float() / 255.0,
        list(chw),
        [paths[0], Image.fromarray(X[1]), chw[2]],  # one image per item, forms mixed
        np.concatenate([X, np.full(X.shape[:3] + (1,), 7, np.uint8)], axis=-1),  # RGBA
    ]
    for form in forms:
        got = _all(check_images(form))
        assert len(got) == len(ref)
        for a, b in zip(got, ref, strict=True):
            assert a.dtype == torch.float32 and a.shape == (3, 40, 56)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
        assert check_images(form).sizes() == [(40, 56)] * 3


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = (np.arange(12 * 10).reshape(12, 10) % 256).astype(np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    tg = torch.from_numpy(g)
    forms = (g[None, ..., None], [g], [g[..., None]], [Image.fromarray(g)], [tmp_path / "g.png"],
             tg[None, None], [tg], [tg[None]])
    for form in forms:
        images = check_images(form)
        t = images[0]
        assert len(images) == 1 and t.shape == (3, 12, 10)
        assert images.sizes() == [(12, 10)]
        torch.testing.assert_close(t[0], torch.from_numpy(g).float() / 255)
        torch.testing.assert_close(t[0], t[2])


def test_sixteen_bit(tmp_path):
    a = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "a.png")
    t = check_images([tmp_path / "a.png"])[0]
    np.testing.assert_allclose(t[0].numpy(), a / 65535.0, atol=1e-6)
    # Big-endian 16-bit (PIL mode I;16B, numpy '>u2') gives the same values.
    big_endian_pil = Image.frombytes("I;16B", (8, 8), a.astype(">u2").tobytes())
    for form in ([big_endian_pil], [a.astype(">u2")], a.astype(">u2")[None, ..., None]):
        torch.testing.assert_close(check_images(form)[0], t, rtol=0, atol=0)


def test_sizes_without_decoding(tmp_path):
    Image.fromarray(np.zeros((30, 20), np.uint8)).save(tmp_path / "a.png")
    imgs = check_images([tmp_path / "a.png", np.zeros((5, 7, 3), np.uint8),
                         torch.zeros(3, 6, 9), torch.zeros(4, 11)])
    assert imgs.sizes() == [(30, 20), (5, 7), (6, 9), (4, 11)]
    assert [tuple(t.shape[1:]) for t in _all(imgs)] == imgs.sizes()
    # Only the header is read: a file whose pixel data is cut off still has a size.
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(30, 20) * 255).astype(np.uint8)).save(tmp_path / "b.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes((tmp_path / "b.png").read_bytes()[:200])
    assert check_images([cut]).sizes() == [(30, 20)]
    with pytest.raises(ValueError, match=r"cut\.png.*not a readable image"):
        check_images([cut])[0]


# ------------------------------------------------------------------ one image or a batch
@pytest.mark.parametrize(
    "X",
    [
        np.zeros((8, 8, 3), np.uint8),  # one (H, W, C) image
        np.zeros((3, 16, 16), np.uint8),  # one channels-first image
        np.zeros((5, 16, 16), np.uint8),  # five grayscale images, or one 5 x 16 RGBA-less image
        np.zeros((64, 64, 3), np.float32),
    ],
)
def test_three_d_numpy_arrays_are_refused_as_ambiguous(X):
    with pytest.raises(ValueError, match="3-D numpy array.*ambiguous") as info:
        check_images(X)
    message = str(info.value)
    assert f"shape {X.shape}" in message
    assert "pass [X]" in message and "X[None]" in message
    assert "X[..., None]" in message and "(n, H, W, 1)" in message


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 8, 8), (5, 8, 8), (8, 8, 3)])
def test_three_d_torch_tensors_are_refused_as_ambiguous(shape):
    with pytest.raises(ValueError, match="3-D torch tensor.*ambiguous") as info:
        check_images(torch.zeros(shape))
    message = str(info.value)
    assert "pass [X] or X[None]" in message
    assert "X[:, None]" in message and "(n, 1, H, W)" in message


def test_the_suggested_fixes_for_3d_inputs_work():
    rng = np.random.RandomState(0)
    hwc = (rng.rand(8, 9, 3) * 255).astype(np.uint8)
    ref = check_images([hwc])[0]
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    for form in ([hwc], hwc[None], [chw], chw[None]):
        got = _all(check_images(form))
        assert len(got) == 1
        torch.testing.assert_close(got[0], ref, rtol=0, atol=0)
    gray = (rng.rand(5, 8, 9) * 255).astype(np.uint8)
    for form in (gray[..., None], torch.from_numpy(gray)[:, None], list(gray)):
        got = _all(check_images(form))
        assert len(got) == 5
        for g, t in zip(gray, got, strict=True):
            torch.testing.assert_close(t, torch.from_numpy(g).float().div(255).expand(3, -1, -1))


@pytest.mark.parametrize(
    ("X", "exc", "match"),
    [
        ([], ValueError, "empty"),
        (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "empty"),
        (np.zeros((8, 8)), ValueError, r"2-D numpy array of shape \(8, 8\).*pass \[X\]"),
        (np.zeros((2, 8, 8, 5), np.uint8), ValueError, "C in"),
        (np.zeros((2, 3, 8, 8), np.uint8), ValueError, r"channels last: pass X\.transpose"),
        (torch.zeros(2, 8, 8, 3), ValueError, r"channels first: pass X\.permute\(0, 3, 1, 2\)"),
        (np.zeros((2, 0, 8, 3), np.uint8), ValueError, "has no pixels"),
        (torch.zeros(2, 3, 8, 0), ValueError, "has no pixels"),
        (np.full((2, 8, 8, 1), np.nan), ValueError, r"X\[0\].*NaN"),
        (torch.full((2, 1, 8, 8), float("inf")), ValueError, r"X\[0\].*NaN or infinite"),
        (np.full((2, 8, 8, 1), 2.0), ValueError, r"\[0, 1\]"),
        (np.zeros((2, 8, 8, 1), np.int32), ValueError, "dtype int32"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.int64), ValueError, "dtype int64"),
        (np.zeros((2, 2), dtype=object), ValueError, "must be 1-D"),
        ([1, 2], ValueError, r"X\[0\] has unsupported type int"),
        ([np.zeros((4, 4), np.int64)], ValueError, r"X\[0\]: pixel dtype int64"),
        ([np.zeros((4, 4)), np.zeros((3, 8, 8))], ValueError,
         r"X\[1\].*np\.moveaxis\(x, 0, -1\)"),
        ([torch.zeros(8, 8, 3)], ValueError, r"X\[0\].*x\.permute\(2, 0, 1\)"),
        ([np.zeros((2, 8, 8, 3), np.uint8)], ValueError, "pass a batch as X itself"),
        ([np.zeros((0, 5), np.uint8)], ValueError, r"X\[0\].*has no pixels"),
        ([Image.new("L", (0, 5))], ValueError, r"X\[0\].*has no pixels"),
        (torch.zeros(2, 5, 8, 8), ValueError, r"\(n, C, H, W\)"),
        (42, ValueError, "not a supported image collection"),
        ("/definitely/not/here", FileNotFoundError, "no such file"),
        (["/definitely/not/here.png"], FileNotFoundError, r"X\[0\].*here.png"),
    ],
)
def test_bad_input_messages(X, exc, match):
    with pytest.raises(exc, match=match):
        _all(check_images(X))


def test_directory_inside_a_list_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"X\[0\].*is a directory.*pass a directory as X itself"):
        check_images([tmp_path])


# ----------------------------------------------------------------------- broken files
def test_corrupt_and_empty_files_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"broken\.png.*not a readable image"):
        _all(check_images([bad]))
    with pytest.raises(ValueError, match=r"broken\.png.*not a readable image"):
        check_images([bad]).sizes()
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated.png"):
        _all(check_images([good, truncated]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no image file"):
        check_images(tmp_path / "empty")


def test_truncated_jpeg_and_lazy_pil_image(tmp_path):
    rng = np.random.RandomState(0)
    full = tmp_path / "full.jpg"
    Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8)).save(full)
    half = tmp_path / "half.jpg"
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"X\[0\] \('.*half\.jpg'\).*not a readable image"):
        check_images([half])[0]
    # A lazily opened PIL image of the same file fails at decoding with a message too.
    with pytest.raises(ValueError, match=r"X\[0\]: the PIL image could not be decoded"):
        check_images([Image.open(half)])[0]


# --------------------------------------------------------------------------- PIL modes
def test_pil_modes_become_the_expected_rgb(tmp_path):
    rng = np.random.RandomState(0)
    rgb = Image.fromarray((rng.rand(6, 5, 3) * 255).astype(np.uint8))
    palette = rgb.convert("P")
    with_alpha = palette.copy()
    with_alpha.info["transparency"] = bytes(range(256))  # Pillow warns converting this to RGB
    with_alpha.save(tmp_path / "p.png")
    cases = {
        "RGB": (rgb, np.asarray(rgb)),
        "RGBA": (rgb.convert("RGBA"), np.asarray(rgb)),
        "RGBX": (rgb.convert("RGBX"), np.asarray(rgb)),
        "P": (palette, np.asarray(palette.convert("RGB"))),
        "P+transparency": (with_alpha, np.asarray(palette.convert("RGB"))),
        "P file": (Image.open(tmp_path / "p.png"), np.asarray(palette.convert("RGB"))),
        "PA": (palette.convert("PA"), np.asarray(palette.convert("RGB"))),
        "LA": (rgb.convert("LA"), np.repeat(np.asarray(rgb.convert("L"))[..., None], 3, -1)),
        "1": (rgb.convert("1"), np.repeat(np.asarray(rgb.convert("1").convert("L"))[..., None],
                                          3, -1)),
        "CMYK": (rgb.convert("CMYK"), np.asarray(rgb.convert("CMYK").convert("RGB"))),
        "YCbCr": (rgb.convert("YCbCr"), np.asarray(rgb.convert("YCbCr").convert("RGB"))),
    }
    for name, (img, expected) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = check_images([img])[0]
        want = torch.from_numpy(expected.astype(np.float32) / 255).permute(2, 0, 1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7, msg=name)


def test_float_and_integer_pil_modes():
    f = (np.arange(20, dtype=np.float32).reshape(4, 5) / 19)
    from_pil = check_images([Image.fromarray(f)])[0]  # mode F follows the float-array rules
    torch.testing.assert_close(from_pil, check_images([f])[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"X\[0\]: float images must lie in \[0, 1\]"):
        check_images([Image.fromarray(f * 255)])[0]
    with pytest.raises(ValueError, match=r"mode 'I' \(integer pixels, values 0\.\.19\).*'I;16'"):
        check_images([Image.fromarray(np.arange(20, dtype=np.int32).reshape(4, 5))])[0]


def test_bfloat16_tensor():
    x = torch.rand(2, 3, 4, 5).to(torch.bfloat16)
    for a, b in zip(_all(check_images(x)), _all(check_images(x.float())), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------ EXIF orientation
def test_exif_orientation_png_all_tags(tmp_path):
    rng = np.random.RandomState(0)
    upright = Image.fromarray((rng.rand(12, 20, 3) * 255).astype(np.uint8))
    upright.save(tmp_path / "upright.png")
    paths = [tmp_path / "upright.png"]
    paths += [_save_oriented(upright, tmp_path / f"tag{tag}.png", tag) for tag in STORED_AS]
    # The stored pixels really are rotated: tags 5..8 store a 20 x 12 image.
    with Image.open(paths[6]) as stored:  # tag 6
        assert stored.size == (12, 20)
    ref = torch.from_numpy(np.asarray(upright, np.float32) / 255).permute(2, 0, 1)
    for form in (paths, [Image.open(p) for p in paths]):
        images = check_images(form)
        assert images.sizes() == [(12, 20)] * len(paths)
        for path, t in zip(paths, _all(images), strict=True):
            torch.testing.assert_close(t, ref, rtol=0, atol=0, msg=str(path))


def test_exif_orientation_jpeg_rotations(tmp_path):
    # Constant 8 x 8 blocks of a grayscale image decode exactly, whatever the rotation.
    rng = np.random.RandomState(0)
    blocks = rng.randint(0, 256, size=(4, 6)).astype(np.uint8)
    upright = Image.fromarray(np.kron(blocks, np.ones((8, 8), np.uint8)))
    upright.save(tmp_path / "upright.jpg")
    paths = [tmp_path / "upright.jpg"]
    paths += [_save_oriented(upright, tmp_path / f"tag{tag}.jpg", tag) for tag in (3, 6, 8)]
    images = check_images(paths)
    assert images.sizes() == [(32, 48)] * 4
    ref = images[0]
    torch.testing.assert_close(ref[0], torch.from_numpy(np.array(upright)).float() / 255)
    for t in _all(images)[1:]:
        torch.testing.assert_close(t, ref, rtol=0, atol=0)


def test_exif_orientation_tiff_is_applied_once(tmp_path):
    # Pillow's TIFF reader applies the tag itself; it must not be applied a second time.
    rng = np.random.RandomState(1)
    upright = Image.fromarray((rng.rand(12, 20, 3) * 255).astype(np.uint8))
    paths = [_save_oriented(upright, tmp_path / f"tag{tag}.tif", tag) for tag in (3, 6, 8)]
    ref = torch.from_numpy(np.asarray(upright, np.float32) / 255).permute(2, 0, 1)
    for form in (paths, [Image.open(p) for p in paths]):
        images = check_images(form)
        assert images.sizes() == [(12, 20)] * 3
        for t in _all(images):
            torch.testing.assert_close(t, ref, rtol=0, atol=0)


def test_exif_orientation_sizes_read_the_header_only(tmp_path):
    rng = np.random.RandomState(0)
    upright = Image.fromarray((rng.rand(30, 20) * 255).astype(np.uint8))
    full = _save_oriented(upright, tmp_path / "full.png", 6)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:300])  # EXIF kept, pixel data cut off
    images = check_images([cut])
    assert images.sizes() == [(30, 20)]
    with pytest.raises(ValueError, match="not a readable image"):
        images[0]


def test_exif_transposed_pil_image_is_not_rotated_again(tmp_path):
    from PIL import ImageOps

    rng = np.random.RandomState(0)
    upright = Image.fromarray((rng.rand(9, 14, 3) * 255).astype(np.uint8))
    path = _save_oriented(upright, tmp_path / "r.png", 8)
    done = ImageOps.exif_transpose(Image.open(path))
    images = check_images([done, path])
    assert images.sizes() == [(9, 14), (9, 14)]
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)


# ----------------------------------------------------------------------- pixel limit
def _png(path, height, width):
    Image.fromarray(np.zeros((height, width), np.uint8)).save(path)
    return path


def test_set_max_image_pixels(tmp_path, default_limit):
    big, small = _png(tmp_path / "big.png", 20, 20), _png(tmp_path / "small.png", 10, 10)
    pil_limit = Image.MAX_IMAGE_PIXELS
    assert set_max_image_pixels(100) == "default"
    images = check_images([small, big])
    assert images[0].shape == (3, 10, 10)  # exactly at the limit
    with pytest.raises(ValueError) as info:
        images[1]
    message = str(info.value)
    assert "big.png" in message and "400 pixels" in message and "limit of 100 pixels" in message
    assert "from set_max_image_pixels" in message
    assert "set_max_image_pixels(n)" in message and "SKPATCHCORE_MAX_IMAGE_PIXELS" in message
    assert images.sizes() == [(10, 10), (20, 20)]  # reading a header decodes nothing
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # Pillow's own setting is left alone
    assert set_max_image_pixels(None) == 100
    assert images[1].shape == (3, 20, 20)


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "none", "10"])
def test_set_max_image_pixels_rejects_bad_values(bad, default_limit):
    with pytest.raises(ValueError, match=r"set_max_image_pixels\(n\): n must be a positive int"):
        set_max_image_pixels(bad)
    assert _images._max_pixels_setting == "default"


def test_max_image_pixels_environment_variable(tmp_path, monkeypatch, default_limit):
    big = _png(tmp_path / "big.png", 20, 20)
    monkeypatch.setenv("SKPATCHCORE_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(ValueError, match=r"big\.png.*400 pixels.*limit of 100 pixels \(from "
                                         r"SKPATCHCORE_MAX_IMAGE_PIXELS\)"):
        check_images([big])[0]
    set_max_image_pixels(None)  # the function overrides the variable
    assert check_images([big])[0].shape == (3, 20, 20)
    set_max_image_pixels("default")  # and the variable applies again
    with pytest.raises(ValueError, match="limit of 100 pixels"):
        check_images([big])[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for no_limit in ("0", "none", " None "):
        monkeypatch.setenv("SKPATCHCORE_MAX_IMAGE_PIXELS", no_limit)
        assert check_images([big])[0].shape == (3, 20, 20)
    monkeypatch.setenv("SKPATCHCORE_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="SKPATCHCORE_MAX_IMAGE_PIXELS='lots' is not a pixel "
                                         "limit.*0 or 'none' for no limit"):
        check_images([big])[0]


def test_max_image_pixels_default_is_pillows_limit(tmp_path, monkeypatch, default_limit):
    monkeypatch.delenv("SKPATCHCORE_MAX_IMAGE_PIXELS", raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    # 150 pixels: Pillow would only warn; 400 pixels: Pillow would raise its own error.
    for height, width in ((10, 15), (20, 20)):
        path = _png(tmp_path / f"{height}x{width}.png", height, width)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no DecompressionBombWarning leaks out
            with pytest.raises(ValueError, match=rf"{height * width} pixels.*limit of 100 pixels "
                                                 r"\(from Pillow's PIL\.Image\.MAX_IMAGE_PIXELS"):
                check_images([path])[0]
            assert check_images([path]).sizes() == [(height, width)]
        assert Image.MAX_IMAGE_PIXELS == 100
    assert check_images([_png(tmp_path / "ok.png", 10, 10)])[0].shape == (3, 10, 10)


# ---------------------------------------------------------------------------- folders
def test_folder_with_images_only_in_subfolders_names_them(tmp_path):
    root = tmp_path / "root"
    for sub in ("good", "bad/scratch", "bad/scratch", ".thumbnails"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _png(root / "good" / "a.png", 4, 4)
    _png(root / "good" / "b.png", 4, 4)
    _png(root / "bad" / "scratch" / "c.png", 4, 4)
    _png(root / ".thumbnails" / "t.png", 4, 4)
    (root / "notes.txt").write_text("x")
    for call in (list_images, check_images):
        with pytest.raises(ValueError) as info:
            call(root)
        message = str(info.value)
        assert "contains no image file at its top level" in message
        assert "'bad/scratch' (1 image), 'good' (2 images)" in message
        assert ".thumbnails" not in message
        assert f"Pass such a sub-folder (e.g. {str(root / 'bad/scratch')!r})" in message
    assert [p.name for p in list_images(root / "good")] == ["a.png", "b.png"]


def test_folder_with_top_images_and_subfolders_warns(tmp_path):
    _png(tmp_path / "top.png", 4, 4)
    (tmp_path / "masks").mkdir()
    _png(tmp_path / "masks" / "m1.png", 4, 4)
    _png(tmp_path / "masks" / "m2.png", 4, 4)
    with pytest.warns(UserWarning, match=r"read the 1 image file\(s\) at its top level and "
                                         r"skipped 2 image file\(s\) in 1 sub-folder\(s\) "
                                         r"\('masks' \(2 images\)\)") as record:
        images = check_images(tmp_path)
    assert len(record) == 1
    assert len(images) == 1 and images.name(0) == f"X[0] ({os.fspath(tmp_path / 'top.png')!r})"


def test_folder_without_nested_images_does_not_warn(tmp_path):
    _png(tmp_path / "top.png", 4, 4)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [p.name for p in list_images(tmp_path)] == ["top.png"]


# ---------------------------------------------------------------------------- property
@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    gray=st.booleans(),
)
def test_property_uint8_float_list_tensor_agree(h, w, seed, gray):
    rng = np.random.RandomState(seed)
    shape = (2, h, w, 1) if gray else (2, h, w, 3)
    X = rng.randint(0, 256, size=shape).astype(np.uint8)
    ref = _all(check_images(X))
    tensor = torch.from_numpy(X.transpose(0, 3, 1, 2).copy())
    pil = [Image.fromarray(x[..., 0] if gray else x) for x in X]
    for form in (X / 255.0, list(X), pil, tensor, list(tensor)):
        for a, b in zip(_all(check_images(form)), ref, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------- large images
def _as_before(x):
    """How a uint8 image (H, W, 3) was decoded before shrinking existed."""
    return torch.from_numpy(x).to(torch.float32).div_(255.0).permute(2, 0, 1).contiguous()


def _block_means(x, f):
    """Reference box filter: mean of each f x f block (partial blocks at the bottom and
    right), rounded half up for integers."""
    H, W = x.shape[:2]
    out = np.empty((-(-H // f), -(-W // f)) + x.shape[2:], dtype=np.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            block = x[i * f : (i + 1) * f, j * f : (j + 1) * f].astype(np.float64)
            out[i, j] = block.reshape((-1,) + x.shape[2:]).mean(axis=0)
    return out if x.dtype.kind == "f" else np.floor(out + 0.5).astype(x.dtype)


def test_normal_images_are_decoded_bit_for_bit_as_before(tmp_path):
    """Images under twice the frame (every image of the development sets: up to ~630 px
    against 320) are never shrunk: decoding with the geometry is the decoding of before."""
    from skpatchcore._geometry import Geometry

    g = Geometry(320, "letterbox")
    rng = np.random.RandomState(0)
    for h, w in [(630, 630), (630, 400), (256, 256), (1279, 1279), (700, 1279), (20, 1000)]:
        assert g.reduction_factor((h, w)) == 1
        x = (rng.rand(h, w, 3) * 255).astype(np.uint8)
        Image.fromarray(x).save(tmp_path / "x.png")
        _save_oriented(Image.fromarray(x), tmp_path / "x6.png", 6)
        expected = _as_before(x)
        for form in ([tmp_path / "x.png"], [tmp_path / "x6.png"], [Image.fromarray(x)], x[None],
                     torch.from_numpy(x).permute(2, 0, 1)[None]):
            images = check_images(form)
            assert torch.equal(images.decode(0, g), expected)
            assert torch.equal(images.for_geometry(g)[0], expected)
    # other pixel types too: the same tensor with and without the geometry
    gray16 = (rng.rand(500, 300) * 65535).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    for form in ([tmp_path / "g16.png"], [gray16], [gray16.astype(np.float32) / 65535]):
        images = check_images(form)
        assert torch.equal(images.decode(0, g), images[0])


def test_large_images_are_shrunk_alike_in_every_form(tmp_path):
    from skpatchcore._geometry import Geometry

    g = Geometry(16, "letterbox")
    rng = np.random.RandomState(1)
    x = (rng.rand(203, 151, 3) * 255).astype(np.uint8)
    f = g.reduction_factor((203, 151))
    assert f == 6  # 34 x 26 pixels, at least twice their 16 x 12 place in the frame
    Image.fromarray(x).save(tmp_path / "x.png")
    for tag in (3, 6, 8):
        _save_oriented(Image.fromarray(x), tmp_path / f"x{tag}.png", tag)
    chw = torch.from_numpy(x).permute(2, 0, 1)
    forms = [[tmp_path / "x.png"], [tmp_path / f"x{3}.png"], [tmp_path / "x6.png"],
             [tmp_path / "x8.png"], [Image.fromarray(x)], x[None], [x], chw[None], [chw],
             [Image.open(tmp_path / "x6.png")],
             np.concatenate([x, np.full(x.shape[:2] + (1,), 9, np.uint8)], -1)[None]]
    expected = _as_before(_block_means(x, f))
    assert tuple(expected.shape) == (3, 34, 26)
    for form in forms:
        images = check_images(form)
        assert images.sizes() == [(203, 151)]  # the original size: maps come back to it
        assert torch.equal(images.decode(0, g), expected)
        assert torch.equal(images.for_geometry(g)[0], expected)
    # the shrunk image lands exactly where the original does
    from skpatchcore._geometry import frame_geometry

    assert frame_geometry((34, 26), g.frame, "letterbox") == frame_geometry(
        (203, 151), g.frame, "letterbox")


@pytest.mark.parametrize("kind", ["uint8 rgb", "uint8 gray", "uint16", "float32", "float64"])
def test_shrink_is_a_box_filter_in_the_pixel_type(kind, monkeypatch):
    from skpatchcore._geometry import Geometry

    rng = np.random.RandomState(2)
    shape = (157, 211) if kind in ("uint8 gray", "uint16") else (157, 211, 3)
    x = {"uint8 rgb": lambda: (rng.rand(*shape) * 255).astype(np.uint8),
         "uint8 gray": lambda: (rng.rand(*shape) * 255).astype(np.uint8),
         "uint16": lambda: (rng.rand(*shape) * 65535).astype(np.uint16),
         "float32": lambda: rng.rand(*shape).astype(np.float32),
         "float64": lambda: rng.rand(*shape)}[kind]()
    g = Geometry(8, "stretch")
    f = g.reduction_factor(shape[:2])
    assert f == 9 and 157 % f and 211 % f  # partial blocks at the bottom and the right
    ref = _block_means(x, f)
    whole = check_images([x]).decode(0, g)
    monkeypatch.setattr(_images, "_BAND_PIXELS", 500)  # bands of 9 rows: same values
    banded = check_images([x]).decode(0, g)
    assert torch.equal(whole, banded)
    expected = check_images([ref.astype(np.float32) if x.dtype.kind == "f" else ref])[0]
    if x.dtype.kind == "f":
        torch.testing.assert_close(whole, expected, rtol=0, atol=1e-7)
    else:
        assert torch.equal(whole, expected)


def test_shrinking_never_makes_a_full_size_float_copy(tmp_path, monkeypatch):
    from skpatchcore._geometry import Geometry

    x = (np.random.RandomState(3).rand(600, 450, 3) * 255).astype(np.uint8)
    Image.fromarray(x).save(tmp_path / "x.png")
    seen, bands = [], []
    real_tensor, real_rows = _images._array_to_tensor, _images._PILRows.rows

    def record_tensor(arr, where):
        seen.append(arr.shape)
        return real_tensor(arr, where)

    def record_rows(self, y0, y1):
        bands.append(y1 - y0)
        return real_rows(self, y0, y1)

    monkeypatch.setattr(_images, "_array_to_tensor", record_tensor)
    monkeypatch.setattr(_images._PILRows, "rows", record_rows)
    monkeypatch.setattr(_images, "_BAND_PIXELS", 20_000)
    image = check_images(tmp_path / "x.png").decode(0, Geometry(32, "letterbox"))
    assert seen == [(67, 50, 3)] and tuple(image.shape) == (3, 67, 50)  # f = 9
    assert max(bands) * 450 <= 2 * 20_000 and sum(bands) == 600


def test_float_images_are_checked_before_they_are_shrunk():
    from skpatchcore._geometry import Geometry

    g = Geometry(8, "stretch")
    x = np.zeros((100, 100), np.float32)
    x[50, 50] = 1.5  # a 10 x 10 block mean of 0.015 would pass
    for geometry in (None, g):
        with pytest.raises(ValueError, match=r"X\[0\]: float images must lie in \[0, 1\], got "
                                             r"values in \[0, 1\.5\]"):
            check_images([x]).decode(0, geometry)
    x[50, 50] = np.nan
    with pytest.raises(ValueError, match=r"X\[0\]: image contains NaN or infinite values"):
        check_images([x]).decode(0, g)
    big = Image.fromarray(np.arange(10000, dtype=np.int32).reshape(100, 100))
    with pytest.raises(ValueError, match=r"mode 'I' \(integer pixels, values 0\.\.9999\)"):
        check_images([big]).decode(0, g)


def test_pixels_read_in_bands_are_the_decoded_image(tmp_path):
    rng = np.random.RandomState(4)
    x = (rng.rand(37, 23, 3) * 255).astype(np.uint8)
    _save_oriented(Image.fromarray(x), tmp_path / "x6.png", 6)
    gray16 = (rng.rand(19, 31) * 65535).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    forms = [[tmp_path / "x6.png"], [tmp_path / "g16.png"], [x.astype(np.float32) / 255],
             [Image.fromarray(x).convert("P")], [torch.from_numpy(x).permute(2, 0, 1)],
             [Image.fromarray(x[..., 0])]]
    for form in forms:
        images = check_images(form)
        expected = (images[0].permute(1, 2, 0).numpy() * np.float32(255)).round()
        with images.pixels(0) as px:
            assert px.shape == images.sizes()[0]
            got = np.concatenate([px.rgb8(y, min(px.shape[0], y + 5))
                                  for y in range(0, px.shape[0], 5)])
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, expected.astype(np.uint8))


def test_uint8_pixels_survive_the_float_round_trip():
    """rgb8 of uint8 pixels is the pixels themselves: x / 255 * 255, rounded, is x."""
    x = np.arange(256, dtype=np.uint8)
    t = torch.from_numpy(x).to(torch.float32).div_(255.0)
    np.testing.assert_array_equal((t.numpy() * np.float32(255)).round().astype(np.uint8), x)


def test_take_keeps_the_names_and_the_geometry(tmp_path):
    from skpatchcore._geometry import Geometry

    paths = [_png(tmp_path / f"{i}.png", 4, 4) for i in range(5)]
    g = Geometry(8, "stretch")
    part = check_images(paths).for_geometry(g).take(2, 4)
    assert len(part) == 2 and part.name(1) == f"X[3] ({os.fspath(paths[3])!r})"
    assert part._geometry is g
