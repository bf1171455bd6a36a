"""Geometry: the shrink factor of large images, and maps back on the image's own pixels in
bounded memory (BilinearRows), with the arithmetic of F.interpolate."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from skpatchcore._geometry import BilinearRows, Geometry, frame_geometry


def _assert_close(got, ref):
    """BilinearRows against F.interpolate: the same formula, rounded alike in PyTorch's
    vectorised loop (fused multiply-adds); its other loops may round the last bit
    differently."""
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got, ref, rtol=2e-7, atol=2e-7 * scale)


def _interpolate(src, out_hw):
    t = torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32))[None, None]
    return F.interpolate(t, size=out_hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def _old_to_image(geometry, amap, src_hw):
    """Geometry.to_image as it was: F.interpolate on the whole map."""
    if geometry.crop is not None:
        frame = np.zeros(geometry.frame, dtype=np.float32)
        dy, dx = geometry.crop_offset()
        frame[dy : dy + geometry.crop[0], dx : dx + geometry.crop[1]] = amap
        amap = frame
    top, left, nh, nw = frame_geometry(src_hw, geometry.frame, geometry.resize_mode)
    amap = amap[top : top + nh, left : left + nw]
    if amap.shape != tuple(src_hw):
        amap = _interpolate(amap, tuple(src_hw))
    return amap.astype(np.float32, copy=False)


# ----------------------------------------------------------------------- BilinearRows
@pytest.mark.parametrize(("src", "out"), [
    ((40, 40), (320, 320)), ((13, 7), (1000, 301)), ((320, 214), (6000, 4000)),
    ((50, 60), (50, 900)), ((50, 60), (700, 60)), ((300, 300), (120, 90)),  # one axis / down
    ((1, 5), (9, 17)), ((6, 1), (4, 3)), ((8, 8), (8, 8)),
])
def test_bilinear_rows_is_f_interpolate(src, out):
    rng = np.random.default_rng(0)
    a = (rng.random(src, dtype=np.float32) * 7 - 2).astype(np.float32)
    ref = _interpolate(a, out)
    resize = BilinearRows(a, out)
    got = resize.fill()
    assert got.dtype == np.float32 and got.shape == out
    _assert_close(got, ref)
    # any bands give the same values as the whole
    for step in (1, 7, out[0]):
        bands = [resize.rows(y, min(out[0], y + step)) for y in range(0, out[0], step)]
        np.testing.assert_array_equal(np.concatenate(bands), got)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 60), w=st.integers(1, 60), H=st.integers(1, 400),
       W=st.integers(1, 400), seed=st.integers(0, 2**16))
def test_bilinear_rows_any_sizes(h, w, H, W, seed):
    a = np.random.default_rng(seed).standard_normal((h, w)).astype(np.float32)
    got = BilinearRows(a, (H, W)).fill()
    ref = _interpolate(a, (H, W))
    _assert_close(got, ref)


def test_bands_are_bounded():
    resize = BilinearRows(np.zeros((40, 40), np.float32), (12000, 9000))
    bands = resize.bands()
    assert bands[0][0] == 0 and bands[-1][1] == 12000
    assert all(a == b for (_, a), (b, _) in zip(bands, bands[1:], strict=False))
    assert max((y1 - y0) * 9000 for y0, y1 in bands) <= 1 << 20


# --------------------------------------------------------------------------- to_image
@pytest.mark.parametrize(("geometry", "src_hw"), [
    (Geometry(64, "letterbox"), (300, 200)),
    (Geometry(64, "letterbox"), (50, 90)),
    (Geometry((48, 64), "stretch"), (100, 333)),
    (Geometry(80, "letterbox", crop_size=64), (120, 97)),
    (Geometry(80, "stretch", crop_size=(64, 48)), (30, 40)),
    (Geometry(64, "letterbox"), (64, 64)),  # no resize at all
    (Geometry((64, 96), "pad"), (50, 90)),  # fits: placed at its own size
    (Geometry((64, 96), "pad"), (300, 200)),  # too large: shrunk as by letterbox
])
def test_to_image_as_before(geometry, src_hw):
    rng = np.random.default_rng(1)
    amap = rng.random(geometry.input_size, dtype=np.float32)
    got = geometry.to_image(amap, src_hw)
    ref = _old_to_image(geometry, amap, src_hw)
    assert got.shape == src_hw and got.dtype == np.float32
    _assert_close(got, ref)
    rows = geometry.image_rows(amap, src_hw)
    np.testing.assert_array_equal(np.concatenate([rows.rows(a, b) for a, b in rows.bands(97)]),
                                  got)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 2000), w=st.integers(1, 2000),
       frame=st.tuples(st.integers(8, 700), st.integers(8, 700)))
def test_pad_never_enlarges_and_otherwise_letterboxes(h, w, frame):
    top, left, nh, nw = frame_geometry((h, w), frame, "pad")
    if h <= frame[0] and w <= frame[1]:
        assert (nh, nw) == (h, w)  # the image's own pixels, centred
        assert (top, left) == ((frame[0] - h) // 2, (frame[1] - w) // 2)
    else:
        assert (top, left, nh, nw) == frame_geometry((h, w), frame, "letterbox")


def test_image_region_of_a_crop_is_zero_outside_it():
    g = Geometry(80, "stretch", crop_size=64)
    region = g.image_region(np.ones((64, 64), np.float32), (160, 160))
    assert region.shape == (80, 80)
    assert region[8:72, 8:72].all() and region.sum() == 64 * 64


# ------------------------------------------------------------------- reduction factor
def test_reduction_factor_of_the_issue_sizes():
    g = Geometry(320, "letterbox")
    assert g.reduction_factor((12000, 12000)) == 18  # 667 x 667, >= 640
    assert g.reduction_factor((6000, 6000)) == 9
    assert g.reduction_factor((630, 630)) == 1  # the development sets: never shrunk
    assert g.reduction_factor((1279, 1279)) == 1
    assert g.reduction_factor((1280, 1280)) == 2
    # a strip: measured against its place in the frame, not the frame
    assert g.reduction_factor((1000, 12000)) == 18


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 30000), w=st.integers(1, 30000),
       frame=st.tuples(st.integers(8, 700), st.integers(8, 700)),
       mode=st.sampled_from(["letterbox", "stretch", "pad"]))
def test_reduction_factor_rule(h, w, frame, mode):
    g = Geometry(frame, mode)
    f = g.reduction_factor((h, w))
    place = frame_geometry((h, w), g.frame, mode)
    nh, nw = place[2:]
    assert f >= 1
    if f > 1:
        shrunk = (math.ceil(h / f), math.ceil(w / f))
        assert shrunk[0] >= 2 * nh and shrunk[1] >= 2 * nw  # the resize still does the work
        assert frame_geometry(shrunk, g.frame, mode) == place  # same place in the frame
    # under twice its place in the frame, or under 4x in either axis: never shrunk
    if h < 4 * nh or w < 4 * nw:
        assert f == 1


@pytest.mark.skipif(
    getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")() not in ("AVX2", "AVX512"),
    reason="F.interpolate's rounding is only known for PyTorch's AVX2/AVX-512 kernels")
@pytest.mark.parametrize(("src", "out"), [
    ((320, 320), (600, 600)), ((320, 240), (1000, 750)), ((320, 213), (630, 419)),
    ((240, 320), (480, 640)), ((320, 320), (256, 256)), ((40, 40), (320, 320)),
])
def test_maps_of_real_image_sizes_are_f_interpolate_bit_for_bit(src, out):
    """Maps of normal images are what they were before BilinearRows (F.interpolate)."""
    a = np.random.default_rng(3).random(src, dtype=np.float32)
    np.testing.assert_array_equal(BilinearRows(a, out).fill(), _interpolate(a, out))
