"""One pass over the FP32 ONNX -> symmetric per-tensor activation ranges (amax) for every tensor, by each method.

Our own histogram pass (HistogramRange, below) collects a histogram of |x| per tensor (symmetric: TensorRT's scales
are), binned as onnxruntime's HistogramCollector bins it, so ranges on well-behaved tensors are the ones its
calibrator gave; it is ours because that collector raised on a softmax whose values all lie within 2e-8 of 1/256
(uniform attention: numpy cannot make 2048 float32 bins over that spread), and a team's untrained or weakly trained
head gives exactly that. From the one histogram come all three methods, so the recipe chooses among them on `val`
without three passes:
- percentile: the scheme's PERCENTILE of |x| (onnxruntime's rule, clipped to the values seen);
- minmax: the largest |x| seen;
- entropy: the threshold whose 128-level quantization of the |x| histogram loses the least information
  (KL divergence), as TensorRT's entropy calibrator chooses it;
- mse: the threshold whose int8 grid (127 steps of amax / 127, clipped beyond) gives the least mean squared error
  over the histogram: rounding and clipping error weighed together (pytorch-quantization's "mse" calibrator).

Every tensor gets a finite, positive range, whatever its values (the TensorRT calibration cache lists every
activation, and a softmax feeds a quantized MatMul): a tensor whose histogram is degenerate (constant, a spread
below float32 resolution, all zero, denormal, overflowing) falls back to its largest |x| for every method, floored
at MIN_AMAX, and `ActivationRanges.fallbacks` says which and why. Non-finite values inside the graph can be
legitimate (masked attention gives -inf): such a tensor keeps the range of its finite values, and the nodes that
read it stay float (`ActivationRanges.float_nodes`). A non-finite graph input or output is bad input (RangeError,
exit 2), naming the tensor and the pair.
The tensors the inputs' first layers read (pixels, export.quant_scheme.input_layer_inputs) take their min/max
under every method: a pixel is never clipped.
From these ranges alone come both the Q/DQ model and the TensorRT calibration cache.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.data import PairReader
from edge_pfm.errors import EdgePfmError
from export.quant_scheme import PERCENTILE

METHODS = ("percentile", "entropy", "minmax", "mse")
NUM_BINS = 2048  # onnxruntime's percentile calibrator's
MAX_BINS = 64 * NUM_BINS  # a histogram that would grow past this is re-binned (onnxruntime's would allocate on)
MIN_AMAX = 1e-30  # the smallest range written: a scale of amax / 127 stays a normal float32 (TensorRT's scales)


class RangeError(EdgePfmError, ValueError):
    """Calibration data gives a graph input or output that is not finite: the pairs or the model are broken."""


class HistogramRange:
    """A running |x| histogram of one tensor over the calibration pairs, binned as onnxruntime's HistogramCollector
    bins it (NUM_BINS bins over the first chunk's |x|, widened at the same bin width when later chunks reach
    further), with its signed extremes, the non-finite values it skipped, and why it became degenerate if it did
    (then only the largest |x| is kept)."""

    def __init__(self) -> None:
        self.hist: np.ndarray | None = None
        self.edges: np.ndarray | None = None
        self.lo = np.inf  # signed extremes of the finite values
        self.hi = -np.inf
        self.non_finite = 0
        self.degenerate = ""  # why the histogram was given up ("" while it holds)

    @property
    def amax(self) -> float:
        """The largest finite |x| seen (0.0 when none)."""
        return 0.0 if self.hi < self.lo else max(abs(float(self.lo)), abs(float(self.hi)))

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values).ravel()
        finite = np.isfinite(values)
        if not finite.all():
            self.non_finite += int((~finite).sum())
            values = values[finite]
        if values.size == 0:
            return
        self.lo, self.hi = min(self.lo, values.min()), max(self.hi, values.max())
        if self.degenerate:
            return
        a = np.abs(values)
        with np.errstate(all="ignore"):
            try:
                self._bin(a)
            except (ValueError, MemoryError, FloatingPointError) as exc:
                self._give_up(f"no histogram ({str(exc).splitlines()[0][:80]})")

    def _give_up(self, why: str) -> None:
        self.degenerate, self.hist, self.edges = why, None, None

    def _bin(self, a: np.ndarray) -> None:
        top = a.max()
        if self.hist is None:
            if top == a.min():
                return self._give_up("constant" if top else "all zero")
            if top < np.finfo(np.float32).tiny:
                return self._give_up("denormal")
            hist, edges = np.histogram(a, bins=NUM_BINS)
            edges = edges.astype(a.dtype)
        else:
            edges = self.edges
            if top > edges[-1]:
                width = edges[1] - edges[0]
                grow = (float(top) - float(edges[-1])) / float(width)
                if grow > MAX_BINS:  # far beyond the first chunk's values: NUM_BINS bins over the new span
                    wide = np.linspace(edges[0], top, NUM_BINS + 1).astype(edges.dtype)
                    old = np.histogram((edges[:-1] + edges[1:]) / 2, bins=wide, weights=self.hist)[0]
                    self.hist, edges = old.astype(np.int64), wide
                else:
                    # NOTE (onnxruntime's): np.arange may create an extra bin after the one containing top
                    edges = np.hstack((edges, np.arange(edges[-1] + width, top + width, width).astype(edges.dtype)))
            if not (np.isfinite(edges).all() and (np.diff(edges) > 0).all()):
                return self._give_up("bins collapse at float32 resolution")
            hist, edges = np.histogram(a, bins=edges)
            edges = edges.astype(a.dtype)
            hist[: len(self.hist)] += self.hist
        if not (np.isfinite(edges).all() and (np.diff(edges) > 0).all()):
            return self._give_up("bins collapse at float32 resolution")
        self.hist, self.edges = hist, edges

    def ranges(self) -> dict[str, float]:
        """{method: amax}: finite and >= MIN_AMAX; every method the largest |x| where the histogram is degenerate."""
        if self.hist is None:
            amax = self.amax
            return dict.fromkeys(METHODS, max(amax, MIN_AMAX) if np.isfinite(amax) else MIN_AMAX)
        cdf = np.cumsum(self.hist / self.hist.sum())
        e = self.edges[np.searchsorted(cdf, PERCENTILE / 100.0)]
        lo, hi = (self.lo if -e < self.lo else -e), (self.hi if e > self.hi else e)  # clipped to the values seen
        out = {"percentile": max(abs(float(lo)), abs(float(hi))), "entropy": entropy_amax(self.hist, self.edges),
               "minmax": self.amax, "mse": mse_amax(self.hist, self.edges)}
        return {m: max(out[m], MIN_AMAX) for m in METHODS}

    @property
    def fallback(self) -> str:
        """Why this tensor's range is its largest |x| (or the floor) rather than its histogram's; "" if it is not."""
        if self.hist is not None:
            return ""
        if self.hi < self.lo:
            return f"no finite value: range floored at {MIN_AMAX:g}"
        why = self.degenerate or "no values"
        return f"{why}: range = largest |x| ({max(self.amax, MIN_AMAX):.3g})"


@dataclass
class ActivationRanges(Mapping):
    """{method: {tensor: amax}} for every method and activation tensor (graph order), with what was not ordinary:
    `fallbacks` {tensor: why its range is its largest |x|}, `non_finite` {tensor: non-finite values seen} (inside
    the graph only), `float_nodes` the quantizable nodes that read a non-finite tensor and so stay float."""

    by_method: dict[str, dict[str, float]]
    fallbacks: dict[str, str] = field(default_factory=dict)
    non_finite: dict[str, int] = field(default_factory=dict)
    float_nodes: list[str] = field(default_factory=list)

    def __getitem__(self, method: str) -> dict[str, float]:
        return self.by_method[method]

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_method)

    def __len__(self) -> int:
        return len(self.by_method)

    def notes(self) -> dict:
        """The report's record of them (calibration.json, accuracy.json)."""
        return {"fallbacks": dict(self.fallbacks), "non_finite": dict(self.non_finite),
                "float_nodes": list(self.float_nodes)}


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


