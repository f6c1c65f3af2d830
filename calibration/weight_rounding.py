"""Error-compensating rounding of the INT8 weights: which int8 level each weight takes, on the Q/DQ model's own grid.

Round-to-nearest rounds each weight alone. A layer's output error on its inputs X is (W - Q) X, and where the
inputs are correlated, as the three channels of a fluorescence image are, per-weight errors that are each within
half a step add up along the direction the data lives in (seen: a zoo model's fluorescence stem, its weights alone
rounded to nearest, changed 12 of 2000 decisions; rounded here, 4). GPTQ (Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023, after Optimal Brain Quantization)
rounds one input column at a time and moves the columns not yet rounded to cancel the error it made, weighed by
H = X^T X of the layer's FP32 inputs on the calibration pairs; columns are taken in order of decreasing H diagonal
("act order"). Per output channel the scale stays the one the quantizer chose (symmetric, the channel's largest
|w| / 127): TensorRT reads the same int8 weights and scales, only which level each weight takes changes.

A layer keeps its GPTQ levels only where they give a smaller output error trace((W - Q) H (W - Q)^T) on the
calibration inputs than rounding to nearest (`RoundingReport`); otherwise it keeps the nearest levels. Weights a
QAT run trained on the nearest levels are not re-rounded (calibrate passes no Hessians for QAT ranges).
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

QMAX = 127  # symmetric int8 weights (TensorRT's)
ROWS_PER_LAYER = 16384  # input rows (conv patches, matmul tokens) per layer's H: enough for its few hundred columns
DAMP = 0.01  # H's diagonal is raised by this share of its mean: an input never seen still inverts


@dataclass(frozen=True)
class WeightLayer:
    """How a Conv, MatMul or Gemm node reads its constant weight: its input activation, the weight initializer, the
    weight's layout, and for a Conv its geometry."""
    node: str
    activation: str
    weight: str
    kind: str  # "conv", "matmul" (weight (in, out)), "gemm_t" (weight (out, in), transB)
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return tuple(a.ints) if a.ints else (a.s.decode() if a.s else a.i)
    return default


def weight_layers(model) -> dict[str, WeightLayer]:
    """The 2-D convolutions, MatMuls and Gemms of `model` (names as name_nodes gives them) whose second input is an
    initializer: the layers whose weights the Q/DQ model quantizes per output channel."""
    inits = {i.name: i for i in model.graph.initializer}
    found: dict[str, WeightLayer] = {}
    for n in model.graph.node:
        if len(n.input) < 2 or n.input[1] not in inits:
            continue
        dims = tuple(inits[n.input[1]].dims)
        if n.op_type == "Conv" and len(dims) == 4 and _attr(n, "auto_pad", "NOTSET") in ("NOTSET", ""):
            found[n.name] = WeightLayer(n.name, n.input[0], n.input[1], "conv", int(_attr(n, "group", 1)), dims[2:],
                                        _attr(n, "strides", (1, 1)), _attr(n, "pads", (0, 0, 0, 0)),
                                        _attr(n, "dilations", (1, 1)))
        elif n.op_type == "MatMul" and len(dims) == 2:
            found[n.name] = WeightLayer(n.name, n.input[0], n.input[1], "matmul")
        elif n.op_type == "Gemm" and len(dims) == 2 and not _attr(n, "transA", 0):
            found[n.name] = WeightLayer(n.name, n.input[0], n.input[1], "gemm_t" if _attr(n, "transB", 0) else "matmul")
    return found


