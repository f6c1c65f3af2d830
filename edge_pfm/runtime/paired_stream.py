"""A paired stream: two free-running cameras, or one sensor with alternating illumination, become prepared pairs.

Each frame is prepared (preprocessed and gated) in its camera's reader thread as it arrives, and paired there
too, so a pair is ready the moment its newer frame lands, without waking another thread. Only the freshest
pair is kept for inference (a one-pair slot): when inference is busy, arriving frames are not prepared, and
a pair that forms then gets its frames prepared by the reader that formed it.

The pairing tolerance comes from the cameras' own rate unless configured: half the period of the faster camera
(its negotiated fps, or, when a source does not say, the rate its frames are measured at).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from edge_pfm.preprocess import PreprocessSpec
from edge_pfm.runtime.pairing import AlternatingPairer, Pair, TimestampPairer
from edge_pfm.runtime.prepare import Prepared, Rejected, prepare, prepare_input
from edge_pfm.runtime.quality import GateConfig
from edge_pfm.sources.base import Frame, FrameSource

_LOG = logging.getLogger(__name__)
PROVISIONAL_FPS = 30.0  # until a source that does not say its rate has been measured
CAMERA = "camera"  # the label of one alternating sensor


@dataclass
class PreparedPair:
    pair: Pair
    white: np.ndarray  # (1, C, H, W) model inputs
    fluo: np.ndarray
    prepared: dict[str, Prepared]  # by modality: the gates, measured while the model runs
    t_paired_ns: int  # when the newer frame was prepared and paired
    t_ready_ns: int  # when both frames were prepared (a frame skipped under load is prepared after pairing)
    arrival_prepare_ns: int  # preparing the frame whose arrival made the pair, before it could pair

    @property
    def gates(self) -> dict[str, list[str]]:
        """Gate flags by modality (waits for their measurement, which runs beside inference)."""
        return {m: p.gated()[0] for m, p in self.prepared.items()}

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        return {m: p.gated()[1] for m, p in self.prepared.items()}


@dataclass(frozen=True)
class Tolerance:
    ns: int
    source: str  # configured | negotiated | measured | provisional
    fps: dict[str, float | None]

    def to_dict(self) -> dict:
        return {"tolerance_ms": round(self.ns / 1e6, 3), "from": self.source,
                "fps": {k: None if v is None else round(v, 3) for k, v in self.fps.items()}}

    def describe(self) -> str:
        rates = ", ".join(f"{k} {'?' if v is None else f'{v:.2f}'} fps" for k, v in self.fps.items())
        return f"pairing tolerance +-{self.ns / 1e6:.2f} ms ({self.source}; {rates})"


class PairedStream:
    def __init__(self, sources: dict[str, FrameSource], specs: dict[str, PreprocessSpec], gates: GateConfig,
                 tolerance_ms: float | None = None):
        """sources: {"white_light": s, "fluorescence": s}, or {"camera": s} for one alternating sensor."""
        if set(sources) not in ({"white_light", "fluorescence"}, {CAMERA}):
            raise ValueError("give both white_light and fluorescence sources, or one alternating camera")
        self.sources = sources
        self.alternating = CAMERA in sources
        self.specs = specs
        self.thresholds = {m: getattr(gates, m) if gates.enabled else None for m in ("white_light", "fluorescence")}
        self.configured_ms = tolerance_ms
        self.pairer: TimestampPairer | AlternatingPairer = (
            AlternatingPairer(0) if self.alternating else TimestampPairer(0))
        self.tolerance = Tolerance(0, "provisional", {})
        self.stats: collections.Counter = collections.Counter()  # pairs_dropped_stale, bad_frames
        self.last_bad_frame: str | None = None
        self.last_pair_ns = 0
        self._lock = threading.Lock()  # the pairer and the prepared frames
        self._prepared: dict[str, collections.OrderedDict[int, Prepared | Rejected]] = {
            k: collections.OrderedDict() for k in sources}
        self._slot: collections.deque[PreparedPair] = collections.deque(maxlen=1)
        self._slot_cond = threading.Condition()

    # -- lifecycle ------------------------------------------------------------------------------------
    def open(self) -> Tolerance:
        """Open every source and set the pairing tolerance from their rates. -> the tolerance (also logged)."""
        for s in self.sources.values():
            if not s.opened:
                s.open()
                s.opened = True
        self._set_tolerance({k: s.nominal_fps for k, s in self.sources.items()}, "negotiated")
        return self.tolerance

    def start(self) -> None:
        for label, s in self.sources.items():
            s.start(lambda frame, label=label: self._arrived(label, frame))

    def stop(self) -> None:
        for s in self.sources.values():
            s.stop()
        with self._slot_cond:
            self._slot_cond.notify_all()

    @property
    def ended(self) -> bool:
        """Every source has delivered its last frame and no pair waits."""
        return all(s.ended for s in self.sources.values()) and not self._slot

    @property
    def nominal_fps(self) -> float:
        rates = [s.nominal_fps for s in self.sources.values() if s.nominal_fps]
        return max(rates) if rates else PROVISIONAL_FPS

    # -- the consumer ---------------------------------------------------------------------------------
    def next(self, timeout: float) -> PreparedPair | None:
        """The freshest prepared pair, or None after `timeout` seconds."""
        with self._slot_cond:
            if not self._slot:
                self._slot_cond.wait(timeout)
            return self._slot.popleft() if self._slot else None

    # -- the reader threads ---------------------------------------------------------------------------
    def _set_tolerance(self, fps: dict[str, float | None], source: str) -> None:
        if self.configured_ms:
            tol = Tolerance(int(self.configured_ms * 1e6), "configured", fps)
        else:
            known = [v for v in fps.values() if v]
            if len(known) < len(fps):
                source, known = "provisional", [PROVISIONAL_FPS]
            # two cameras: a frame's nearest partner is at most half the faster camera's period away; one
            # alternating sensor: the two frames of a cycle are one period apart
            period_ns = 1e9 / max(known)
            tol = Tolerance(int(period_ns if self.alternating else period_ns / 2), source, fps)
        self.tolerance = tol
        self.pairer.tolerance_ns = tol.ns * (2 if self.alternating and tol.source == "configured" else 1)
        _LOG.info(tol.describe())

    def _measure_tolerance(self) -> None:
        """A source that did not say its rate: once every source's rate is known, measured, use it."""
        fps = {k: s.nominal_fps or s.measured_fps() for k, s in self.sources.items()}
        if all(fps.values()):
            self._set_tolerance(fps, "measured")

    def _wanted(self) -> bool:
        """Prepare on arrival only while the slot is free: with a pair waiting, this frame is likely superseded."""
        return not self._slot

    def _prepare(self, frame: Frame, modality: str) -> Prepared | Rejected:
        return prepare(frame, self.specs[modality], self.thresholds[modality])

    def _arrived(self, label: str, frame: Frame) -> None:
        modality = self.pairer.modality_of(frame) if self.alternating else label
        prepared = (prepare_input(frame, self.specs[modality], self.thresholds[modality]) if self._wanted()
                    else None)
        try:
            self._pair(label, frame, prepared)
        finally:  # after the pair (if any) is handed to inference: the gates, while the model runs
            if isinstance(prepared, Prepared):
                prepared.measure_gates()

    def _pair(self, label: str, frame: Frame, prepared: Prepared | Rejected | None) -> None:
        with self._lock:
            if self.tolerance.source == "provisional":
                self._measure_tolerance()
            if prepared is not None:
                kept = self._prepared[label]
                kept[frame.seq] = prepared
                while len(kept) > 8:  # frames the pairer dropped
                    kept.popitem(last=False)
            if self.alternating:
                pairs = self.pairer.add([frame])
            else:
                self.pairer.add(label, [frame])
                pairs = self.pairer.pairs()
            if not pairs:
                return
            self.stats["pairs_dropped_stale"] += len(pairs) - 1
            pair = pairs[-1]
            w_label, f_label = (CAMERA, CAMERA) if self.alternating else ("white_light", "fluorescence")
            w = self._prepared[w_label].pop(pair.white_light.seq, None)
            f = self._prepared[f_label].pop(pair.fluorescence.seq, None)
            self.last_pair_ns = time.monotonic_ns()
        t_paired = time.monotonic_ns()
        w = w or self._prepare(pair.white_light, "white_light")
        f = f or self._prepare(pair.fluorescence, "fluorescence")
        bad = next((x for x in (w, f) if isinstance(x, Rejected)), None)
        if bad is not None:
            self.stats["bad_frames"] += 1
            self.last_bad_frame = bad.reason
            return
        work = PreparedPair(pair, w.input, f.input, {"white_light": w, "fluorescence": f}, t_paired,
                            time.monotonic_ns(), prepared.ns if prepared is not None else 0)
        with self._slot_cond:
            if self._slot:
                self.stats["pairs_dropped_stale"] += 1
                if self._slot[0].pair.t_capture_ns > pair.t_capture_ns:  # a fresher pair got there first
                    return
            self._slot.append(work)
            self._slot_cond.notify()
