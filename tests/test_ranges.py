"""The range pass on activations that break naive calibration: every tensor gets a finite, positive range, a
degenerate histogram falls back to its largest |x| and says so, a non-finite tensor inside the graph keeps float
readers, and a non-finite graph input or output is bad input that names the pair's files."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from calibration.data import PairReader, dataset_pairs
from calibration.qdq import quantize_qdq
from calibration.ranges import METHODS, MIN_AMAX, HistogramRange, RangeError, compute_all_ranges
from edge_pfm.preprocess import PreprocessSpec
from edge_pfm.synthetic import write_dataset

SPECS = {m: PreprocessSpec(size=(64, 64)) for m in ("white_light", "fluorescence")}
NAMES = {"white_light": "white", "fluorescence": "fluo"}


class Adversarial(nn.Module):
    """Each construct that broke or could break a naive range pass: near-uniform attention over 256 tokens (every
    value within float resolution of 1/256, the crash of issue 39), softmax over one token (exactly 1.0), a constant
    zero branch, a tensor of 1e-30 values, masked attention (-inf inside the graph); `blow_up` divides by the
    white frame's brightest normalised value, so a black frame gives a non-finite output."""

    def __init__(self, blow_up: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.cw, self.cf = nn.Conv2d(3, 8, 4, stride=4), nn.Conv2d(3, 8, 4, stride=4)  # 64x64 -> 16x16: 256 tokens
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        with torch.no_grad():
            self.q.weight.mul_(1e-6)
            self.q.bias.zero_()
        self.one = nn.Linear(8, 8)
        self.gate = nn.Parameter(torch.zeros(1, 8, 1, 1))  # a branch switched off: all zero
        self.head = nn.Linear(24, 4)
        self.register_buffer("mask", torch.triu(torch.full((256, 256), float("-inf")), 1))
        self.blow_up = blow_up

    def forward(self, white: torch.Tensor, fluo: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.cw(white)), torch.relu(self.cf(fluo)) * self.gate
        tok = a.flatten(2).transpose(1, 2)  # (B, 256, 8)
        uniform = torch.softmax(self.q(tok) @ self.k(tok).transpose(1, 2), -1) @ tok
        masked = torch.softmax(self.q(tok) @ self.k(tok).transpose(1, 2) * 1e3 + self.mask, -1) @ tok
        pooled = tok.mean(1, keepdim=True)  # one token attends to itself: softmax of one score is 1.0
        single = torch.softmax(self.one(pooled) @ pooled.transpose(1, 2), -1) @ pooled
        tiny = uniform.mean(1) * 1e-30
        feats = torch.cat([uniform.mean(1) + tiny + b.mean((2, 3)), masked.mean(1), single[:, 0]], 1)
        logits = self.head(feats)
        return logits / torch.relu(white).amax() if self.blow_up else logits


def _export(model: nn.Module, path) -> str:
    x = torch.rand(1, 3, 64, 64)
    torch.onnx.export(model.eval(), (x, x), str(path), dynamo=False, opset_version=17, input_names=["white", "fluo"],
                      output_names=["logits"], dynamic_axes={k: {0: "N"} for k in ("white", "fluo", "logits")})
    return str(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adversarial") / "data"
    write_dataset(root, 12, seed=5, size=(96, 96))
    return root


def test_every_tensor_gets_a_finite_range_and_degenerate_ones_say_why(pairs, tmp_path):
    path = _export(Adversarial(), tmp_path / "adversarial.onnx")
    reader = PairReader(dataset_pairs(pairs)[0], SPECS, NAMES)
    ranges = compute_all_ranges(path, reader, chunk=5)  # chunks of 5: the histograms are merged across chunks
    assert list(ranges) == list(METHODS)
    for method in METHODS:
        values = np.array(list(ranges[method].values()))
        assert np.isfinite(values).all() and (values >= MIN_AMAX).all(), method
    why = ranges.fallbacks
    softmaxes = [t for t in ranges["minmax"] if "Softmax" in t]
    assert len(softmaxes) == 3
    # the near-uniform softmax over 256 tokens: within float32 resolution of 1/256 (onnxruntime's collector raised)
    assert any(t in why and abs(ranges["percentile"][t] - 1 / 256) < 1e-6 for t in softmaxes), why
    # the one-token softmax: exactly 1.0, its range 1.0 by every method
    assert any(why.get(t, "").startswith("constant") and all(ranges[m][t] == 1.0 for m in METHODS)
               for t in softmaxes), why
    zero = [t for t, w in why.items() if w.startswith("all zero")]
    assert zero and all(ranges["minmax"][t] == MIN_AMAX for t in zero)  # the switched-off branch: the floor
    assert any(1e-31 < ranges["minmax"][t] < 1e-29 for t in ranges["minmax"])  # the 1e-30 tensor keeps its scale
    # the pixels the inputs' first convs read: their min/max by every method (never clipped), and distinct from
    # what percentile gives the tensors after them
    pixels = ["white", "fluo"]
    assert all(ranges[m][t] == ranges["minmax"][t] for m in METHODS for t in pixels)
    # masked attention: -inf inside the graph is legitimate; the tensor keeps its finite values' range, and the
    # nodes that read it stay float in the Q/DQ model
    assert ranges.non_finite and all(np.isfinite(ranges["minmax"][t]) for t in ranges.non_finite)
    qmodel = quantize_qdq(path, ranges["percentile"], tmp_path / "q.onnx", float_nodes=tuple(ranges.float_nodes))
    for node in qmodel.graph.node:
        if node.name in ranges.float_nodes:
            assert not any(i.endswith("_DequantizeLinear_Output") for i in node.input), node.name


def test_a_non_finite_output_is_bad_input_naming_the_pairs_files(pairs, tmp_path):
    path = _export(Adversarial(blow_up=True), tmp_path / "blow_up.onnx")
    sample = sorted((pairs / "white").iterdir())[7]
    black = np.zeros_like(cv2.imread(str(sample)))
    bad = tmp_path / "data"
    import shutil

    shutil.copytree(pairs, bad)
    cv2.imwrite(str(bad / "white" / sample.name), black)
    with pytest.raises(RangeError, match=rf"{sample.stem}.*graph output 'logits' is not finite") as err:
        compute_all_ranges(path, PairReader(dataset_pairs(bad)[0], SPECS, NAMES), chunk=5)
    assert err.value.exit_code == 2 and str(bad / "white" / sample.name) in str(err.value)


_finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
_anything = st.floats(width=32)  # NaN, inf, subnormals, 3.4e38


@st.composite
def _chunks(draw):
    """Chunks of activations as a range pass meets them: a base value with a spread from zero to far below its
    float resolution, a scale from denormal to 1e30, constant stretches, zeros, and stray non-finite values."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 300))
        base = draw(_finite)
        spread = draw(st.sampled_from([0.0, 1e-12, 1e-8, 1e-3, 1.0, 1e30]))
        scale = draw(st.sampled_from([1e-45, 1e-38, 1e-30, 1.0, 1e30]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        with np.errstate(all="ignore"):
            x = ((base + spread * rng.standard_normal(n)) * scale).astype(np.float32)
        if draw(st.booleans()):
            x[: draw(st.integers(0, n))] = 0.0
        for v in draw(st.lists(_anything, max_size=3)):
            x[draw(st.integers(0, n - 1))] = v
        out.append(x)
    return out


@settings(max_examples=300, deadline=None)
@given(_chunks())
def test_any_activations_give_finite_positive_ranges(chunks):
    h = HistogramRange()
    for x in chunks:
        h.add(x)
    r = h.ranges()
    finite = np.concatenate([x[np.isfinite(x)] for x in chunks])
    largest = float(np.abs(finite.astype(np.float64)).max()) if finite.size else 0.0
    assert set(r) == set(METHODS)
    assert all(np.isfinite(v) and v >= MIN_AMAX for v in r.values()), (r, h.fallback)
    assert r["minmax"] == pytest.approx(max(largest, MIN_AMAX), rel=1e-6)
    assert r["percentile"] <= r["minmax"] * (1 + 1e-6)  # a percentile never reaches past the values seen
    assert h.non_finite == sum(int((~np.isfinite(x)).sum()) for x in chunks)
    if h.fallback:  # a fallback is the largest |x| for every method, and says why
        assert len(set(r.values())) == 1 and ":" in h.fallback
