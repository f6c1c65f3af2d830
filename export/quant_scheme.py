"""The INT8 quantization scheme, defined once: what the Q/DQ model quantizes (calibration.qdq) and what QAT
fake-quantizes (export.qat) read it here, so the two can never drift apart. ONNX-only, no torch.

- Conv inputs and weights are quantized (int8 symmetric; weights per output channel), except each branch's
  stem conv, which sees raw pixels and stays float;
- the Adds that close a FasterNet block or a channel gate are quantized (both inputs), so TensorRT fuses them;
- Softmax, LayerNormalization, Sigmoid and Erf (GELU) stay float: INT8 there costs accuracy and saves nothing;
- activation ranges clip at the 99.999th percentile of |x| (PTQ and QAT alike).
"""
from __future__ import annotations

PERCENTILE = 99.999
QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")
# Measured on PFM: quantizing the attention MatMuls and the head Gemm too costs INT8 agreement and
# saves < 2 % of the FLOPs, so by default only convolutions are quantized.
DEFAULT_QUANTIZED_OPS = ("Conv",)
FLOAT_OPS = ("Softmax", "LayerNormalization", "Sigmoid", "Erf")
# the stems stay float: ONNX node names carry the module path with "/" (torch.onnx), modules with "."
STEM = "stem"
KEEP_FLOAT_NODES = (f"/{STEM}/",)
KEEP_FLOAT_MODULES = (f".{STEM}.",)


def residual_adds(model) -> list[str]:
    """Add nodes that close a FasterNet block: one input produced by a Conv, both 4-D feature maps."""
    producers = {o: n for n in model.graph.node for o in n.output}
    names = []
    for n in model.graph.node:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        kinds = [producers[i].op_type if i in producers else "input" for i in n.input]
        if "Conv" in kinds and all(k in ("Conv", "Add", "Concat", "input", "Mul") for k in kinds):
            names.append(n.name)
    return names


def quantized_conv_nodes(model, keep_float: tuple[str, ...] = KEEP_FLOAT_NODES) -> list:
    """The Conv nodes the scheme quantizes, in graph order."""
    return [n for n in model.graph.node if n.op_type == "Conv" and not any(k in n.name for k in keep_float)]
