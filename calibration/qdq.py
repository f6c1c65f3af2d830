"""Explicit INT8 quantization: a Q/DQ ONNX from our symmetric activation ranges.

Placement follows the scheme in export.quant_scheme (which QAT reads too), written the way TensorRT's
explicit-quantization rules want it:
- int8 symmetric per-tensor activations, int8 symmetric per-output-channel weights (Conv, MatMul, Gemm);
- biases stay float: TensorRT's parser refuses an int32 DequantizeLinear (NVIDIA/TensorRT#3360),
  which onnxruntime's quantizer writes by default; zero points are int8 0 (symmetric);
- nodes are topologically sorted (the quantizer appends its Q/DQ nodes out of order);
- with a WeightRounding, the int8 weight levels are chosen to cancel each other's output error on the
  calibration inputs (calibration.weight_rounding), on the quantizer's own scales.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.onnx_graph import topological_sort
from export.quant_scheme import DEFAULT_QUANTIZED_OPS, OUTPUT_FLOAT_OPS, input_layers, name_nodes, residual_adds


def quantize_qdq(onnx_path: str | Path, amax: dict[str, float], out_path: str | Path | None,
                 op_types: tuple[str, ...] = DEFAULT_QUANTIZED_OPS, keep_float: tuple[str, ...] = (),
                 int32_biases: bool = False, float_nodes: tuple[str, ...] = (),
                 output_float_ops: tuple[str, ...] = OUTPUT_FLOAT_OPS, rounding=None):
    """Write the Q/DQ model quantizing `op_types` (+ residual adds); the nodes named in `float_nodes`, those whose
    names contain a `keep_float` substring and, without `rounding`, each input's first layer left float; -> onnx.ModelProto (also
    when `out_path` is None: nothing written).
    `output_float_ops`: the ops whose outputs stay float (export.quant_scheme: inputs only are quantized).
    `int32_biases` writes what this project wrote before TensorRT checked it (biases quantized to int32,
    which TensorRT refuses): for accuracy comparisons only, never a bundle artifact.
    `rounding` (calibration.weight_rounding.WeightRounding): the int8 weights take error-compensating (GPTQ)
    levels on the same scales, and the model's metadata `edge_pfm.weight_rounding` says how many layers did;
    None: nearest rounding, onnxruntime's."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    model = name_nodes(onnx.load(str(onnx_path)))
    ranges = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.array(-a, np.float32), highest=np.array(a, np.float32)) for name, a in amax.items()
    })
    nodes = [n.name for n in model.graph.node if n.op_type in op_types] + residual_adds(model)
    # each input's first layer sees raw pixels: float unless its weights take GPTQ's levels (export.quant_scheme)
    first = set() if rounding is not None else set(input_layers(model))
    exact = set(float_nodes)
    nodes = [n for n in nodes if n not in first and n not in exact and not any(k in n for k in keep_float)]
    if not nodes:  # onnxruntime's quantizer reads an empty list as "every node"
        raise ValueError("every quantizable node is kept float: there is nothing to quantize")
    quantizer = QDQQuantizer(
        model, per_channel=True, reduce_range=False, weight_qType=QuantType.QInt8, activation_qType=QuantType.QInt8,
        tensors_range=ranges, nodes_to_quantize=nodes, nodes_to_exclude=[], op_types_to_quantize=[*op_types, "Add"],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": int32_biases,
                       "OpTypesToExcludeOutputQuantization": list(output_float_ops)},
        # per-channel weight axes: onnxruntime's own (MatMul 1, the output columns; Gemm by its transB)
    )
    qmodel = topological_sort(quantizer.quantize_model())
    qmodel.ir_version = model.ir_version
    qmodel.producer_name = model.producer_name
    qmodel.producer_version = model.producer_version
    if rounding is not None:
        summary = rounding.apply(qmodel).to_dict()
        del summary["per_layer"]
        onnx.helper.set_model_props(qmodel, {**{p.key: p.value for p in qmodel.metadata_props},
                                             "edge_pfm.weight_rounding": json.dumps(summary)})
    problems = [] if int32_biases else tensorrt_qdq_problems(qmodel)
    if problems:
        raise ValueError("the Q/DQ model is not what TensorRT accepts:\n  - " + "\n  - ".join(problems[:10]))
    if out_path is not None:
        onnx.save_model(qmodel, str(out_path))
    return qmodel


def unquantize(qmodel, fp32_model, names) -> object:
    """A copy of the Q/DQ model in which the nodes `names` read float inputs again, as quantize_qdq would have left
    them: an input that comes through DequantizeLinear reads what its QuantizeLinear read (an activation), or the
    FP32 model's own initializer (a weight); Q/DQ nodes and initializers left without readers are dropped.
    Milliseconds, where quantize_qdq takes most of a second: the recipe search tries many such models."""
    import onnx

    q = onnx.ModelProto()
    q.CopyFrom(qmodel)
    producers = {o: n for n in q.graph.node for o in n.output}
    originals = {n.name: n for n in fp32_model.graph.node}
    float_inits = {i.name: i for i in fp32_model.graph.initializer}
    have = {i.name for i in q.graph.initializer}
    targets = set(names)
    for n in q.graph.node:
        if n.name not in targets:
            continue
        for k, tensor in enumerate(n.input):
            dq = producers.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            qn = producers.get(dq.input[0])
            if qn is not None and qn.op_type == "QuantizeLinear":
                n.input[k] = qn.input[0]
            else:
                weight = originals[n.name].input[k]
                if weight not in have:
                    q.graph.initializer.append(float_inits[weight])
                    have.add(weight)
                n.input[k] = weight
    while True:  # drop what nothing reads any more
        read = {i for n in q.graph.node for i in n.input} | {o.name for o in q.graph.output}
        dead = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            q.graph.node.remove(n)
    read = {i for n in q.graph.node for i in n.input}
    for init in [i for i in q.graph.initializer if i.name not in read]:
        q.graph.initializer.remove(init)
    return q


def tensorrt_qdq_problems(model) -> list[str]:
    """What TensorRT refuses in a Q/DQ graph: non-int8 quantized types (int32 biases, uint8 activations)
    and non-zero zero points. Empty list = fine."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    problems = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp_name = n.input[2] if len(n.input) > 2 else ""
        quantized = n.input[0] if n.op_type == "DequantizeLinear" else None
        if quantized in inits and inits[quantized].data_type != TensorProto.INT8:
            dtype = TensorProto.DataType.Name(inits[quantized].data_type).lower()
            problems.append(f"{n.name}: dequantizes {dtype} {quantized!r} (TensorRT takes int8 only; keep biases float)")
        if zp_name in inits:
            zp = inits[zp_name]
            if zp.data_type != TensorProto.INT8:
                problems.append(f"{n.name}: zero point {zp_name!r} is {TensorProto.DataType.Name(zp.data_type).lower()}, "
                                "not int8")
            elif np.any(numpy_helper.to_array(zp) != 0):
                problems.append(f"{n.name}: zero point {zp_name!r} is not 0 (TensorRT quantization is symmetric)")
    return problems
