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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_pfm.preprocess import PreprocessSpec
from edge_pfm.runtime.modality import ModalityWatch
from edge_pfm.runtime.pairing import AlternatingPairer, Pair, TimestampPairer
from edge_pfm.runtime.prepare import Prepared, Rejected, prepare_input
from edge_pfm.runtime.quality import GateConfig
from edge_pfm.sources.base import Frame, FrameSource

_LOG = logging.getLogger(__name__)
PROVISIONAL_FPS = 30.0  # until a source that does not say its rate has been measured
MAX_FPS = 1000.0  # a measured rate above this is a burst of queued frames, not the camera's rate
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
    generation: int = 0  # the preprocessing it was prepared with (set_preprocessing): a switch drops older pairs

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
                 tolerance_ms: float | None = None, on_error: Callable[[BaseException], None] | None = None,
                 watch: ModalityWatch | None = None):
        """sources: {"white_light": s, "fluorescence": s}, or {"camera": s} for one alternating sensor.
        on_error(exc): a reader thread hit a bug (not a bad frame): the runner stops and raises it.
        watch: judges each camera's frames against its modality now and then (two cameras only)."""
        if set(sources) not in ({"white_light", "fluorescence"}, {CAMERA}):
            raise ValueError("give both white_light and fluorescence sources, or one alternating camera")
        self.sources = sources
        self.alternating = CAMERA in sources
        self.specs = specs
        self.generation = 0  # bumped by set_preprocessing: a pair prepared before it never reaches the new model
        self.thresholds = {m: getattr(gates, m) if gates.enabled else None for m in ("white_light", "fluorescence")}
        self.configured_ms = tolerance_ms
        self.pairer: TimestampPairer | AlternatingPairer = (
            AlternatingPairer(0) if self.alternating else TimestampPairer(0))
        self.tolerance = Tolerance(0, "provisional", {})
        self.stats: collections.Counter = collections.Counter()  # pairs_dropped_stale, bad_frames
        self.last_bad_frame: str | None = None
        self.last_pair_ns = 0
        self.on_error = on_error
        self.watch = None if self.alternating else watch
        self._lock = threading.Lock()  # the pairer, the prepared frames and the counters
        self._prepared: dict[str, collections.OrderedDict[int, Prepared | Rejected]] = {
            k: collections.OrderedDict() for k in sources}
        self._slot: collections.deque[PreparedPair] = collections.deque(maxlen=1)
        self._slot_cond = threading.Condition()

    # -- lifecycle ------------------------------------------------------------------------------------
    def open(self, missing_ok: bool = False) -> Tolerance:
        """Open every source and set the pairing tolerance from their rates. -> the tolerance (also logged).
        `missing_ok`: a device camera that cannot be opened now is left to start(), which keeps reopening it."""
        for label, s in self.sources.items():
            try:
                s.ensure_open()
            except Exception as exc:
                if not (missing_ok and s.reconnect):
                    raise
                _LOG.warning(f"{label} camera cannot be opened now ({exc}): it will be reopened until it delivers")
        self._set_tolerance({k: s.nominal_fps for k, s in self.sources.items()}, "negotiated")
        return self.tolerance

    def start(self, missing_ok: bool = False, frozen_frames: int = 0) -> None:
        """Start every reader. `frozen_frames`: that many identical frames in a row reopen a camera (0: off)."""
        for label, s in self.sources.items():
            s.frozen_frames = frozen_frames
            s.start(lambda frame, label=label: self._arrived(label, frame), missing_ok=missing_ok)

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

    def set_preprocessing(self, specs: dict[str, PreprocessSpec]) -> int:
        """A new model's preprocessing (a bundle update): frames prepared for the old one are dropped, and a pair
        being prepared now is recognised by its generation. -> the new generation."""
        with self._lock:
            self.specs = specs
            self.generation += 1
            for kept in self._prepared.values():
                kept.clear()
        with self._slot_cond:
            self._slot.clear()
        return self.generation

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
            ns = int(self.configured_ms * 1e6)
            # one alternating sensor: the tolerance bounds the gap between a cycle's two frames, twice the
            # configured value as before this module existed
            tol = Tolerance(2 * ns if self.alternating else ns, "configured", fps)
        else:
            known = [v for v in fps.values() if v]
            if len(known) < len(fps):
                source = "provisional"
            period_ns = 1e9 / max(known or [PROVISIONAL_FPS])
            # two cameras: a frame's nearest partner is at most half the faster camera's period away; one
            # alternating sensor: a cycle's two frames are one period apart, so allow 1.5 for jitter
            tol = Tolerance(int(1.5 * period_ns if self.alternating else period_ns / 2), source, fps)
        self.tolerance = tol
        self.pairer.tolerance_ns = tol.ns
        _LOG.info(tol.describe())

    def _measure_tolerance(self) -> None:
        """A source that did not say its rate: once every source's rate is known or measured, use it."""
        fps = {k: s.nominal_fps or s.measured_fps() for k, s in self.sources.items()}
        if all(fps.values()) and all(0 < v < MAX_FPS for v in fps.values()):
            self._set_tolerance(fps, "measured")

    def _wanted(self) -> bool:
        """Prepare on arrival only while the slot is free: with a pair waiting, this frame is likely superseded."""
        return not self._slot

    def _arrived(self, label: str, frame: Frame) -> None:
        """A camera's reader thread, for each frame: prepare, pair, hand over, then measure the gates."""
        to_measure: list[Prepared] = []
        try:
            try:
                modality = self.pairer.modality_of(frame) if self.alternating else label
            except Exception as exc:  # an alternating frame without a usable image: counted, never paired
                with self._lock:
                    self.stats["bad_frames"] += 1
                    self.last_bad_frame = f"{type(exc).__name__}: {exc}"
                return
            generation, specs = self.generation, self.specs  # read together: a switch swaps both
            prepared = (prepare_input(frame, specs[modality], self.thresholds[modality]) if self._wanted()
                        else None)
            if isinstance(prepared, Prepared):
                to_measure.append(prepared)
            self._pair(label, frame, prepared, to_measure, generation)
        except BaseException as exc:  # a bug, not a bad frame: the run stops and says so
            if self.on_error is None:
                raise
            self.on_error(exc)
        finally:  # after the pair (if any) is handed to inference: the gates, while the model runs
            for p in to_measure:
                p.measure_gates()
            if self.watch is not None and self.watch.wants(label, frame.t_capture_ns):
                self.watch.observe(label, frame.t_capture_ns, frame.image)

    def _pair(self, label: str, frame: Frame, prepared: Prepared | Rejected | None, to_measure: list[Prepared],
              generation: int = 0) -> None:
        with self._lock:
            if generation != self.generation:  # prepared for the model before a switch: prepare again
                prepared, generation = None, self.generation
            specs = self.specs
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
            if w is None and f is None and self._slot:
                # both frames came while inference had a pair waiting: a fresher pair, prepared on arrival,
                # follows once the slot frees; preparing this one would only take CPU from the model
                self.stats["pairs_dropped_stale"] += 1
                return
        t_paired = time.monotonic_ns()
        late = []
        if w is None:
            w = prepare_input(pair.white_light, specs["white_light"], self.thresholds["white_light"])
            late.append(w)
        if f is None:
            f = prepare_input(pair.fluorescence, specs["fluorescence"], self.thresholds["fluorescence"])
            late.append(f)
        to_measure += [x for x in late if isinstance(x, Prepared)]
        bad = next((x for x in (w, f) if isinstance(x, Rejected)), None)
        if bad is not None:
            with self._lock:
                self.stats["bad_frames"] += 1
                self.last_bad_frame = bad.reason
            return
        in_pair = frame is pair.white_light or frame is pair.fluorescence
        work = PreparedPair(pair, w.input, f.input, {"white_light": w, "fluorescence": f}, t_paired,
                            time.monotonic_ns(), prepared.ns if in_pair and prepared is not None else 0, generation)
        with self._slot_cond:
            if self._slot:
                with self._lock:
                    self.stats["pairs_dropped_stale"] += 1
                if self._slot[0].pair.t_capture_ns > pair.t_capture_ns:  # a fresher pair got there first
                    return
            self._slot.append(work)
            self._slot_cond.notify()
