"""Which datatype each engine layer runs in, read from a TensorRT build log.

Built with `profiling_verbosity = DETAILED`, TensorRT logs the final engine's layers at the end of the
build. That is the proof that an INT8 model really runs INT8 kernels (a Q/DQ model that parses can still
fall back to float). Two log formats:

- TensorRT-RTX (and TensorRT 11's compiler backend): one "Layers:" message, a line per layer
  `Name: ..., LayerType: ..., Inputs: [ { Name: ..., Datatype: Int8, ... } ], ...`;
- TensorRT 8.6-10.x: "Engine Layer Information:" then a line per layer
  `Layer(CaskConvolution): name, Tactic: 0x..., in (Int8[1,16:4,32,32]) -> out (Float[...])`.

A layer's datatype is the datatype of its first input (its output's for a layer without inputs);
layers that move no tensors (shape calls, stream signals) are not counted.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

DATATYPES = ("Int8", "Half", "Float", "BFloat16", "FP8", "Int4", "FP4", "Int32", "Int64", "Bool", "UInt8")
_RTX_TENSOR = re.compile(r"Datatype: (\w+)")
_RTX_SECTION = re.compile(r"(Inputs|Constants|Outputs): \[(.*?)\](?=, (?:Constants|Outputs|TacticName))")
_TRT_TENSOR = re.compile(r"\((" + "|".join(DATATYPES) + r")\[")
# the engine's convolution and matrix-multiply layers: where INT8 pays off
COMPUTE_LAYER_TYPES = ("correlation", "gemm", "CaskConvolution", "CaskGemmConvolution", "CaskFlattenConvolution",
                       "CudnnConvolution", "gemm_mha", "CaskGemm", "Convolution", "MatrixMultiply")


@dataclass
class LayerCensus:
    """Counts of engine layers by the datatype they run in."""

    layers: Counter = field(default_factory=Counter)  # all layers
    compute_layers: Counter = field(default_factory=Counter)  # convolutions and matrix multiplies only
    log_format: str = ""

    @property
    def total(self) -> int:
        return sum(self.layers.values())

    def to_dict(self) -> dict:
        return {"layers": self.total, "by_datatype": dict(sorted(self.layers.items())),
                "compute_by_datatype": dict(sorted(self.compute_layers.items())), "log_format": self.log_format}


def _rtx_layer(line: str) -> tuple[str, str | None]:
    kind = re.search(r"LayerType: ([^,]+)", line)
    sections = {name: _RTX_TENSOR.findall(body) for name, body in _RTX_SECTION.findall(line)}
    types = sections.get("Inputs") or sections.get("Outputs") or []
    return (kind.group(1).strip() if kind else "?"), (types[0] if types else None)


def _trt_layer(line: str) -> tuple[str, str | None]:
    kind = re.match(r"\s*Layer\(([^)]+)\)", line)
    types = _TRT_TENSOR.findall(line)
    return (kind.group(1) if kind else "?"), (types[0] if types else None)


def census_from_log(messages: list[str]) -> LayerCensus | None:
    """-> the census of the last engine-layer listing in `messages`, or None if the log has none
    (profiling verbosity below DETAILED, or a log format this parser does not know)."""
    census = None
    for msg in messages:
        if msg.startswith("Layers:\n"):
            census, lines, parse = LayerCensus(log_format="tensorrt-rtx"), msg.splitlines()[1:], _rtx_layer
        elif msg.startswith("Engine Layer Information:"):
            census, lines, parse = LayerCensus(log_format="tensorrt"), msg.splitlines()[1:], _trt_layer
        else:
            continue
        for line in lines:
            if not line.strip():
                continue
            kind, dtype = parse(line)
            if dtype is None:
                continue
            census.layers[dtype] += 1
            if kind in COMPUTE_LAYER_TYPES:
                census.compute_layers[dtype] += 1
    return census
