"""ONNX-only graph helpers: the pinned IR, saving, the deployability checks and a stable topological sort.
No torch: calibration and the ONNX door use these without PyTorch installed."""
from __future__ import annotations

import collections
from pathlib import Path

from edge_pfm.errors import EdgePfmError
from export.trt_onnx_ops import FORBIDDEN_OPS, TRT_SUPPORTED_OPS

OUTPUT_NAME = "logits"
LESION_MAP = "lesion_map"
BATCH_DIM = "batch"
# onnx 1.23 stamps IR 14, onnxruntime 1.31 reads <= 13, TensorRT 8.6's parser was built against IR 8.
# Write the lowest IR version that the opset needs.
IR_VERSION_FOR_OPSET = {17: 8, 18: 8, 19: 9, 20: 9}


class ExportError(EdgePfmError, RuntimeError):
    """The exported graph is not deployable; the message says why and what to change."""


def declare_output_shapes(proto):
    """The exporter leaves a Resize output's spatial dims undeclared; ONNX shape inference knows them. Declare
    them on the graph outputs (batch stays symbolic), so the manifest, ORT and TensorRT see static maps."""
    import onnx

    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(proto).graph.output}
    for out in proto.graph.output:
        dims, known = out.type.tensor_type.shape.dim, inferred[out.name].type.tensor_type.shape.dim
        for d, k in list(zip(dims, known))[1:]:
            if not d.dim_value and k.dim_value:
                d.dim_value = k.dim_value
    return proto


def constants_to_initializers(proto):
    """Turn Constant nodes, and Identity nodes over initializers (the exporter's de-duplicated
    weights), into initializers: every Conv weight and bias is then an initializer, which
    quantizers need (they skip a conv whose bias is computed) and TensorRT treats the same."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    keep = []
    for node in proto.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1:
            proto.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value.t), node.output[0]))
        elif node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            proto.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    return proto


def op_census(proto) -> collections.Counter:
    return collections.Counter(n.op_type for n in proto.graph.node)


def default_opset(proto) -> int:
    """The version of the default (ai.onnx) operator set the graph imports."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def check_graph(proto, require_dynamic_batch: bool = True) -> dict:
    """Full ONNX check + TensorRT deployability. Raises ExportError; returns facts for the report."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"onnx.checker rejected the graph: {exc}") from exc
    census = op_census(proto)
    problems = [f"{op} x{census[op]}: {why}" for op, why in FORBIDDEN_OPS.items() if census.get(op)]
    unsupported = sorted(op for op in census if op not in TRT_SUPPORTED_OPS)
    if unsupported:
        problems.append(f"ops the TensorRT ONNX parser does not support: {unsupported} "
                        "(see export/trt_onnx_ops.py); rewrite those layers")
    if require_dynamic_batch:
        for value in list(proto.graph.input) + list(proto.graph.output):
            dim0 = value.type.tensor_type.shape.dim[0]
            if dim0.dim_param != BATCH_DIM:
                problems.append(f"{value.name}: batch dimension is {dim0.dim_value or dim0.dim_param!r}, "
                                f"not symbolic {BATCH_DIM!r}; export with an example batch >= 2 and dynamic_axes")
            static = [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
            if any(v <= 0 for v in static):
                problems.append(f"{value.name}: non-batch dimensions must be static, got {static}")
    if problems:
        raise ExportError("graph is not deployable on TensorRT:\n  - " + "\n  - ".join(problems))
    return {"op_census": dict(sorted(census.items())), "nodes": sum(census.values()),
            "opset": default_opset(proto),
            "ir_version": proto.ir_version}


def save_onnx(proto, path: str | Path) -> Path:
    import onnx

    onnx.save_model(proto, str(path))
    return Path(path)


def topological_sort(proto):
    """Order graph nodes so every input is produced before it is read (onnx.checker and TensorRT's
    parser require it; quantizers and float16 converters can break it). Stable: nodes that are
    already in order keep their order. Raises ExportError on a cycle or a dangling input."""
    import heapq

    graph = proto.graph
    nodes = list(graph.node)
    available = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        deps = {producer[i] for i in n.input if i not in available and i in producer}
        missing = [i for i in n.input if i not in available and i not in producer]
        if missing:
            raise ExportError(f"node {n.name or n.op_type} reads {missing}, which nothing produces")
        waiting[k] = len(deps)
        for d in deps:
            readers.setdefault(d, []).append(k)
    ready = [k for k in range(len(nodes)) if waiting[k] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for r in readers.get(k, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise ExportError("the graph has a cycle; it cannot be sorted")
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)
    return proto
