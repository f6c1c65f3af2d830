import re

import numpy as np
import pytest

from edge_pfm.preprocess import PreprocessSpec, preprocess


def test_matches_reference_formula():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    spec = PreprocessSpec(size=(64, 64))
    out = preprocess(frame, spec)
    rgb = frame[:, :, ::-1].astype(np.float64) / 255.0
    ref = ((rgb - np.array(spec.mean)) / np.array(spec.std)).transpose(2, 0, 1)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_center_crop_keeps_aspect_and_ignores_borders():
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[:, :280] = 255  # outside the central 720x720 square
    frame[:, -280:] = 255
    out = preprocess(frame, PreprocessSpec(size=(32, 32)))
    assert np.allclose(out, out[:, :1, :1])  # uniform: the bright borders were cropped away
    stretched = preprocess(frame, PreprocessSpec(size=(32, 32), resize="stretch"))
    assert stretched[:, :, 0].mean() > out[:, :, 0].mean()


def test_grey_and_monochrome():
    grey = np.full((48, 64), 128, np.uint8)
    assert preprocess(grey, PreprocessSpec(size=(16, 16))).shape == (3, 16, 16)
    assert preprocess(grey[..., None], PreprocessSpec(size=(16, 16))).shape == (3, 16, 16)
    mono = PreprocessSpec(size=(16, 16), channels=1, mean=(0.5,), std=(0.5,))
    colour = np.full((48, 64, 3), 255, np.uint8)
    out = preprocess(colour, mono)
    assert out.shape == (1, 16, 16)
    np.testing.assert_allclose(out, 1.0, atol=1e-5)


def test_out_buffer_is_reused():
    spec = PreprocessSpec(size=(16, 16))
    buf = np.empty((3, 16, 16), np.float32)
    res = preprocess(np.zeros((20, 20, 3), np.uint8), spec, out=buf)
    assert res is buf


@pytest.mark.parametrize("frame,match", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 4), np.uint8), "HxWx3"),
    ([[0]], "numpy array"),
])
def test_bad_frames(frame, match):
    with pytest.raises((ValueError, TypeError), match=match):
        preprocess(frame, PreprocessSpec(size=(8, 8)))


def test_spec_round_trip_and_validation():
    spec = PreprocessSpec(size=(96, 128), resize="stretch")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="resize"):
        PreprocessSpec(resize="letterbox")


def test_halving_downsample_within_one_level_of_exact_box_average():
    """The documented difference: 8x as three 2x2 halvings differs from one exact 8x8 mean by <= 1 level."""
    from edge_pfm.preprocess import area_downsample
    from edge_pfm.synthetic import render_pair

    frame = render_pair("hsil", 7, (1080, 1080)).white_light
    fast = area_downsample(frame, 128, 128)
    exact = frame.reshape(135, 8, 135, 8, 3).mean(axis=(1, 3))
    assert fast.shape == (135, 135, 3)
    diff = fast.astype(np.float64) - exact
    assert np.abs(diff).max() <= 1.5 and abs(diff.mean()) < 0.6
    # odd factors take one exact step: 5x
    odd = area_downsample(frame[:1000, :1000], 200, 200)
    np.testing.assert_allclose(odd, frame[:1000, :1000].reshape(200, 5, 200, 5, 3).mean(axis=(1, 3)), atol=0.51)


def test_scratch_buffers_never_leak_into_results():
    """Intermediates are reused per thread; every returned image is its own."""
    from edge_pfm.preprocess import preprocess_keep_intermediate
    from edge_pfm.synthetic import render_pair

    spec = PreprocessSpec(size=(64, 64))
    a_frame, b_frame = render_pair("lsil", 1, (1280, 720)).white_light, render_pair("normal", 2, (1280, 720)).white_light
    a_out, a_mid = preprocess_keep_intermediate(a_frame, spec)
    a_copy = (a_out.copy(), a_mid.copy())
    preprocess_keep_intermediate(b_frame, spec)
    np.testing.assert_array_equal(a_out, a_copy[0])
    np.testing.assert_array_equal(a_mid, a_copy[1])
    np.testing.assert_array_equal(preprocess(a_frame, spec), a_out)


def test_crop_pct_keeps_what_torchvision_resize_then_center_crop_keeps():
    """timm's eval transform, Resize(int(224 / 0.875)) = 256 then CenterCrop(224), keeps 224/256 of the short side."""
    spec = PreprocessSpec(size=(224, 224), crop_pct=0.875)
    y0, y1, x0, x1 = spec.field_of_view(720, 1280)
    assert (y1 - y0, x1 - x0) == (630, 630) and (y0 + y1) // 2 == 360 and (x0 + x1) // 2 == 640
    odd = PreprocessSpec(size=(96, 96), crop_pct=0.875)  # int(96 / 0.875) = 109: 96/109 kept, not 0.875
    y0, y1, _, _ = odd.field_of_view(720, 1280)
    assert y1 - y0 == round(720 * 96 / 109)
    assert PreprocessSpec(size=(96, 96)).field_of_view(720, 1280) == (0, 720, 280, 1000)


@pytest.mark.parametrize("kwargs, says", [
    ({"crop_pct": "0.9"}, "crop_pct must be a number"),
    ({"crop_pct": 0.05}, "crop_pct must be in [0.1, 1]"),
    ({"crop_pct": 0.9, "resize": "stretch"}, "goes with resize center_crop"),
])
def test_a_bad_crop_pct_is_named(kwargs, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        PreprocessSpec(size=(96, 96), **kwargs)


def test_a_preprocessing_field_this_runtime_does_not_know_is_refused_not_ignored():
    d = PreprocessSpec(size=(96, 96)).to_dict()
    assert PreprocessSpec.from_dict(d) == PreprocessSpec(size=(96, 96))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['gamma'\].*upgrade edge-pfm"):
        PreprocessSpec.from_dict({**d, "gamma": 2.2})
