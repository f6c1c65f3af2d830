"""One pass over the FP32 ONNX -> symmetric per-tensor activation ranges (amax) for every tensor, by each method.

onnxruntime's histogram calibrator does the pass, collecting a histogram of |x| per tensor (symmetric: TensorRT's
scales are). From that one histogram come all three methods, so the recipe can choose among them on `val`
without three passes:
- percentile: onnxruntime's, at the scheme's PERCENTILE of |x|;
- minmax: the largest |x| seen;
- entropy: the threshold whose 128-level quantization of the |x| histogram loses the least information
  (KL divergence), as TensorRT's entropy calibrator chooses it.
From these ranges alone come both the Q/DQ model and the TensorRT calibration cache.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from calibration.data import PairReader
from export.quant_scheme import PERCENTILE

METHODS = ("percentile", "entropy", "minmax")


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


def entropy_amax(hist: np.ndarray, edges: np.ndarray, levels: int = 128, stride: int = 16) -> float:
    """The clipping threshold of an |x| histogram that minimises KL(P || Q): P the histogram clipped at the
    threshold (the clipped mass in its last bin), Q that clipped histogram merged into `levels` bins and spread back
    over the non-empty bins. Thresholds are tried every `stride` bins."""
    hist = hist.astype(np.float64)
    n = len(hist)
    if n <= levels or hist.sum() == 0:
        return float(edges[-1])
    best_kl, best_i = np.inf, n
    tail = np.cumsum(hist[::-1])[::-1]  # tail[i]: mass at and above bin i
    occupied = hist > 0
    for i in range(levels, n + 1, stride):
        p = hist[:i].copy()
        if i < n:
            p[-1] += tail[i]
        sizes = np.full(levels, i // levels)
        sizes[: i % levels] += 1  # np.array_split's groups: the larger ones first
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        sums = np.add.reduceat(hist[:i], starts)
        counts = np.add.reduceat(occupied[:i].astype(np.float64), starts)
        q = np.repeat(np.divide(sums, counts, out=np.zeros(levels), where=counts > 0), sizes) * occupied[:i]
        nonzero = p > 0
        if (nonzero & (q <= 0)).any():  # P has mass where Q has none: infinite divergence
            continue
        ps, qs = p[nonzero] / p.sum(), q[nonzero] / q.sum()
        kl = float(np.sum(ps * np.log(ps / qs)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[min(best_i, n)])


def compute_all_ranges(onnx_path: str | Path, reader: PairReader, chunk: int = 64) -> dict[str, dict[str, float]]:
    """-> {method: {tensor name: amax}} for every method in METHODS and every activation tensor, in graph order,
    from one pass over `reader`."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(str(onnx_path), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.Percentile,
                                       providers=["CPUExecutionProvider"],
                                       extra_options={"symmetric": True, "percentile": PERCENTILE})
        # in chunks: the calibrator folds each chunk into its histograms, bounding memory
        for sub in reader.chunks(chunk):
            calibrator.collect_data(sub)
        percentile = calibrator.compute_data()
        histograms = dict(calibrator.collector.histogram_dict)
    out: dict[str, dict[str, float]] = {"percentile": {}, "minmax": {}, "entropy": {}}
    for name, data in percentile.items():
        lo, hi = (float(np.asarray(v).max()) if np.ndim(v) else float(v) for v in data.range_value)
        out["percentile"][name] = max(abs(lo), abs(hi))
    for name, (hist, edges, lo, hi) in histograms.items():
        out["minmax"][name] = max(abs(float(lo)), abs(float(hi)))
        out["entropy"][name] = entropy_amax(np.asarray(hist), np.asarray(edges))
    constants = _constant_amax(onnx_path)
    order = activation_tensors(onnx_path)
    for method, amax in out.items():
        amax.update({k: v for k, v in constants.items() if k not in amax})
        missing = [n for n in order if n not in amax]
        if missing:
            raise RuntimeError(f"calibration produced no {method} range for {len(missing)} tensors, e.g. {missing[:5]}")
        out[method] = {n: amax[n] for n in order}
    return {m: out[m] for m in METHODS}


def compute_ranges(onnx_path: str | Path, reader: PairReader, method: str = "percentile",
                   chunk: int = 64) -> dict[str, float]:
    """-> {tensor name: amax} by `method` for every activation tensor, in graph order."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    return compute_all_ranges(onnx_path, reader, chunk)[method]