def _rows(layer: WeightLayer, x: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `rows` of the layer's input rows from one activation: conv patches at random output positions, as
    (rows, groups, Cin/groups * kh * kw), or matmul tokens as (rows, 1, in)."""
    if layer.kind != "conv":
        flat = x.reshape(-1, x.shape[-1])
        pick = rng.choice(len(flat), min(rows, len(flat)), replace=False)
        return flat[pick][:, None, :]
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel, layer.strides, layer.dilations
    t, left, b, r = layer.pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)))
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    count = min(rows, x.shape[0] * ho * wo)
    flat = rng.choice(x.shape[0] * ho * wo, count, replace=False)
    n, oy, ox = flat // (ho * wo), (flat // wo) % ho, flat % wo
    ky, kx = np.arange(kh) * dh, np.arange(kw) * dw
    ys = (oy * sh)[:, None, None] + ky[None, :, None]  # (rows, kh, 1)
    xs = (ox * sw)[:, None, None] + kx[None, None, :]  # (rows, 1, kw)
    patches = xp[n[:, None, None], :, ys, xs]  # (rows, kh, kw, C)
    patches = patches.transpose(0, 3, 1, 2)  # (rows, C, kh, kw): the weight's (Cin, kh, kw) order
    return patches.reshape(count, layer.groups, -1)


def input_hessians(onnx_path: str | Path, feeds: Iterable[dict[str, np.ndarray]], count: int,
                   layers: dict[str, WeightLayer], rows_per_layer: int = ROWS_PER_LAYER,
                   seed: int = 0) -> dict[str, np.ndarray]:
    """{node: H} with H (groups, D, D) = sum of x x^T over input rows of that layer on the FP32 graph, about
    `rows_per_layer` of them spread evenly over the `count` `feeds` (one pair each, streamed). One ONNX Runtime
    pass."""
    import onnx

    from calibration.ranges import _augmented_session

    if not count or not layers:
        return {}
    per_feed = max(1, -(-rows_per_layer // count))
    rng = np.random.default_rng(seed)
    model = onnx.load(str(onnx_path))
    graph_inputs = {i.name for i in model.graph.input}
    wanted = sorted({lay.activation for lay in layers.values()} - graph_inputs)
    hessians: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sess = _augmented_session(model, wanted, Path(tmp) / "augmented.onnx")
        names = [o.name for o in sess.get_outputs()]
        for feed in feeds:
            values = {**dict(zip(names, sess.run(None, feed))), **feed}
            for name, layer in layers.items():
                x = _rows(layer, np.asarray(values[layer.activation], np.float64), per_feed, rng)
                h = np.einsum("rgi,rgj->gij", x, x)
                hessians[name] = hessians[name] + h if name in hessians else h
    return hessians


def gptq_levels(w: np.ndarray, h: np.ndarray, scale: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Int levels (out, D) for weights `w` (out, D) on the grid `scale` (out,), rounded column by column in order
    of decreasing H diagonal, each column's error spread onto the columns after it (module docstring)."""
    w = np.asarray(w, np.float64).copy()
    h = np.asarray(h, np.float64).copy()
    s = np.where(scale > 0, scale, 1.0)[:, None]
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0  # an input never nonzero: rounded to nearest, its error moves nothing
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, order], h[np.ix_(order, order)]
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: row i's tail spreads column i's error
    q = np.zeros_like(w)
    for i in range(w.shape[1]):
        q[:, i] = np.clip(np.round(w[:, i] / s[:, 0]), -QMAX, QMAX)
        err = (w[:, i] - q[:, i] * s[:, 0]) / u[i, i]
        w[:, i + 1:] -= np.outer(err, u[i, i + 1:])
    levels = np.empty_like(q)
    levels[:, order] = q
    return levels


def output_error(w: np.ndarray, levels: np.ndarray, scale: np.ndarray, h: np.ndarray) -> float:
    """trace((W - Q) H (W - Q)^T): the summed squared output error of the rounded weights on the H inputs."""
    d = np.asarray(w, np.float64) - levels * np.asarray(scale, np.float64)[:, None]
    return float(np.einsum("oi,ij,oj->", d, h, d))


@dataclass
class RoundingReport:
    """Per layer, the output error on the calibration inputs of nearest rounding and of the levels kept."""
    layers: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        kept = sum(r["kept"] == "gptq" for r in self.layers.values())
        return {"method": "gptq (error-compensating rounding on the calibration pairs' inputs)",
                "layers_gptq": kept, "layers": len(self.layers), "per_layer": self.layers}


