"""The bundle's per-precision references: what each of its models must output on a fixed set of scene pairs, and
how far an engine of that precision may stray before it is refused.

    reference.inputs.npz   white_light, fluorescence: (N, C, h, w) uint8 model pixels (edge_pfm.preprocess's
                           model_pixels; normalise() of them is exactly the model input)
    reference.fp32.npz     logits (N, classes) [, lesion_map (N, 1, h, w)]: ONNX Runtime CPU on model.onnx
    reference.fp16.npz     ... on model.fp16.onnx
    reference.int8.npz     ... on model.int8.onnx

The manifest's `references` entry names them and holds each precision's `Tolerance`; every file is an artifact, so
its sha256 is checked before it is read. `compare` gives the figures an engine is judged on; `check_backend` runs
the pairs through any backend (ONNX Runtime here, TensorRT on the device) at batch 1, as the runtime feeds it.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edge_pfm.bundle import Bundle, BundleError
from edge_pfm.decision import softmax
from edge_pfm.preprocess import normalise

INPUTS_ARTIFACT = "reference.inputs.npz"
MIN_PAIRS = 256  # fewer cannot tell a subtle fault from noise (calibration writes this many, or all it has)
MAP_THRESHOLD = 0.5


def outputs_artifact(precision: str) -> str:
    return f"reference.{precision}.npz"


@dataclass(frozen=True)
class Tolerance:
    """How far an engine may stray from its precision's reference (written by the build machine, with its basis)."""

    min_top1_agreement: float
    max_prob_diff: float  # largest |softmax difference| over every pair and class
    max_logit_rmse: float  # root mean square logit difference over every pair and class
    min_map_iou: float | None = None  # lesion cells above the map threshold, pooled over the pairs

    @classmethod
    def from_dict(cls, d: dict) -> Tolerance:
        return cls(float(d["min_top1_agreement"]), float(d["max_prob_diff"]), float(d["max_logit_rmse"]),
                   None if d.get("min_map_iou") is None else float(d["min_map_iou"]))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Figures:
    pairs: int
    top1_agreement: float
    disagreements: int
    max_prob_diff: float
    logit_rmse: float
    map_iou: float | None = None
    map_max_diff: float | None = None

    def failures(self, tol: Tolerance) -> list[str]:
        out = []
        if self.top1_agreement < tol.min_top1_agreement:
            out.append(f"top-1 agreement {self.top1_agreement:.2%} ({self.disagreements} of {self.pairs} differ) < "
                       f"{tol.min_top1_agreement:.2%}")
        if self.max_prob_diff > tol.max_prob_diff:
            out.append(f"max probability difference {self.max_prob_diff:.4f} > {tol.max_prob_diff:.4f}")
        if self.logit_rmse > tol.max_logit_rmse:
            out.append(f"logit RMSE {self.logit_rmse:.4f} > {tol.max_logit_rmse:.4f}")
        if tol.min_map_iou is not None and self.map_iou is not None and self.map_iou < tol.min_map_iou:
            out.append(f"lesion-map IoU {self.map_iou:.3f} < {tol.min_map_iou:.3f}")
        return out

    def describe(self) -> str:
        text = (f"top-1 {self.top1_agreement:.2%} ({self.disagreements}/{self.pairs} differ), max |dp| "
                f"{self.max_prob_diff:.4f}, logit RMSE {self.logit_rmse:.4f}")
        return text + (f", map IoU {self.map_iou:.3f}" if self.map_iou is not None else "")

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def compare(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> Figures:
    """Outputs of N pairs (logits (N, K) [, lesion_map]) against their reference -> the figures."""
    ref, out = np.asarray(reference["logits"], np.float64), np.asarray(got["logits"], np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"logits of shape {out.shape} do not match the reference's {ref.shape}")
    agree = ref.argmax(1) == out.argmax(1)
    pr, po = softmax(ref), softmax(out)
    iou = map_diff = None
    if "lesion_map" in reference and "lesion_map" in got:
        a, b = reference["lesion_map"] >= MAP_THRESHOLD, got["lesion_map"] >= MAP_THRESHOLD
        union = int((a | b).sum())
        iou = float((a & b).sum() / union) if union else 1.0
        map_diff = float(np.abs(np.asarray(reference["lesion_map"], np.float64) - got["lesion_map"]).max())
    return Figures(len(ref), float(agree.mean()), int((~agree).sum()), float(np.abs(pr - po).max()),
                   float(np.sqrt(np.mean((ref - out) ** 2))), iou, map_diff)


@dataclass
class EngineCheck:
    """The verdict on one engine (or ONNX Runtime session) against its precision's reference."""

    precision: str
    passed: bool
    figures: Figures | None
    tolerance: Tolerance | None
    failures: list[str] = field(default_factory=list)
    references_sha256: str = ""  # the reference outputs it was checked against
    engine_sha256: str = ""  # the engine it was checked on
    seconds: float = 0.0
    checked_utc: str = ""

    def describe(self) -> str:
        if self.figures is None:
            return f"{self.precision}: {'; '.join(self.failures)}"
        verdict = "passed" if self.passed else "REFUSED: " + "; ".join(self.failures)
        return f"{self.precision} against its reference: {self.figures.describe()}: {verdict}"

    def to_dict(self) -> dict:
        return {"precision": self.precision, "passed": self.passed,
                "figures": self.figures.to_dict() if self.figures else None,
                "tolerance": self.tolerance.to_dict() if self.tolerance else None, "failures": list(self.failures),
                "references_sha256": self.references_sha256, "engine_sha256": self.engine_sha256,
                "seconds": round(self.seconds, 3),
                "checked_utc": self.checked_utc}

    @classmethod
    def from_dict(cls, d: dict) -> EngineCheck:
        return cls(d["precision"], bool(d["passed"]), Figures(**d["figures"]) if d.get("figures") else None,
                   Tolerance.from_dict(d["tolerance"]) if d.get("tolerance") else None, list(d.get("failures", [])),
                   d.get("references_sha256", ""), d.get("engine_sha256", ""), float(d.get("seconds", 0.0)),
                   d.get("checked_utc", ""))


class References:
    """A bundle's references, read (after Bundle.load has checked their sha256) without pickles."""

    def __init__(self, bundle: Bundle):
        entry = bundle.manifest.get("references")
        if not entry or not bundle.has(INPUTS_ARTIFACT):
            raise BundleError(f"{bundle.root} carries no reference outputs, so no engine built from it can be checked "
                              "before use; re-export it (python -m export ...) or re-calibrate it (python -m "
                              "calibration --bundle ...) with this edge-pfm")
        self.bundle, self.entry = bundle, entry
        self.precisions: dict[str, dict] = dict(entry.get("precisions", {}))
        self._inputs: dict[str, np.ndarray] | None = None

    def has(self, precision: str) -> bool:
        return precision in self.precisions and self.bundle.has(outputs_artifact(precision))

    def require(self, precision: str) -> None:
        """Raise BundleError naming the fix when this precision has no reference (before anything is built)."""
        if not self.has(precision):
            raise BundleError(f"{self.bundle.root} has no {precision} reference ({outputs_artifact(precision)}), so a "
                              f"{precision} engine cannot be checked before use; calibrate the bundle with this "
                              f"edge-pfm (python -m calibration --bundle {self.bundle.root} ...)")

    def tolerance(self, precision: str) -> Tolerance:
        return Tolerance.from_dict(self.precisions[precision]["tolerance"])

    def sha256(self, precision: str) -> str:
        return self.bundle.sha256(outputs_artifact(precision))

    @property
    def pixels(self) -> dict[str, np.ndarray]:
        if self._inputs is None:
            with np.load(self.bundle.root / INPUTS_ARTIFACT, allow_pickle=False) as z:
                self._inputs = {m: z[m] for m in ("white_light", "fluorescence")}
        return self._inputs

    def outputs(self, precision: str) -> dict[str, np.ndarray]:
        with np.load(self.bundle.root / outputs_artifact(precision), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def run(self, infer_outputs: Callable[..., dict], batch: int = 1) -> dict[str, np.ndarray]:
        return run_pairs(infer_outputs, self.pixels, self.bundle.preprocessing, batch)


def run_pairs(infer_outputs: Callable[..., dict], pixels: dict[str, np.ndarray], specs: dict, batch: int = 1
              ) -> dict[str, np.ndarray]:
    """Every pair of `pixels` (uint8 model pixels per modality) through `infer_outputs(white, fluo) -> {name: array}`,
    `batch` pairs at a time: an engine with a fixed batch (DLA) gets its last batch padded with the last pair."""
    n = len(pixels["white_light"])
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, batch):
        take = np.arange(i, i + batch).clip(max=n - 1)
        w = normalise(pixels["white_light"][take], specs["white_light"])
        f = normalise(pixels["fluorescence"][take], specs["fluorescence"])
        for name, x in infer_outputs(w, f).items():
            parts.setdefault(name, []).append(np.asarray(x, np.float32)[:min(batch, n - i)])
    return {name: np.concatenate(v) for name, v in parts.items()}


def check_backend(backend: Any, references: References) -> EngineCheck:
    """Run the references through `backend` (edge_pfm.backends.Backend) at its smallest batch (1, or a DLA engine's
    fixed batch) and judge it against the reference of its precision (which the caller made sure exists)."""
    precision = backend.precision
    utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    engine = backend.identity().get("engine_sha256", "")
    t0 = time.perf_counter()
    got = references.run(backend.infer_outputs, max(1, int(getattr(backend, "min_batch", 1))))
    seconds = time.perf_counter() - t0
    tol = references.tolerance(precision)
    nonfinite = [name for name, x in got.items() if not np.all(np.isfinite(x))]
    if nonfinite:
        return EngineCheck(precision, False, None, tol, [f"non-finite {', '.join(nonfinite)}"],
                           references.sha256(precision), engine, seconds, utc)
    figures = compare(references.outputs(precision), got)
    failures = figures.failures(tol)
    return EngineCheck(precision, not failures, figures, tol, failures, references.sha256(precision), engine, seconds,
                       utc)
