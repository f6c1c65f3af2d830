"""One camera frame -> the model's input, then its quality gates; or the reason it cannot be used.

The two steps are apart so that the gates stay off the latency path: the reader thread hands the model input
to inference first and measures the gates while the model runs (the decision needs them only afterwards).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from edge_pfm.preprocess import PreprocessSpec, preprocess_keep_intermediate
from edge_pfm.runtime.quality import GateThresholds, assess
from edge_pfm.sources.base import Frame

GATES_WAIT_S = 5.0  # a gate measurement takes well under a millisecond: past this something is broken


@dataclass
class Prepared:
    input: np.ndarray  # (1, C, H, W) float32
    ns: int  # how long preparing the input took
    gates: GateThresholds | None
    mid: np.ndarray | None = None  # the box-averaged crop the gates measure on (dropped once measured)
    flags: list[str] = field(default_factory=list)  # gate flags; empty: the frame may update the decision
    metrics: dict[str, float] = field(default_factory=dict)
    _measured: threading.Event = field(default_factory=threading.Event)

    def measure_gates(self) -> None:
        """Measure the gates (once; any thread). A failure of the measurement gates the frame."""
        if self._measured.is_set():
            return
        try:
            if self.gates is not None and self.mid is not None:
                self.flags, self.metrics = assess(self.mid, self.gates)
        except Exception as exc:  # never let a gate crash the reader: the frame is gated, with the reason
            self.flags, self.metrics = [f"gate_error:{type(exc).__name__}"], {}
        finally:
            self.mid = None
            self._measured.set()

    def gated(self) -> tuple[list[str], dict[str, float]]:
        """The gate flags and metrics, waiting for the reader thread that measures them."""
        if not self._measured.wait(GATES_WAIT_S):  # once: the frame is gated from now on
            self.flags, self.metrics = ["gate_timeout"], {}
            self._measured.set()
        return self.flags, self.metrics


@dataclass
class Rejected:
    reason: str  # why the frame cannot be used (wrong type, empty, ...): counted, never inferred
    ns: int


def prepare_input(frame: Frame, spec: PreprocessSpec, gates: GateThresholds | None) -> Prepared | Rejected:
    """The model input of one frame (OpenCV releases the GIL: both cameras' readers run at once). `gates`: the
    thresholds measured later by Prepared.measure_gates(), None when gating is off."""
    t0 = time.perf_counter_ns()
    try:
        x = np.empty((1, *spec.input_shape), np.float32)
        _, mid = preprocess_keep_intermediate(frame.image, spec, out=x[0])
    except Exception as exc:  # a malformed frame: any error of the preprocessing means the frame is unusable
        return Rejected(f"{type(exc).__name__}: {exc}", time.perf_counter_ns() - t0)
    return Prepared(x, time.perf_counter_ns() - t0, gates, mid)


def prepare(frame: Frame, spec: PreprocessSpec, gates: GateThresholds | None) -> Prepared | Rejected:
    """Both steps at once: the model input and the gates."""
    p = prepare_input(frame, spec, gates)
    if isinstance(p, Prepared):
        p.measure_gates()
    return p
