"""GPTQ's int8 weight levels (calibration/weight_rounding.py): the inputs' H is what ONNX Runtime's own convolution
sees, the levels stay on the quantizer's grid, and on correlated inputs they give a smaller output error than
rounding each weight to nearest, in the Q/DQ model ONNX Runtime runs."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.qdq import quantize_qdq
from calibration.weight_rounding import QMAX, WeightRounding, gptq_levels, input_hessians, output_error, weight_layers


def _session(model) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("geometry", [
    dict(kernel=3, stride=1, pads=(1, 1, 1, 1), dilation=1, group=1),
    dict(kernel=3, stride=2, pads=(0, 1, 2, 0), dilation=1, group=1),
    dict(kernel=3, stride=1, pads=(2, 2, 2, 2), dilation=2, group=2),
    dict(kernel=5, stride=2, pads=(2, 2, 2, 2), dilation=1, group=4),  # depthwise
])
def test_the_conv_inputs_h_is_the_convolutions_own(geometry, tmp_path):
    """sum over every output position of y_o^2 = w_o H w_o^T, with y ONNX Runtime's convolution (no bias): the
    patches gathered for H are the ones the convolution reads, in the weight's (Cin, kh, kw) order."""
    rng = np.random.default_rng(0)
    cin, cout, k, g = 4, 8, geometry["kernel"], geometry["group"]
    w = rng.normal(size=(cout, cin // g, k, k)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=g, kernel_shape=[k, k],
                            strides=[geometry["stride"]] * 2, pads=list(geometry["pads"]),
                            dilations=[geometry["dilation"]] * 2)
    model = helper.make_model(helper.make_graph(
        [conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 11, 13])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = [{"x": rng.normal(size=(1, cin, 11, 13)).astype(np.float32)} for _ in range(3)]
    layers = weight_layers(model)
    onnx.save(model, str(tmp_path / "conv.onnx"))
    h = input_hessians(tmp_path / "conv.onnx", iter(feeds), len(feeds), layers, rows_per_layer=10**6)["conv"]
    assert h.shape == (g, cin // g * k * k, cin // g * k * k)
    sess = _session(model)
    energy = sum((sess.run(None, f)[0].astype(np.float64) ** 2).sum(axis=(0, 2, 3)) for f in feeds)
    rows = w.reshape(cout, -1).astype(np.float64)
    per_group = cout // g
    expected = np.array([rows[o] @ h[o // per_group] @ rows[o] for o in range(cout)])
    np.testing.assert_allclose(energy, expected, rtol=1e-4)


def test_gptq_levels_cancel_what_nearest_rounding_adds_up_on_correlated_inputs():
    """Inputs that live along one direction (three colour channels of one fluorescence signal): rounding each weight
    alone leaves errors that add up along it; GPTQ's levels, on the same grid, leave several times less."""
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(4000, 1))
    x = signal @ np.ones((1, 27)) + 0.02 * rng.normal(size=(4000, 27))
    h = x.T @ x
    w = rng.normal(size=(16, 27))
    scale = np.abs(w).max(1) / QMAX
    nearest = np.clip(np.round(w / scale[:, None]), -QMAX, QMAX)
    levels = gptq_levels(w, h, scale)
    assert np.array_equal(levels, np.round(levels)) and np.abs(levels).max() <= QMAX
    assert output_error(w, levels, scale, h) < 0.2 * output_error(w, nearest, scale, h)


def test_the_q_dq_model_runs_gptq_levels_on_its_own_scales_and_errs_less(tmp_path):
    """quantize_qdq with a WeightRounding: the input's first layer is quantized too (float under nearest rounding),
    the second MatMul's int8 weights change level, not scale, stay within +-127, the model says so in its metadata, and ONNX Runtime's output of the Q/DQ model is closer to FP32's on
    the calibration inputs than with nearest rounding."""
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=(6, 32)).astype(np.float32)  # the input's first layer: quantized only with GPTQ levels
    w1 = rng.normal(size=(32, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="first"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w1"], ["y"], name="second")]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    feeds = [{"x": rng.normal(size=(64, 6)).astype(np.float32)} for _ in range(8)]
    amax = {t: float(np.abs(v).max()) for t, v in
            zip(("h", "r", "y"), _session(_with_outputs(model, ["h", "r", "y"])).run(None, {
                "x": np.concatenate([f["x"] for f in feeds])}))}
    amax["x"] = float(max(np.abs(f["x"]).max() for f in feeds))
    rounding = WeightRounding.measure(path, iter(feeds), len(feeds))
    nearest = quantize_qdq(path, amax, None)
    with_first = quantize_qdq(path, amax, None, rounding=rounding)
    gptq = quantize_qdq(path, amax, None, rounding=rounding, float_nodes=("first",))  # nearest's quantized layers

    def weight(m):
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        q = next(v for k, v in inits.items() if v.dtype == np.int8 and v.shape == (32, 8))
        s = next(v for k, v in inits.items() if v.dtype == np.float32 and v.shape == (8,))
        return q, s

    def reads_dequantized(m, node):
        producers = {o: n.op_type for n in m.graph.node for o in n.output}
        return [producers.get(i) == "DequantizeLinear" for i in next(n for n in m.graph.node if n.name == node).input]

    assert reads_dequantized(nearest, "first") == [False, False]  # the pixels' layer: float under nearest rounding
    assert reads_dequantized(with_first, "first") == [True, True]
    assert reads_dequantized(gptq, "second") == [True, True]
    (qn, sn), (qg, sg) = weight(nearest), weight(gptq)
    assert np.array_equal(sn, sg) and not np.array_equal(qn, qg) and np.abs(qg.astype(int)).max() <= QMAX
    props = {p.key: json.loads(p.value) for p in gptq.metadata_props if p.key == "edge_pfm.weight_rounding"}
    assert props["edge_pfm.weight_rounding"]["layers_gptq"] == 1
    x = np.concatenate([f["x"] for f in feeds])
    ref = _session(model).run(None, {"x": x})[0]
    err = {k: float(((_session(m).run(None, {"x": x})[0] - ref) ** 2).sum()) for k, m in
           (("nearest", nearest), ("gptq", gptq))}
    assert err["gptq"] < err["nearest"], err


def _with_outputs(model, names):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return m
