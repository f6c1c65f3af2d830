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
