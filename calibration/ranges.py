"""One pass over the FP32 ONNX -> symmetric per-tensor activation ranges (amax) for every tensor.

onnxruntime's calibrators do the pass (symmetric=True: their default asymmetric ranges would
be wrong for TensorRT, whose scales are symmetric). From these ranges alone come both the Q/DQ
model and the TensorRT calibration cache.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from calibration.data import PairReader
from export.quant_scheme import PERCENTILE

METHODS = ("entropy", "percentile", "minmax")


def activation_tensors(onnx_path: str | Path) -> list[str]:
    """Every float activation tensor of the graph: graph inputs and node outputs (not weights)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input,
                                                              *model.graph.output]}
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    for node in model.graph.node:
        names += [o for o in node.output if o and types.get(o) == onnx.TensorProto.FLOAT]
    return list(dict.fromkeys(names))


def _constant_amax(onnx_path: str | Path) -> dict[str, float]:
    import onnx
    from onnx import numpy_helper

    out = {}
    for node in onnx.load(str(onnx_path)).graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == onnx.TensorProto.FLOAT:
                    out[node.output[0]] = float(np.abs(numpy_helper.to_array(a.t)).max(initial=0.0))
    return out


def compute_ranges(onnx_path: str | Path, reader: PairReader, method: str = "entropy",
                   chunk: int = 64) -> dict[str, float]:
    """-> {tensor name: amax} for every activation tensor, in graph order."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    calib_method = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile,
                    "minmax": CalibrationMethod.MinMax}[method]
    extra = {"symmetric": True}
    if method == "percentile":
        extra["percentile"] = PERCENTILE
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(str(onnx_path), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=calib_method, providers=["CPUExecutionProvider"],
                                       extra_options=extra)
        # in chunks: histogram calibrators fold each chunk into their histograms, bounding memory
        for sub in reader.chunks(chunk):
            calibrator.collect_data(sub)
        tensors = calibrator.compute_data()
    amax = {}
    for name, data in tensors.items():
        lo, hi = (float(np.asarray(v).max()) if np.ndim(v) else float(v) for v in data.range_value)
        amax[name] = max(abs(lo), abs(hi))
    amax.update({k: v for k, v in _constant_amax(onnx_path).items() if k not in amax})
    order = activation_tensors(onnx_path)
    missing = [n for n in order if n not in amax]
    if missing:
        raise RuntimeError(f"calibration produced no range for {len(missing)} tensors, e.g. {missing[:5]}")
    return {n: amax[n] for n in order}
