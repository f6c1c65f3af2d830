"""One camera frame -> the model's input and its quality gates, or the reason it cannot be used."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edge_pfm.preprocess import PreprocessSpec, preprocess_keep_intermediate
from edge_pfm.runtime.quality import GateThresholds, assess
from edge_pfm.sources.base import Frame


@dataclass
class Prepared:
    input: np.ndarray  # (1, C, H, W) float32
    flags: list[str]  # gate flags; empty: the frame may update the decision
    metrics: dict[str, float]
    ns: int  # how long preparing took


@dataclass
class Rejected:
    reason: str  # why the frame cannot be used (wrong type, empty, ...): counted, never inferred
    ns: int


def prepare(frame: Frame, spec: PreprocessSpec, gates: GateThresholds | None) -> Prepared | Rejected:
    """Runs in the camera's reader thread as the frame arrives (OpenCV releases the GIL). `gates`: None when
    gating is off."""
    t0 = time.perf_counter_ns()
    try:
        x = np.empty((1, *spec.input_shape), np.float32)
        _, mid = preprocess_keep_intermediate(frame.image, spec, out=x[0])
    except Exception as exc:  # a malformed frame: any error of the preprocessing means the frame is unusable
        return Rejected(f"{type(exc).__name__}: {exc}", time.perf_counter_ns() - t0)
    flags, metrics = assess(mid, gates) if gates is not None else ([], {})
    return Prepared(x, flags, metrics, time.perf_counter_ns() - t0)
