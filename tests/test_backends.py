"""The backend contract: every backend must pass this suite. Here: ONNX Runtime FP32 and INT8 (Q/DQ).
TensorRT runs the same suite where tensorrt + pycuda + a GPU exist, and skips with the reason elsewhere."""
import subprocess
import sys
import threading

import numpy as np
import pytest

from edge_pfm.backends import BackendError, open_backend
from edge_pfm.backends.select import tensorrt_status
from edge_pfm.bundle import Bundle

TRT_OK, TRT_WHY = tensorrt_status()
BACKENDS = [
    pytest.param(("onnxruntime", "fp32"), id="onnxruntime-fp32"),
    pytest.param(("onnxruntime", "int8"), id="onnxruntime-int8"),
    pytest.param(("tensorrt", "fp16"), id="tensorrt-fp16", marks=[
        pytest.mark.tensorrt, pytest.mark.skipif(not TRT_OK, reason=f"TensorRT not usable here: {TRT_WHY}")]),
    pytest.param(("tensorrt", "int8"), id="tensorrt-int8", marks=[
        pytest.mark.tensorrt, pytest.mark.skipif(not TRT_OK, reason=f"TensorRT not usable here: {TRT_WHY}")]),
]
# agreement with the FP32 ONNX Runtime reference on real scenes: max |dlogit| (fp32, fp16), mean (int8)
TOLERANCE = {"fp32": 1e-4, "fp16": 5e-2, "int8": 0.35}


@pytest.fixture(params=BACKENDS)
def backend(request, calibrated_bundle, tmp_path):
    name, precision = request.param
    b = open_backend(calibrated_bundle, name, precision, cache_dir=tmp_path / "engines")
    yield b
    b.close()


def _scenes(batch, bundle):
    from edge_pfm.preprocess import preprocess_pair
    from edge_pfm.synthetic import SCENES, render_pair

    pairs = [preprocess_pair(s.white_light, s.fluorescence, bundle.preprocessing["white_light"],
                             bundle.preprocessing["fluorescence"])
             for s in (render_pair(SCENES[i % 4], 100 + i, (320, 240)) for i in range(batch))]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def _inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((batch, 3, 128, 128)).astype(np.float32) for _ in range(2))


def test_specs_match_manifest(backend, calibrated_bundle):
    m = Bundle.load(calibrated_bundle).manifest
    assert [s.name for s in backend.inputs] == [i["name"] for i in m["inputs"]]
    assert [s.name for s in backend.outputs] == ["logits", "lesion_map"]
    assert backend.precision in ("fp32", "fp16", "int8")


@pytest.mark.parametrize("batch", [1, 3])
def test_lesion_map_output(backend, calibrated_bundle, batch):
    """Every output by name; the map is probabilities on the manifest's grid and follows the FP32 map."""
    w, f = _scenes(batch, backend.bundle)
    out = backend.infer_outputs(w, f)
    assert set(out) == {"logits", "lesion_map"}
    m = out["lesion_map"]
    assert m.shape == (batch, 1, 16, 16) and m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1
    np.testing.assert_array_equal(out["logits"], backend.infer(w, f))
    with open_backend(calibrated_bundle, "onnxruntime", "fp32") as ref:
        expected = ref.infer_outputs(w, f)["lesion_map"]
    assert np.abs(m - expected).mean() <= {"fp32": 1e-5, "fp16": 1e-2, "int8": 0.05}[backend.precision]


@pytest.mark.parametrize("batch", [1, 4])
def test_infer_shape_and_agreement(backend, calibrated_bundle, batch):
    w, f = _scenes(batch, backend.bundle)
    out = backend.infer(w, f)
    assert out.shape == (batch, 4) and out.dtype == np.float32 and np.isfinite(out).all()
    with open_backend(calibrated_bundle, "onnxruntime", "fp32") as ref:
        expected = ref.infer(w, f)
    err = np.abs(out - expected)
    assert (err.mean() if backend.precision == "int8" else err.max()) <= TOLERANCE[backend.precision]


def test_batch_rows_are_independent(backend):
    w, f = _inputs(4, seed=1)
    together = backend.infer(w, f)
    alone = np.concatenate([backend.infer(w[i:i + 1], f[i:i + 1]) for i in range(4)])
    np.testing.assert_allclose(together, alone, atol=1e-3)


def test_deterministic(backend):
    w, f = _inputs(2, seed=2)
    np.testing.assert_array_equal(backend.infer(w, f), backend.infer(w, f))


@pytest.mark.parametrize("bad", [
    lambda w, f: (w[:, :1], f),  # wrong channels
    lambda w, f: (w.astype(np.float64), f),  # wrong dtype
    lambda w, f: (w[:, :, :64], f),  # wrong height
    lambda w, f: (w, f[:1]),  # batch mismatch
    lambda w, f: (w[0], f[0]),  # missing batch dimension
])
def test_bad_inputs_are_refused(backend, bad):
    w, f = _inputs(2)
    with pytest.raises(BackendError):
        backend.infer(*bad(w, f))


def test_closed_backend_refuses(backend):
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.infer(*_inputs(1))


def test_onnxruntime_backend_runs_in_another_thread(calibrated_bundle):
    """The ONNX Runtime backend has no thread affinity: the pipeline's inference thread may own it."""
    out = {}
    b = open_backend(calibrated_bundle, "onnxruntime", "int8")
    t = threading.Thread(target=lambda: out.setdefault("y", b.infer(*_inputs(1))))
    t.start()
    t.join()
    assert out["y"].shape == (1, 4)


def test_tensorrt_unavailable_fails_fast_with_instructions(calibrated_bundle):
    if TRT_OK:
        pytest.skip("TensorRT is available here")
    with pytest.raises(BackendError, match="JetPack"):
        open_backend(calibrated_bundle, "tensorrt")
    run = subprocess.run([sys.executable, "-m", "edge_pfm", "build", "--bundle", str(calibrated_bundle), "--backend",
                          "tensorrt"],
                         capture_output=True, text=True)
    assert run.returncode == 4 and "TensorRT is not installed" in run.stderr and "JetPack" in run.stderr


def test_auto_selects_onnxruntime_and_says_why(calibrated_bundle):
    b = open_backend(calibrated_bundle, "auto")
    assert b.name == ("tensorrt" if TRT_OK else "onnxruntime")
    assert b.precision == "fp32"  # nothing measured here yet: the most accurate (edge_pfm.precision_pick)
    if not TRT_OK:
        assert "TensorRT unavailable" in b.selection_reason
    info = subprocess.run([sys.executable, "-m", "edge_pfm", "info", "--bundle", str(calibrated_bundle)],
                          capture_output=True, text=True)
    assert info.returncode == 0 and "backend  auto ->" in info.stdout