def _weight_dq(qmodel) -> dict[str, object]:
    """{weight-reading node: its DequantizeLinear of a constant int8 weight}."""
    producers = {o: n for n in qmodel.graph.node for o in n.output}
    inits = {i.name for i in qmodel.graph.initializer}
    found = {}
    for n in qmodel.graph.node:
        if n.op_type in ("Conv", "MatMul", "Gemm") and len(n.input) > 1:
            dq = producers.get(n.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                found[n.name] = dq
    return found


def _layer_levels(rows: np.ndarray, nearest: np.ndarray, scale: np.ndarray, h: np.ndarray,
                  groups: int) -> tuple[np.ndarray, dict]:
    """One layer's levels (out, D): GPTQ's per group where they err less than `nearest`'s, and its record."""
    per_group = rows.shape[0] // groups
    chosen = nearest.copy()
    err_nearest = err_kept = 0.0
    for g in range(groups):
        sl = slice(g * per_group, (g + 1) * per_group)
        try:
            levels = gptq_levels(rows[sl], h[g], scale[sl])
        except np.linalg.LinAlgError:
            levels = nearest[sl]
        e_near, e_gptq = output_error(rows[sl], nearest[sl], scale[sl], h[g]), output_error(
            rows[sl], levels, scale[sl], h[g])
        err_nearest += e_near
        err_kept += min(e_near, e_gptq)
        if e_gptq < e_near:
            chosen[sl] = levels
    kept = "gptq" if err_kept < err_nearest else "nearest"
    return chosen, {"kept": kept, "error_nearest": err_nearest, "error_kept": err_kept}


def round_weights(qmodel, float_weights: dict[str, np.ndarray], layers: dict[str, WeightLayer],
                  hessians: dict[str, np.ndarray], memo: dict | None = None) -> RoundingReport:
    """Rewrite, in place, the int8 weight initializers of `qmodel`'s quantized layers that have a Hessian, with
    GPTQ levels on the same per-channel scales where those give a smaller output error than nearest rounding.
    `float_weights`: {weight initializer name in the FP32 model: its float array}; `memo`: levels already found,
    by layer and scales (H is the FP32 graph's, so a layer's levels do not depend on which others are float)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in qmodel.graph.initializer}
    report = RoundingReport()
    memo = {} if memo is None else memo
    for node, dq in _weight_dq(qmodel).items():
        layer, h = layers.get(node), hessians.get(node)
        if layer is None or h is None or layer.weight not in float_weights:
            continue
        stored = numpy_helper.to_array(inits[dq.input[0]])
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64).reshape(-1)
        w = float_weights[layer.weight].astype(np.float64)
        if layer.kind == "matmul":  # (in, out): rows are output channels once transposed
            w, stored = w.T, stored.T
        rows = w.reshape(w.shape[0], -1)
        if rows.shape[0] != scale.size or stored.shape != w.shape:
            continue  # a per-tensor or otherwise laid out weight: left as quantized
        key = (node, scale.tobytes())
        if key not in memo:
            memo[key] = _layer_levels(rows, stored.reshape(rows.shape).astype(np.float64), scale, h, layer.groups)
        chosen, record = memo[key]
        if record["kept"] == "gptq":
            out = chosen.reshape(w.shape).astype(np.int8)
            if layer.kind == "matmul":
                out = out.T
            inits[dq.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(out), dq.input[0]))
        report.layers[node] = dict(record)
    return report


@dataclass(frozen=True)
class WeightRounding:
    """What GPTQ needs to re-round any Q/DQ model of one FP32 graph: its weight layers, their float weights and
    their inputs' H on the calibration pairs. Measured once per calibration; applied to every Q/DQ model the
    recipe search and the final write make (calibration.qdq.quantize_qdq)."""
    layers: dict[str, WeightLayer]
    float_weights: dict[str, np.ndarray]
    hessians: dict[str, np.ndarray]
    pairs: int
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # levels found, reused by every model

    @classmethod
    def measure(cls, onnx_path: str | Path, feeds: Iterable[dict[str, np.ndarray]], count: int) -> WeightRounding:
        """H of every weight layer's input over the `count` `feeds` (one pair each, streamed), one ONNX Runtime pass
        on the FP32 graph."""
        import onnx
        from onnx import numpy_helper

        from export.quant_scheme import name_nodes

        model = name_nodes(onnx.load(str(onnx_path)))
        layers = weight_layers(model)
        weights = {lay.weight for lay in layers.values()}
        float_weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in weights}
        return cls(layers, float_weights, input_hessians(onnx_path, feeds, count, layers), count)

    def apply(self, qmodel) -> RoundingReport:
        """Re-round `qmodel`'s int8 weights in place (round_weights)."""
        return round_weights(qmodel, self.float_weights, self.layers, self.hessians, self.memo)
