"""model.fp16.onnx: the FP16-typed model that strongly typed TensorRT (11.x, TensorRT-RTX) builds for FP16.

onnxconverter-common's float16 converter, with float32 inputs and outputs (the runtime feeds float32
either way) and, in float32, the ops FP16 breaks: LayerNormalization (its variance overflows FP16
after attention) and the converter's own default list. Its `op_block_list` replaces that default
list instead of extending it, so both are passed. The converter can leave the graph out of
topological order with `keep_io_types`; it is sorted here, and the artifact gate checks it.
"""
from __future__ import annotations

from pathlib import Path

# ops kept in float32 on top of onnxconverter-common's DEFAULT_OP_BLOCK_LIST
FP32_OPS = ("LayerNormalization",)


def shape_subgraph_nodes(model) -> list[str]:
    """Nodes that compute from a Shape (a transformer's attention scale 1/sqrt(head_dim), reshape targets), and
    the nodes where such a value meets the feature maps. The float16 converter mistypes these (it retypes the
    float32 a Cast produces there), so they stay float32, with casts at their edges."""
    inits = {i.name for i in model.graph.initializer}
    tainted = {o for n in model.graph.node if n.op_type == "Shape" for o in n.output}
    nodes = []
    for n in model.graph.node:
        ins = [i for i in n.input if i]
        if any(i in tainted for i in ins):
            nodes.append(n.name)
            if all(i in tainted or i in inits for i in ins):  # wholly shape-derived: so are its outputs
                tainted.update(n.output)
    return nodes


def fp16_model(onnx_path: str | Path):
    """-> onnx.ModelProto: the FP32 model typed FP16 inside, float32 I/O."""
    import onnx

    from edge_pfm._lazy import require
    from export.onnx_graph import topological_sort

    float16 = require("onnxconverter_common.float16", "writing model.fp16.onnx")
    model = onnx.load(str(onnx_path))
    ops = [*float16.DEFAULT_OP_BLOCK_LIST, *FP32_OPS]
    half = topological_sort(float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=ops))
    try:
        onnx.checker.check_model(half, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        # the converter mistyped shape arithmetic (seen on nn.TransformerEncoderLayer): keep that part float32
        half = topological_sort(float16.convert_float_to_float16(
            onnx.load(str(onnx_path)), keep_io_types=True, op_block_list=ops,
            node_block_list=shape_subgraph_nodes(model)))
    half.ir_version = model.ir_version
    half.producer_name, half.producer_version = model.producer_name, model.producer_version
    return half
