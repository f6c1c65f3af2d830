"""The INT8 quantization scheme, defined once: what the Q/DQ model quantizes (calibration.qdq) and what QAT
fake-quantizes (export.qat) read it here, so the two can never drift apart. ONNX-only, no torch.

- Conv, MatMul and Gemm inputs and weights are quantized (int8 symmetric; weights per output channel). Each
  input's first such layer (a branch's stem: it sees raw pixels), found from the graph so a team's model needs no
  naming rule, is quantized only where its weights take error-compensating levels (calibration.weight_rounding,
  calibration's default), with its pixel input's range at the pixels' min/max (never clipped); where weights are
  rounded to nearest (QAT, `--weight-rounding nearest`) it stays float. Measured on a zoo model: its fluorescence
  stem's weights rounded to nearest changed 12 of 2000 decisions (the three channels of one fluorescence signal
  are correlated, so per-weight errors add up), GPTQ's levels 2 with both stems in Int8; quantizing the pixels
  themselves at min/max moved none. The recipe search may still keep a stem float, as any layer. MatMul/Gemm are the attention and MLP layers, which TensorRT runs in Int8 when both inputs
  come through Q/DQ;
- the Adds that close a FasterNet block or a channel gate are quantized (both inputs), so TensorRT fuses them;
- Softmax, LayerNormalization, Sigmoid and Erf (GELU) stay float: INT8 there costs accuracy and saves nothing;
- only inputs are quantized, never a layer's output as such (TensorRT's placement: Q/DQ on the inputs of weighted
  layers; a tensor that feeds a quantized layer gets its Q/DQ as that layer's input). onnxruntime's quantizer also
  quantizes each quantized node's output: on the graph's logits that rounded near-ties together (a team's model:
  12 of 3000 decisions flipped by that alone, 28 -> 19 of 3000 without it);
- activation ranges clip at the 99.999th percentile of |x| (PTQ and QAT alike).
"""
from __future__ import annotations

PERCENTILE = 99.999
QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")
# Measured (TensorRT-RTX census, ONNX Runtime agreement): on examples/their_pfm.py Conv only ran 6 of 11
# conv/matmul engine layers in Int8 (agreement 98.25 % of 400), Conv+MatMul+Gemm 14 of 16 (98.50 %); on our
# pfm_tiny 51 of 58 vs 58 of 60, both 99.70 % of 1000 synthetic pairs.
DEFAULT_QUANTIZED_OPS = QUANTIZABLE_OPS
# QAT (export.qat) fake-quantizes convolutions and the residual adds only: a bundle calibrated with QAT ranges
# quantizes exactly what QAT trained, so the fine-tuned weights meet the grid they were trained on.
QAT_QUANTIZED_OPS = ("Conv",)
# whose outputs the quantizer leaves float (calibration.qdq): every op it quantizes
OUTPUT_FLOAT_OPS = (*QUANTIZABLE_OPS, "Add")
FLOAT_OPS = ("Softmax", "LayerNormalization", "Sigmoid", "Erf")
# QAT works on our PyTorch modules, where the stems are named: the same convs input_layers finds in the graph
KEEP_FLOAT_MODULES = (".stem.",)


def name_nodes(model):
    """Name every unnamed node `<op>_<index>` in place (the quantizer and these rules refer to nodes by name);
    -> the model."""
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    return model


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


def input_layers(model) -> list[str]:
    """The first Conv, MatMul or Gemm reached from each graph input (through slicing, casts, elementwise ops): the
    layers that see raw pixels (a conv stem, or a linear patch embedding), float unless their weights take
    error-compensating levels (module docstring). Node names as in the graph
    (unnamed nodes named by name_nodes first)."""
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    found: list[str] = []
    for graph_input in model.graph.input:
        seen, frontier = set(), [graph_input.name]
        while frontier:
            tensor = frontier.pop(0)
            for n in readers.get(tensor, []):
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if n.op_type not in QUANTIZABLE_OPS:
                    frontier.extend(n.output)
                elif n.name not in found:
                    found.append(n.name)
    return found


def input_layer_inputs(model) -> list[str]:
    """The tensors the input layers read (pixels, or pixels through slicing and elementwise ops): their ranges are
    their min/max whatever the method, so a pixel is never clipped."""
    first = set(input_layers(model))
    return list(dict.fromkeys(n.input[0] for n in model.graph.node if n.name in first))


def quantized_conv_nodes(model) -> list:
    """The Conv nodes QAT quantizes (the stems stay float: QAT's weights are rounded to nearest), graph order."""
    keep = set(input_layers(model))
    return [n for n in model.graph.node if n.op_type == "Conv" and n.name not in keep]
