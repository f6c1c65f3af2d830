"""Engine cache keys, sidecar validation, atomic writes, build planning and the removed-API guard."""
import dataclasses
import json
import re
from pathlib import Path

import pytest

from edge_pfm.backends import BackendError, select_backend
from edge_pfm.bundle import Bundle, BundleError
from edge_pfm.engine.cache import EngineKey, check_engine, engine_paths, find_any_engine, write_engine
from edge_pfm.engine.plan import BuildRefused, TrtCapabilities, plan_build
from edge_pfm.trust.device_secret import DeviceSecret

ROOT = Path(__file__).resolve().parents[1]
KEY = EngineKey("a" * 64, "int8", "qdq", "10.3.0", "Orin", "8.7", -1, (1, 1, 8))
SECRET = DeviceSecret(bytes(32))  # the cache's seals (tests/test_cache_seals.py)


@pytest.mark.parametrize("field,value", [
    ("onnx_sha256", "b" * 64), ("precision", "fp16"), ("int8_source", "cache"), ("trt_version", "10.16.1"),
    ("gpu_name", "Orin Nano"), ("compute_capability", "8.6"), ("dla_core", 0), ("profile", (1, 1, 4)),
    ("trt_flavour", "tensorrt_rtx"), ("calibration_cache_sha256", "c" * 64),
])
def test_every_key_field_changes_the_key(field, value):
    other = dataclasses.replace(KEY, **{field: value})
    assert other.digest() != KEY.digest() and other.file_stem() != KEY.file_stem()


