"""NVIDIA's real ONNX parser and builder (TensorRT for RTX, CPU-only ahead-of-time builds) through edge_pfm's own
engine-build code: FP32, FP16 and INT8 engines from the bundle's artifacts, the engine cache with its sidecar,
the timing-cache path, progress phases, layer datatypes, and refusals that name the parser's node."""
import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import copy_bundle

from edge_pfm.bundle import Bundle, write_manifest
from edge_pfm.engine.cache import EngineKey, cache_secret, check_engine, engine_paths
from edge_pfm.engine.plan import plan_build
from edge_pfm.engine.trt_build import EngineBuildError, build_engine_bytes, capabilities, ensure_engine, import_tensorrt
from export.artifact_check import ArtifactRejected, check_artifact, tensorrt_build_check

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx has wheels for x86-64 Linux and Windows only")


@pytest.mark.parametrize("precision,artifact", [("fp32", "model.onnx"), ("fp16", "model.fp16.onnx"),
                                                ("int8", "model.int8.onnx")])
def test_ensure_engine_builds_caches_and_reuses(calibrated_bundle, tmp_path, precision, artifact):
    bundle = Bundle.load(calibrated_bundle)
    messages: list[str] = []
    path = ensure_engine(bundle, precision, cache_dir=tmp_path, flavour="tensorrt_rtx", log=messages.append)
    assert any(m.startswith("building tensorrt_rtx") for m in messages)
    assert any("build phase:" in m for m in messages)  # IProgressMonitor reported the phases
    engine_file, sidecar_file = engine_paths(tmp_path, _key(bundle, precision, artifact))
    assert path == engine_file and path.stat().st_size > 100_000
    side = json.loads(sidecar_file.read_text())
    assert side["key"]["trt_flavour"] == "tensorrt_rtx" and side["key"]["onnx_sha256"] == bundle.sha256(artifact)
    assert side["engine_bytes"] == path.stat().st_size
    assert list(tmp_path.glob("timing.tensorrt_rtx*.cache"))  # the timing-cache path ran (a no-op in RTX 1.7)
    messages.clear()
    assert ensure_engine(bundle, precision, cache_dir=tmp_path, flavour="tensorrt_rtx", log=messages.append) == path
    assert not any(m.startswith("building") for m in messages)  # the cached engine was taken


def _key(bundle, precision, artifact):
    from edge_pfm.engine.trt_build import RTX_AOT_IDENTITY

    version = trt.__version__
    source = "qdq" if precision == "int8" else ""
    return EngineKey(bundle.sha256(artifact), precision, source, version, *RTX_AOT_IDENTITY, -1,
                     (1, 1, bundle.max_batch), "tensorrt_rtx")


def test_an_rtx_engine_is_never_taken_for_a_tensorrt_engine(calibrated_bundle, tmp_path):
    bundle = Bundle.load(calibrated_bundle)
    ensure_engine(bundle, "fp32", cache_dir=tmp_path, flavour="tensorrt_rtx", log=lambda m: None)
    rtx, secret = _key(bundle, "fp32", "model.onnx"), cache_secret(bundle)
    as_tensorrt = dataclasses.replace(rtx, trt_flavour="tensorrt")
    assert check_engine(tmp_path, rtx, secret)[0] is not None
    assert check_engine(tmp_path, as_tensorrt, secret)[0] is None
    # even under the TensorRT key's file name, the sidecar's flavour refuses it
    for src, dst in zip(engine_paths(tmp_path, rtx), engine_paths(tmp_path, as_tensorrt)):
        shutil.copyfile(src, dst)
    path, why = check_engine(tmp_path, as_tensorrt, secret)
    assert path is None and "trt_flavour: engine 'tensorrt_rtx' != needed 'tensorrt'" in why


def test_rtx_plans_are_strongly_typed(calibrated_bundle):
    caps = capabilities(import_tensorrt("tensorrt_rtx"), Bundle.load(calibrated_bundle))
    assert caps.strongly_typed_only and caps.flavour == "tensorrt_rtx" and caps.has_fp16_onnx
    assert plan_build(caps, "fp16").onnx_artifact == "model.fp16.onnx"
    assert plan_build(caps, "int8").builder_flags == ()


def test_layer_datatypes_prove_int8_and_half(calibrated_bundle):
    """The engine's own layer listing: quantized convolutions run in Int8, the FP16 engine in Half."""
    census = {name: tensorrt_build_check(calibrated_bundle / name, precision)
              for name, precision in (("model.onnx", "fp32"), ("model.fp16.onnx", "fp16"),
                                      ("model.int8.onnx", "int8"))}
    fp32, fp16, int8 = census["model.onnx"], census["model.fp16.onnx"], census["model.int8.onnx"]
    assert set(fp32["by_datatype"]) == {"Float"} and fp32["layers"] > 20
    assert fp16["compute_by_datatype"].get("Half", 0) > 20 and "Float" not in fp16["compute_by_datatype"]
    qconvs = sum(n.op_type == "Conv" for n in onnx.load(str(calibrated_bundle / "model.int8.onnx")).graph.node)
    # every Conv but the two stems (kept float) and the ones TensorRT fuses away runs in Int8
    assert int8["compute_by_datatype"]["Int8"] >= 0.8 * (qconvs - 2)
    assert int8["compute_by_datatype"].get("Float", 0) <= 10
    for record in census.values():
        assert record["checked"] and record["flavour"] == "tensorrt_rtx" and record["engine_bytes"] > 100_000