def mse_amax(hist: np.ndarray, edges: np.ndarray, levels: int = 127, candidates: int = 256) -> float:
    """The clipping threshold of an |x| histogram whose symmetric int8 grid (step amax / levels, values beyond amax
    clipped to it) has the least mean squared error, each bin's count taken at its centre. Thresholds are bin
    edges from 1/16 of the range up, about `candidates` of them evenly spaced (the last edge always tried)."""
    hist = hist.astype(np.float64)
    if hist.sum() == 0:
        return float(edges[-1])
    occupied = hist > 0
    centres = ((edges[:-1] + edges[1:]) / 2).astype(np.float64)[occupied]
    counts = hist[occupied]
    n = len(hist)
    stride = max(1, n // candidates)
    tries = np.unique(np.r_[np.arange(max(1, n // 16), n, stride), n])
    best_err, best_t = np.inf, float(edges[-1])
    for block in np.array_split(tries, max(1, len(tries) // 32)):  # 32 thresholds at a time: bounded memory
        t = edges[block].astype(np.float64)[:, None]
        step = t / levels
        q = np.minimum(np.round(centres[None, :] / step), levels) * step
        err = ((centres[None, :] - q) ** 2 * counts[None, :]).sum(1)
        k = int(np.argmin(err))
        if err[k] < best_err:
            best_err, best_t = float(err[k]), float(t[k, 0])
    return best_t


def _augmented_session(model, tensors: list[str], path: Path):
    """An ONNX Runtime session of `model` whose outputs are `tensors` (graph optimisation off: the values are the
    unfused graph's, as onnxruntime's calibrators see them)."""
    import onnx
    import onnxruntime as ort

    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    present = {o.name for o in aug.graph.output}
    inputs = {i.name for i in aug.graph.input}
    aug.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                            for t in tensors if t not in present and t not in inputs)
    onnx.save(aug, str(path), save_as_external_data=aug.ByteSize() > 1_800_000_000)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compute_all_ranges(onnx_path: str | Path, reader: PairReader, chunk: int = 64) -> ActivationRanges:
    """-> ActivationRanges: {method: {tensor: amax}} for every method in METHODS and every activation tensor, in
    graph order, from one pass over `reader` (module docstring)."""
    import onnx

    from export.quant_scheme import QUANTIZABLE_OPS, input_layer_inputs, name_nodes

    model = name_nodes(onnx.load(str(onnx_path)))
    order = activation_tensors(onnx_path)
    pixels = set(input_layer_inputs(model))
    inputs = [i.name for i in model.graph.input if i.name in set(order)]
    outputs = {o.name for o in model.graph.output}
    observed = [t for t in order if t not in set(inputs)]
    stats = {t: HistogramRange() for t in order}
    with tempfile.TemporaryDirectory() as tmp:
        sess = _augmented_session(model, observed, Path(tmp) / "augmented.onnx")
        names = [o.name for o in sess.get_outputs()]
        for sub in reader.chunks(chunk):  # in chunks: each is folded into the histograms, bounding memory
            collected: dict[str, list[np.ndarray]] = {t: [] for t in order}
            first = sub.served  # the chunk's first pair, counted over the whole reader
            for k, feed in enumerate(sub):
                values = dict(zip(names, sess.run(None, feed)))
                values.update(feed)
                for t in inputs + [o for o in outputs if o in values]:
                    if not np.isfinite(values[t]).all():
                        where = "graph input" if t in inputs else "graph output"
                        raise RangeError(
                            f"calibration pair {reader.describe(first + k)}: {where} {t!r} is "
                            "not finite (NaN or inf): check those image files (truncated, all black, another "
                            "format), and that the model gives finite outputs on ordinary pairs")
                for t in order:
                    collected[t].append(values[t])
            for t in order:
                if collected[t]:
                    stats[t].add(np.concatenate([np.ravel(v) for v in collected[t]]))
    by_method = {m: {t: stats[t].ranges()["minmax" if t in pixels else m] for t in order} for m in METHODS}
    non_finite = {t: s.non_finite for t, s in stats.items() if s.non_finite}
    readers = [n.name for n in model.graph.node
               if n.op_type in (*QUANTIZABLE_OPS, "Add") and any(i in non_finite for i in n.input)]
    return ActivationRanges(by_method, {t: s.fallback for t, s in stats.items() if s.fallback}, non_finite, readers)


def compute_ranges(onnx_path: str | Path, reader: PairReader, method: str = "percentile",
                   chunk: int = 64) -> dict[str, float]:
    """-> {tensor name: amax} by `method` for every activation tensor, in graph order."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {METHODS}")
    return compute_all_ranges(onnx_path, reader, chunk)[method]
