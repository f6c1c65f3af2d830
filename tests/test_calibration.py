"""Calibration: TensorRT cache format, Q/DQ census, one preprocessing, accuracy gate, bad data."""
import collections
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import copy_bundle
from onnx import numpy_helper

import calibration.data
import edge_pfm.preprocess
from calibration.__main__ import main as calibrate
from calibration.accuracy import GATE
from calibration.calib_cache import CalibrationCache, CalibrationCacheError, hex_to_amax, scale_hex, trt_version_int
from calibration.qdq import tensorrt_qdq_problems
from calibration.ranges import activation_tensors
from edge_pfm.bundle import Bundle
from edge_pfm.synthetic import write_dataset


def test_trt_version_numbers():
    assert trt_version_int("8.6.1") == 8601
    assert trt_version_int("10.3.0") == 100300
    assert trt_version_int("10.3") == 100300
    assert trt_version_int("10.16.1.11") == 101601
    with pytest.raises(ValueError):
        trt_version_int("ten")


def test_scale_hex_hand_computed():
    # scale = amax / 127; big-endian IEEE-754 float32 bits
    assert scale_hex(127.0) == "3f800000"  # scale 1.0
    assert scale_hex(254.0) == "40000000"  # scale 2.0
    assert scale_hex(63.5) == "3f000000"  # scale 0.5
    assert hex_to_amax("3c92aa10") / 127 == pytest.approx(0.017903, abs=1e-6)  # NVIDIA forum example


def test_cache_round_trip_and_header():
    cache = CalibrationCache(8601, "EntropyCalibration2", {"white_light": 2.5, "/stem/Conv_output_0": 11.0})
    text = cache.to_text()
    assert text.splitlines()[0] == "TRT-8601-EntropyCalibration2"
    assert text.splitlines()[1] == f"white_light: {scale_hex(2.5)}"
    back = CalibrationCache.from_text(text)
    assert back.trt_version == 8601 and list(back.amax) == list(cache.amax)
    for k, v in cache.amax.items():
        assert back.amax[k] == pytest.approx(v, rel=1e-6)


@pytest.mark.parametrize("text,match", [
    ("white_light 0.123\nfluorescence 4.5\n", "onnxruntime's calibration.cache is a different format"),
    ("TRT-100300-EntropyCalibration2\nx: zz00ff00\n", "line 2"),
    ("TRT-100300-EntropyCalibration2\nx: 3f800000\nx: 3f800000\n", "appears twice"),
    ("TRT-100300-Bogus\n", "unknown calibration algorithm"),
    ("", "empty"),
])
def test_cache_reader_errors(text, match):
    with pytest.raises(CalibrationCacheError, match=match):
        CalibrationCache.from_text(text)


def test_one_preprocessing():
    assert calibration.data.preprocess is edge_pfm.preprocess.preprocess
    b_specs = {m: edge_pfm.preprocess.PreprocessSpec(size=(32, 32)) for m in ("white_light", "fluorescence")}
    rng = np.random.default_rng(0)
    pair = (rng.integers(0, 256, (90, 160, 3), dtype=np.uint8), rng.integers(0, 256, (90, 160, 3), dtype=np.uint8), 0)
    reader = calibration.data.PairReader([pair], b_specs, {"white_light": "wl", "fluorescence": "fl"})
    feed = reader.get_next()
    assert np.array_equal(feed["wl"][0], edge_pfm.preprocess.preprocess(pair[0], b_specs["white_light"]))
    assert reader.get_next() is None