def test_write_then_find(tmp_path):
    path = write_engine(tmp_path, KEY, b"engine-bytes", 12.3, SECRET, ["a warning"])
    assert check_engine(tmp_path, KEY, SECRET) == (path, "ok")
    side = json.loads(engine_paths(tmp_path, KEY)[1].read_text())
    assert side["key"]["trt_version"] == "10.3.0" and side["trt_warnings"] == ["a warning"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    assert find_any_engine(tmp_path, SECRET)[0]["gpu_name"] == "Orin"


def test_foreign_engine_is_never_loaded(tmp_path):
    write_engine(tmp_path, KEY, b"engine-bytes", 1.0, SECRET)
    engine, sidecar = engine_paths(tmp_path, KEY)
    side = json.loads(sidecar.read_text())
    side["key"]["trt_version"] = "8.6.1"  # a sidecar from another TensorRT under this key's name
    sidecar.write_text(json.dumps(side))
    path, why = check_engine(tmp_path, KEY, SECRET)
    assert path is None and "trt_version: engine '8.6.1' != needed '10.3.0'" in why
    side["key"]["trt_version"], side["key"]["gpu_name"] = "10.3.0", "Xavier"
    sidecar.write_text(json.dumps(side))
    assert "gpu_name" in check_engine(tmp_path, KEY, SECRET)[1]


def test_corrupt_or_orphan_engine_is_rebuilt(tmp_path):
    write_engine(tmp_path, KEY, b"engine-bytes", 1.0, SECRET)
    engine, sidecar = engine_paths(tmp_path, KEY)
    engine.write_bytes(b"engine-bytez")
    path, why = check_engine(tmp_path, KEY, SECRET)
    assert path is None and "corrupt" in why
    sidecar.unlink()
    assert "no sidecar" in check_engine(tmp_path, KEY, SECRET)[1]
    sidecar.write_text("{broken")
    assert "unreadable" in check_engine(tmp_path, KEY, SECRET)[1]
    assert "no cached engine" in check_engine(tmp_path / "empty", KEY, SECRET)[1]


JP6 = TrtCapabilities((10, 3, 0), num_dla_cores=2)
JP60 = TrtCapabilities((8, 6, 2), num_dla_cores=2)
TRT11 = TrtCapabilities((11, 4, 1), num_dla_cores=0)
NANO = TrtCapabilities((10, 3, 0), num_dla_cores=0)


def test_plans_on_tensorrt_10_and_8():
    assert plan_build(JP6, "fp16").builder_flags == ("FP16",)
    p = plan_build(JP6, "int8")
    assert (p.int8_source, p.onnx_artifact, p.builder_flags) == ("qdq", "model.int8.onnx", ("INT8", "FP16"))
    c = plan_build(JP60, "int8", "cache")
    assert c.use_calibration_cache and c.onnx_artifact == "model.onnx"
    d = plan_build(JP6, "int8", dla_core=1)
    assert d.int8_source == "cache" and d.dla_core == 1 and "GPU_FALLBACK" in d.builder_flags
    assert plan_build(JP6, "fp32").builder_flags == ()


def test_plans_on_tensorrt_11_are_strongly_typed():
    p = plan_build(TRT11, "int8")
    assert p.strongly_typed and p.builder_flags == () and p.onnx_artifact == "model.int8.onnx"
    with pytest.raises(BuildRefused, match="has no implicit INT8 calibration"):
        plan_build(TRT11, "int8", "cache")
    with pytest.raises(BuildRefused, match="FP16-typed ONNX"):
        plan_build(TRT11, "fp16")
    assert plan_build(dataclasses.replace(TRT11, has_fp16_onnx=True), "fp16").onnx_artifact == "model.fp16.onnx"


@pytest.mark.parametrize("caps,kwargs,match", [
    (NANO, dict(precision="int8", dla_core=0), "no DLA"),
    (JP6, dict(precision="int8", dla_core=2), "2 DLA core"),
    (JP6, dict(precision="fp32", dla_core=0), "FP16 and INT8 only"),
    (JP6, dict(precision="int8", int8_source="qdq", dla_core=0), "needs the calibration cache"),
    (JP6, dict(precision="fp16", int8_source="qdq"), "only applies"),
    (TrtCapabilities((8, 4, 3)), dict(precision="fp32"), "too old"),
    (dataclasses.replace(JP6, has_int8_onnx=False), dict(precision="int8"), "run python -m calibration"),
])
def test_unsupported_builds_are_refused_before_building(caps, kwargs, match):
    with pytest.raises(BuildRefused, match=match):
        plan_build(caps, **kwargs)


def test_selection_logic(calibrated_bundle, tiny_bundle):
    b = Bundle.load(calibrated_bundle)
    assert select_backend(b, "auto", trt_status=(True, "ok")).backend == "tensorrt"
    sel = select_backend(b, "auto", trt_status=(False, "tensorrt is not importable"))
    # nothing measured on this device: auto is FP32 (edge_pfm.precision_pick), and says how to measure
    assert (sel.backend, sel.precision) == ("onnxruntime", "fp32") and "not importable" in sel.reason
    assert "edge-pfm build" in sel.precision_reason
    assert select_backend(b, "onnxruntime", "int8").precision == "int8"  # asked for: the user's choice
    assert select_backend(Bundle.load(tiny_bundle), "auto", trt_status=(False, "x")).precision == "fp32"
    with pytest.raises(BackendError, match="JetPack"):
        select_backend(b, "tensorrt", trt_status=(False, "tensorrt is not importable"))
    with pytest.raises(BackendError, match="fp16 runs on TensorRT"):
        select_backend(b, "onnxruntime", "fp16")
    with pytest.raises(BundleError, match="no INT8 model"):
        select_backend(Bundle.load(tiny_bundle), "onnxruntime", "int8")


REMOVED_IN_TRT10 = ["execute_async_v2", "execute_async(", "build_engine(", "max_workspace_size", "num_bindings",
                    "get_binding_shape", "set_binding_shape", "binding_is_input", "get_binding_index", "max_batch_size"]


def test_tensorrt_code_uses_no_api_removed_in_10():
    files = [ROOT / "edge_pfm/engine/trt_build.py", ROOT / "edge_pfm/backends/tensorrt_backend.py"]
    for f in files:
        code = "\n".join(line.split("#")[0] for line in f.read_text().splitlines())
        for name in REMOVED_IN_TRT10:
            assert not re.search(r"\." + re.escape(name), code), f"{f.name} uses {name} (removed in TensorRT 10)"
        assert "execute_async_v3" in code or "build_serialized_network" in code


def test_layer_census_reads_both_log_formats():
    from edge_pfm.engine.layer_census import census_from_log

    trt10 = ("Engine Layer Information:\n"
             "Layer(CaskConvolution): /stem/Conv + /stem/Relu, Tactic: 0x1, white_light (Int8[1,3:4,128,128]) -> "
             "out (Int8[1,16:32,32,32])\n"
             "Layer(Reformat): reformat, Tactic: 0x0, out (Int8[1,16:32,32,32]) -> r (Float[1,16,32,32])\n"
             "Layer(Myelin): {ForeignNode[/attn/MatMul...]}, Tactic: 0x0, r (Half[1,16,32,32]) -> y (Half[1,4])\n")
    c = census_from_log(["unrelated", trt10])
    assert c.log_format == "tensorrt" and dict(c.layers) == {"Int8": 2, "Half": 1}
    assert dict(c.compute_layers) == {"Int8": 1}
    rtx = ("Layers:\nName: a, LayerType: shape_call, Inputs: [], Constants: [], Outputs: [], TacticName: , StreamId: 0\n"
           "Name: b, LayerType: correlation, Inputs: [ { Name: x, Dimensions: [-1,3,8,8], Datatype: Half, Format: "
           "(Linear) Row major }], Constants: [ { Name: w, Dimensions: [4,3,1,1], Datatype: Int8 }], Outputs: [ { Name: y, "
           "Dimensions: [-1,4,8,8], Datatype: Float }], TacticName: t, StreamId: 0, Metadata: [ONNX Layer: /c]\n")
    c = census_from_log([rtx])
    assert c.log_format == "tensorrt-rtx" and dict(c.layers) == {"Half": 1} and dict(c.compute_layers) == {"Half": 1}
    assert census_from_log(["no listing here"]) is None