def _ort_default_qdq(fp32_path, out_path, **kwargs):
    """What a user gets from onnxruntime's quantize_static defaults: int32 biases, uint8 asymmetric activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.feeds = iter([{n: rng.random((1, 3, 128, 128), np.float32) for n in ("white_light", "fluorescence")}
                               for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, **kwargs)
    model = onnx.load(str(out_path))
    model.ir_version = 8
    onnx.save(model, str(out_path))
    return out_path


def test_ort_default_qdq_is_refused_with_the_parsers_node(calibrated_bundle, tmp_path):
    bad = _ort_default_qdq(calibrated_bundle / "model.onnx", tmp_path / "model.int8.onnx")
    with pytest.raises(ArtifactRejected) as info:
        check_artifact(bad, "int8")  # uint8 activations: the first refusal is the asymmetric zero point
    msg = str(info.value)
    assert "ONNX parser rejected" in msg and "_DequantizeLinear (DequantizeLinear)" in msg
    assert "Non-zero zero point is not supported" in msg
    # symmetric int8 activations, int32 biases (the quantizer's default): the bias DequantizeLinear is named
    from onnxruntime.quantization import QuantType

    sym = _ort_default_qdq(calibrated_bundle / "model.onnx", tmp_path / "sym.onnx", activation_type=QuantType.QInt8,
                           extra_options={"ActivationSymmetric": True})
    with pytest.raises(ArtifactRejected, match=r"_DequantizeLinear.*Int32") as info:
        check_artifact(sym, "int8")
    # and the bundle check refuses a bundle that carries it: exit 2, the node named
    b = copy_bundle(calibrated_bundle, tmp_path / "b")
    shutil.copyfile(bad, b / "model.int8.onnx")
    write_manifest(b, Bundle.load(b, verify=False).manifest, {"model.int8.onnx": "int8 explicit Q/DQ onnx"})
    r = subprocess.run([sys.executable, "-m", "export.check", "--bundle", str(b)], capture_output=True, text=True)
    assert r.returncode == 2 and "_DequantizeLinear (DequantizeLinear)" in r.stderr, r.stderr


def test_build_error_names_file_and_node(tmp_path, calibrated_bundle):
    model = onnx.load(str(calibrated_bundle / "model.onnx"))
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type = "EdgePfmNoSuchOp"  # no importer, no plugin
    bad = tmp_path / "model.onnx"
    onnx.save(model, str(bad))
    plan = plan_build(capabilities(import_tensorrt("tensorrt_rtx"), Bundle.load(calibrated_bundle)), "fp32")
    with pytest.raises(EngineBuildError) as info:
        build_engine_bytes(import_tensorrt("tensorrt_rtx"), bad, plan, (1, 1, 2))
    assert str(bad) in str(info.value) and f"{relu.name} (EdgePfmNoSuchOp)" in str(info.value)


def test_bundle_check_command_records_in_the_manifest(calibrated_bundle, tmp_path):
    b = copy_bundle(calibrated_bundle, tmp_path / "b")
    r = subprocess.run([sys.executable, "-m", "export.check", "--bundle", str(b), "--record",
                        "--json", str(tmp_path / "checks.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx"):
        assert f"{name}: onnx.checker passed; tensorrt_rtx" in r.stdout
    checks = Bundle.load(b).manifest["build_checks"]  # hashes still verify
    assert checks["model.int8.onnx"]["tensorrt"]["compute_by_datatype"]["Int8"] > 0
    assert json.loads((tmp_path / "checks.json").read_text()).keys() == checks.keys()


def test_export_and_calibration_record_their_checks(calibrated_bundle):
    checks = Bundle.load(calibrated_bundle).manifest["build_checks"]
    assert set(checks) == {"model.onnx", "model.fp16.onnx", "model.int8.onnx"}
    for record in checks.values():
        assert record["onnx_checker"] == "full check passed" and record["tensorrt"]["checked"]
        assert record["tensorrt"]["version"] == trt.__version__


def test_unavailable_builder_is_recorded_as_not_checked(calibrated_bundle, monkeypatch):
    from edge_pfm._lazy import MissingDependencyError
    from edge_pfm.engine import trt_build

    def missing(flavour="tensorrt"):
        raise MissingDependencyError(f"'{flavour}' is not importable here")

    monkeypatch.setattr(trt_build, "import_tensorrt", missing)
    with pytest.warns(UserWarning, match="NOT CHECKED"):
        record = check_artifact(calibrated_bundle / "model.onnx", "fp32")
    assert record["tensorrt"] == {"checked": False, "reason": record["tensorrt"]["reason"]}
    assert "not usable here" in record["tensorrt"]["reason"]


def test_ctrl_c_during_a_build_interrupts_it(calibrated_bundle):
    """SIGINT that arrives while TensorRT builds: Python's handler raised KeyboardInterrupt inside a callback of
    ours, TensorRT swallowed it and the build (and calibration after it) went on. Now the build stops and the
    interrupt comes out of build_engine_bytes."""
    import os
    import signal

    bundle = Bundle.load(calibrated_bundle)
    plan = plan_build(capabilities(import_tensorrt("tensorrt_rtx"), bundle), "int8")
    sent = []

    def log(message: str) -> None:  # the first build phase: the builder is running
        if "build phase:" in message and not sent:
            sent.append(message)
            os.kill(os.getpid(), signal.SIGINT)

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with it ignored
    try:
        with pytest.raises(KeyboardInterrupt):
            build_engine_bytes(import_tensorrt("tensorrt_rtx"), calibrated_bundle / "model.int8.onnx", plan,
                               (1, 1, 2), log=log)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is Python's again
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert sent