def test_calibrated_bundle_contents(calibrated_bundle):
    b = Bundle.load(calibrated_bundle)  # verifies every hash, new artifacts included
    for name in ("model.int8.onnx", "calibration.cache", "accuracy.json", "accuracy.md", "confusion.png"):
        assert b.has(name), name
    cal = b.manifest["calibration"]
    assert cal["method"] == "percentile" and cal["samples"] == 64 and len(cal["data_sha256"]) == 64
    assert cal["trt_version"] == "10.3" and cal["cache_header"] == "TRT-100300-EntropyCalibration2"
    report = json.loads((calibrated_bundle / "accuracy.json").read_text())
    for name in ("fp32", "int8", "fp16"):
        r = report["results"][name]
        assert {"accuracy", "top1_agreement", "recall", "recall_delta", "max_abs_prob_diff", "logit_rmse"} <= set(r)
    assert report["results"]["fp16"]["top1_agreement"] >= 0.97  # FP16 barely moves logits
    floor = report["noise_floor"]  # FP32 under a grey level of pixel noise, on the same held-out pairs
    assert floor["samples"] == report["results"]["fp32"]["samples"] and floor["sigma_grey_levels"] == 1.0
    assert floor["int8_changed"] == report["results"]["int8"]["disagreements"]
    assert 0 <= floor["fp32_changed"] <= floor["samples"] and "noise floor" in (calibrated_bundle / "accuracy.md").read_text()
    assert (calibrated_bundle / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cache_covers_every_activation_tensor(calibrated_bundle):
    cache = CalibrationCache.read(calibrated_bundle / "calibration.cache")
    expected = activation_tensors(calibrated_bundle / "model.onnx")
    assert cache.trt_version == 100300
    assert set(expected) == set(cache.amax)
    assert {"white_light", "fluorescence"} <= set(cache.amax)
    ranges = json.loads((calibrated_bundle / "calibration.json").read_text())["amax"]
    for name, amax in ranges.items():  # the cache and the Q/DQ model come from the same ranges
        assert cache.amax[name] == pytest.approx(amax, rel=1e-6, abs=1e-9)


def test_the_shipped_int8_weights_take_gptq_levels_by_default(calibrated_bundle):
    """The default calibration re-rounds the int8 weights (calibration.weight_rounding) and records it in
    calibration.json and in the Q/DQ model; each layer kept its GPTQ levels only where they err less."""
    record = json.loads((calibrated_bundle / "calibration.json").read_text())["weight_rounding"]
    assert record["method"].startswith("gptq") and 0 < record["layers_gptq"] <= record["layers"]
    model = onnx.load(str(calibrated_bundle / "model.int8.onnx"))
    props = {p.key: json.loads(p.value) for p in model.metadata_props if p.key == "edge_pfm.weight_rounding"}
    assert props["edge_pfm.weight_rounding"] == record


def test_qdq_census(calibrated_bundle):
    model = onnx.load(str(calibrated_bundle / "model.int8.onnx"))
    census = collections.Counter(n.op_type for n in model.graph.node)
    assert census["QuantizeLinear"] > 20 and census["DequantizeLinear"] > census["QuantizeLinear"]
    assert census["Softmax"] == 1 and census["LayerNormalization"] == 3  # still float ops
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    for n in model.graph.node:
        if n.op_type in ("Softmax", "LayerNormalization"):
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in n.input), n.name
            # their output is quantized only as the input of a quantized matmul (attention, MLP)
            for q in (c for c in consumers[n.output[0]] if c.op_type == "QuantizeLinear"):
                for dq in consumers[q.output[0]]:
                    assert dq.op_type == "DequantizeLinear", n.name
                    assert {c.op_type for c in consumers[dq.output[0]]} <= {"MatMul", "Gemm", "Conv", "Shape"}, n.name
    inits = {i.name: i for i in model.graph.initializer}
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                  and numpy_helper.to_array(inits[n.input[0]]).ndim == 4]
    assert len(weight_dqs) > 20
    for dq in weight_dqs:  # per-channel, symmetric int8 conv weights
        w = numpy_helper.to_array(inits[dq.input[0]])
        scale = numpy_helper.to_array(inits[dq.input[1]])
        assert w.dtype == np.int8 and scale.shape == (w.shape[0],)
        zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 else np.zeros(1)
        assert not zp.any()
    acts = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for q in acts:  # symmetric int8 activations: zero point 0
        zp = numpy_helper.to_array(inits[q.input[2]])
        assert zp.dtype == np.int8 and not zp.any()
    # TensorRT refuses an int32 DequantizeLinear: every dequantized initializer is int8, conv biases stay float
    dequantized = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert {numpy_helper.to_array(t).dtype for t in dequantized} == {np.dtype(np.int8)}
    float_biases = [n.input[2] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    assert len(float_biases) > 20 and all(inits[b].data_type == onnx.TensorProto.FLOAT for b in float_biases)
    assert tensorrt_qdq_problems(model) == []
    onnx.checker.check_model(model, full_check=True)  # includes topological order


def test_fp16_typed_model(calibrated_bundle):
    """FP16 inside, float32 I/O, LayerNormalization in float32; it runs on ORT CPU and agrees with FP32."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(calibrated_bundle / "model.fp16.onnx")))
    onnx.checker.check_model(model, full_check=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input,
                                                              *model.graph.output]}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    assert all(types[v.name] == onnx.TensorProto.FLOAT for v in [*model.graph.input, *model.graph.output])
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 3 and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)
    feeds = {n: np.random.default_rng(0).random((2, 3, 128, 128), np.float32) for n in ("white_light", "fluorescence")}
    half = ort.InferenceSession(str(calibrated_bundle / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    full = ort.InferenceSession(str(calibrated_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(half.run(None, feeds)[0] - full.run(None, feeds)[0]).max() < 0.05
    report = json.loads((calibrated_bundle / "accuracy.json").read_text())
    assert "model.fp16.onnx run on ONNX Runtime CPU" in report["fp16_method"]


@pytest.mark.parametrize("batch", [1, 4])
def test_int8_model_runs_on_ort_cpu(calibrated_bundle, batch):
    sess = ort.InferenceSession(str(calibrated_bundle / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 128, 128)).astype(np.float32)
    out, lesion = sess.run(None, {"white_light": x, "fluorescence": x})
    assert out.shape == (batch, 4) and np.isfinite(out).all()
    assert lesion.shape == (batch, 1, 16, 16) and lesion.min() >= 0 and lesion.max() <= 1


def test_accuracy_report_measures_the_lesion_map(calibrated_bundle):
    """Dice/IoU/pointing per class for every precision, and each reduced-precision map's IoU with FP32."""
    report = json.loads((calibrated_bundle / "accuracy.json").read_text())["lesion_map"]
    assert report["grid"] == [16, 16] and set(report["scores"]) == {"fp32", "int8", "fp16"}
    fp32 = report["scores"]["fp32"]
    assert fp32["hsil"]["dice"]["n"] == 64 and 0 <= fp32["hsil"]["dice"]["low"] <= fp32["hsil"]["dice"]["high"] <= 1
    assert "pointing" in fp32["lsil"] and "clean" in fp32["normal"]
    assert set(report["agreement"]) == {"int8", "fp16"}
    assert report["agreement"]["fp16"]["iou_all"]["mean"] > 0.9
    assert "## Lesion map" in (calibrated_bundle / "accuracy.md").read_text()


def _manifest_bytes(b):
    return (b / "manifest.json").read_bytes()


def test_bad_calibration_data_is_listed_and_bundle_untouched(tiny_bundle, tmp_path, capsys):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    before = _manifest_bytes(b)
    ds = write_dataset(tmp_path / "ds", 6, seed=5, size=(96, 72))
    (ds / "white" / "s00002.png").unlink()
    (ds / "fluorescence" / "s00003.png").write_bytes(b"garbage")
    labels = (ds / "labels.csv").read_text().splitlines()
    (ds / "labels.csv").write_text("\n".join(r for r in labels if not r.startswith("s00002,")) + "\n")
    assert calibrate(["--bundle", str(b), "--data", str(ds), "--eval-synthetic", "8"]) == 2
    err = capsys.readouterr().err
    assert "unpaired" in err and "fluorescence/s00002.png" in err
    (ds / "fluorescence" / "s00002.png").unlink()
    rgba = np.zeros((72, 96, 4), np.uint8)
    import cv2

    cv2.imwrite(str(ds / "white" / "s00004.png"), rgba)
    assert calibrate(["--bundle", str(b), "--data", str(ds), "--eval-synthetic", "8"]) == 2
    err = capsys.readouterr().err
    assert "fluorescence/s00003.png" in err and "white/s00004.png" in err and "2 bad image file(s)" in err
    assert _manifest_bytes(b) == before and not b.joinpath("model.int8.onnx").exists()


def test_eval_must_not_overlap_calibration(tiny_bundle, tmp_path, capsys):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    ds = write_dataset(tmp_path / "ds", 8, seed=5, size=(96, 72))
    assert calibrate(["--bundle", str(b), "--data", str(ds), "--eval", str(ds)]) == 2
    assert "both the calibration and the held-out set" in capsys.readouterr().err


def test_gate_failure_leaves_bundle_unchanged(tiny_bundle, tmp_path, monkeypatch, capsys):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    before = _manifest_bytes(b)
    monkeypatch.setitem(GATE, "int8_top1_agreement", 1.01)  # unreachable: the gate must refuse
    with pytest.warns(UserWarning, match="calibration samples"):
        rc = calibrate(["--bundle", str(b), "--synthetic", "16", "--eval-synthetic", "8", "--resolution", "160x120"])
    assert rc == 3  # refused, not an input error
    err = capsys.readouterr().err
    assert "gate failed" in err and "stays FP32" in err and "--qat-epochs" in err and "--allow-degraded" in err
    assert _manifest_bytes(b) == before and sorted(p.name for p in b.iterdir()) == sorted(
        p.name for p in tiny_bundle.iterdir())
    rejected = b.with_name("b.int8-rejected")
    assert (rejected / "accuracy.md").is_file() and (rejected / "confusion.png").is_file()


def test_polygraphy_data_loader_script(calibrated_bundle, monkeypatch):
    from calibration import data_loader

    monkeypatch.setenv("EDGE_PFM_BUNDLE", str(calibrated_bundle))
    monkeypatch.setenv("EDGE_PFM_CALIB_SYNTHETIC", "3")
    monkeypatch.delenv("EDGE_PFM_CALIB_DATA", raising=False)
    feeds = list(data_loader.load_data())
    assert len(feeds) == 3
    assert set(feeds[0]) == {"white_light", "fluorescence"} and feeds[0]["white_light"].shape == (1, 3, 128, 128)
    assert os.environ["EDGE_PFM_BUNDLE"]


def test_interval_statistics():
    from evaluation.stats import mcnemar_exact, paired_delta, wilson

    lo, hi = wilson(1990, 2000)
    assert lo == pytest.approx(0.990820, abs=1e-6) and hi == pytest.approx(0.997282, abs=1e-6)
    assert wilson(400, 400)[0] == pytest.approx(400 / (400 + 1.959963984540054**2))  # closed form at p = 1
    assert mcnemar_exact(5, 0) == 1 / 32 and mcnemar_exact(4, 0) == 1 / 16 and mcnemar_exact(2, 2) == 11 / 16
    ref = np.ones(500, bool)
    new = ref.copy()
    new[:2] = False
    d = paired_delta(ref, new)
    assert d["delta"] == -0.004 and d["lost"] == 2 and d["gained"] == 0 and d["ci95"][0] < -0.004 < d["ci95"][1] <= 0


def _results(n_disagree: int, hsil_lost: int, n: int = 2000):
    """Logits for FP32 and INT8 on n pairs (4 balanced classes, FP32 always right)."""
    from calibration.accuracy import evaluate

    labels = np.arange(n) % 4
    fp32 = np.eye(4)[labels] * 5.0
    int8 = fp32.copy()
    others = np.flatnonzero(labels != 3)[: n_disagree - hsil_lost]
    hsil = np.flatnonzero(labels == 3)[:hsil_lost]
    for i in [*others, *hsil]:
        int8[i] = np.roll(int8[i], 1)
    return evaluate({"fp32": fp32, "int8": int8}, labels, ("normal", "inflammation", "lsil", "hsil"))


def test_gate_decides_on_intervals_not_on_one_sample():
    from calibration.accuracy import gate

    critical = ("hsil",)  # the critical role of our four classes: the recall the gate protects
    assert gate(_results(10, 2), critical) == []  # 99.50 %: Wilson lower bound 99.08 % clears 99 %
    refused = gate(_results(16, 2), critical)  # the 99.20 %: lower bound 98.70 %
    assert len(refused) == 1 and "not shown to be >= 99%" in refused[0] and "98.70%" in refused[0]
    # one hsil pair lost at 500 hsil pairs (0.2 pp) or four (0.8 pp): no significant loss, no refusal
    assert gate(_results(4, 1), critical) == [] and gate(_results(8, 4), critical) == []
    # five lost and none gained: a significant loss (McNemar p = 1/32)
    assert any("significantly" in r and "'hsil'" in r for r in gate(_results(8, 5), critical))
    # the old float comparison: 0.95 - 0.94 > 0.01 refused a 1 pp drop; with a tolerance, it is not "below -1 pp"
    assert gate(_results(1, 1, n=400), critical)[0].startswith("INT8 top-1 agreement")  # n=400 too small to show 99 %
    # accuracy: 2.5 pp lost on 2000 pairs, interval entirely below -1 pp (agreement also fails)
    assert any("accuracy drops" in r for r in gate(_results(50, 0), critical))
    # the roles decide what is protected: the same five lost hsil pairs pass when only `normal` is critical
    assert not any("'hsil'" in r for r in gate(_results(8, 5), ("normal",)))


@pytest.mark.slow
def test_qat_ranges_go_through_the_same_writers(tiny_checkpoint, tmp_path):
    """--qat-from -> export maps the QAT ranges onto ONNX tensors -> calibration writes them into the Q/DQ
    model and the TensorRT cache, the same writers PTQ ranges go through."""
    from export import train
    from export.bundle_export import export_bundle

    ckpt = tmp_path / "qat.pt"
    assert train.main(["--qat-from", str(tiny_checkpoint), "--synthetic", "64", "--qat-epochs", "1",
                       "--resolution", "160x120", "--quiet", "--out", str(ckpt)]) == 0
    b = tmp_path / "b"
    export_bundle(ckpt, b)
    qat = json.loads((b / "qat_ranges.json").read_text())["amax"]
    graph = onnx.load(str(b / "model.onnx")).graph
    conv_inputs = {n.input[0] for n in graph.node if n.op_type == "Conv" and "/stem/" not in n.name}
    assert conv_inputs <= set(qat) and len(qat) > len(conv_inputs)  # + the quantized Adds' inputs and outputs
    rc = calibrate(["--bundle", str(b), "--synthetic", "16", "--eval-synthetic", "16", "--resolution", "160x120",
                    "--allow-degraded"])
    assert rc == 0
    manifest = Bundle.load(b).manifest
    assert manifest["calibration"]["ranges"].startswith("qat (")
    cache = CalibrationCache.read(b / "calibration.cache")
    model = onnx.load(str(b / "model.int8.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for name in conv_inputs:
        assert scales[name] == pytest.approx(qat[name] / 127, rel=1e-6)
        assert cache.amax[name] == pytest.approx(qat[name], rel=1e-6)


def test_each_inputs_first_conv_is_found_from_the_graph(tiny_bundle):
    """The float stems come from the graph's structure, not our layer names: on PFM they are the two stem convs."""
    import onnx

    from export.quant_scheme import input_layers, quantized_conv_nodes

    model = onnx.load(str(tiny_bundle / "model.onnx"))
    first = input_layers(model)
    assert len(first) == 2 and all("/stem/" in n for n in first)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert [n.name for n in quantized_conv_nodes(model)] == [c for c in convs if c not in first]


def test_a_linear_patch_embedding_is_the_input_layer_kept_float():
    """A branch whose first learned layer is a MatMul (a ViT-style patch embedding): that MatMul sees raw pixels and
    stays float; the conv after it is quantized."""
    from onnx import TensorProto, helper, numpy_helper

    from export.quant_scheme import input_layers, quantized_conv_nodes

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    k = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "k")
    graph = helper.make_graph([
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w"], ["m"], name="patch_embed"),
        helper.make_node("Conv", ["m", "k"], ["y"], name="conv_after"),
    ], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], [w, k])
    model = helper.make_model(graph)
    assert input_layers(model) == ["patch_embed"]
    assert [n.name for n in quantized_conv_nodes(model)] == ["conv_after"]
