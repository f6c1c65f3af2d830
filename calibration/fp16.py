"""FP16 accuracy on the CPU: a faithful emulation of a TensorRT FP16 engine.

ONNX Runtime's CPU provider has few FP16 kernels, so instead of an FP16 graph we round what
FP16 rounds: every weight and every activation tensor is rounded to float16 (Cast to FLOAT16
and back after each node), while each op computes in float32 - as TensorRT's FP16 kernels
accumulate in FP32. Inputs are rounded too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def fp16_emulation_model(onnx_path: str | Path):
    """-> onnx.ModelProto computing like an FP16 engine (FP16-rounded weights and activations)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    g = model.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    float_tensors = {v.name for v in [*g.value_info, *g.output] if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    new_nodes = []

    def round_trip(name: str) -> tuple[str, list]:
        raw = f"{name}__fp32"
        half = f"{name}__fp16"
        return raw, [helper.make_node("Cast", [raw], [half], to=TensorProto.FLOAT16, name=f"{name}/to_fp16"),
                     helper.make_node("Cast", [half], [name], to=TensorProto.FLOAT, name=f"{name}/to_fp32")]

    rounded_inputs = {}
    for inp in g.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            rounded_inputs[inp.name] = f"{inp.name}__rounded"
            new_nodes += [
                helper.make_node("Cast", [inp.name], [f"{inp.name}__fp16"], to=TensorProto.FLOAT16),
                helper.make_node("Cast", [f"{inp.name}__fp16"], [rounded_inputs[inp.name]], to=TensorProto.FLOAT),
            ]
    for node in g.node:
        for k, i in enumerate(node.input):
            if i in rounded_inputs:
                node.input[k] = rounded_inputs[i]
        casts = []
        for k, out in enumerate(node.output):
            if out in float_tensors:
                raw, pair = round_trip(out)
                node.output[k] = raw
                casts += pair
        new_nodes += [node, *casts]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]
    return model
