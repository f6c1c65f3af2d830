"""Fault-injecting sources: wrap any FrameSource and misbehave on purpose, deterministically by seed.

    FaultySource(ReplaySource("w.mkv", "white_light"), drop=0.1, jitter_ms=10,
                 stall=(2.0, 2.0), disconnect=(4.0, 1.5), corrupt=0.05)

drop: probability a frame is lost; jitter_ms: timestamp noise (exposure/readout/scheduling);
stall=(after_s, for_s): no frames for a while; disconnect=(after_s, for_s): reads fail (the runtime
reopens with backoff); freeze=(after_s, for_s): the same frame again and again, as a frozen driver reports
success (Argus); hang=(after_s, for_s): a read that blocks and never returns in time (until close());
missing_s: the camera is not there for the first seconds (open fails: a camera missing at boot);
every_s: repeat the stall, disconnect, freeze and hang windows with this period;
corrupt: probability a frame is replaced by a wrong-size, greyscale, empty or None frame.
Clock drift between cameras is a frame-rate difference (both are stamped by the host's monotonic
clock): give the inner source the rate, e.g. SyntheticSource(drift_ppm=1000) or ReplaySource(fps=29.97).
Used by the tests and the soak benchmark; never by a clinical run. NonFiniteBackend is the backend's fault:
a real backend whose every n-th output is NaN or Inf; HangingBackend a real backend whose calls stop returning.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from edge_pfm.sources.base import Frame, FrameSource, SourceError


class FaultySource(FrameSource):
    def __init__(self, inner: FrameSource, drop: float = 0.0, jitter_ms: float = 0.0,
                 stall: tuple[float, float] | None = None, disconnect: tuple[float, float] | None = None,
                 corrupt: float = 0.0, every_s: float | None = None, seed: int = 0,
                 freeze: tuple[float, float] | None = None, hang: tuple[float, float] | None = None,
                 missing_s: float = 0.0):
        super().__init__(f"faulty:{inner.name}", inner.modality)
        self.inner = inner
        self.drop, self.jitter_ns = drop, jitter_ms * 1e6
        self.stall, self.disconnect, self.corrupt, self.every_s = stall, disconnect, corrupt, every_s
        self.freeze, self.hang, self.missing_s = freeze, hang, missing_s
        self.rng = np.random.default_rng(seed)
        # a device that fails in these ways is one the runtime reopens
        self.reconnect = bool(disconnect or freeze or hang or missing_s)
        self.faults = {"dropped": 0, "stalled_s": 0.0, "disconnected_reads": 0, "corrupted": 0, "frozen": 0,
                       "hung_reads": 0, "missing_opens": 0}
        self.t0_ns: int | None = None
        self.created_ns = time.monotonic_ns()
        self._opened = False
        self._held: Frame | None = None  # the frame a frozen driver repeats
        self._release = threading.Event()  # close() ends a hung read, as closing a device does
        self._hung_in: int | None = None  # the hang window a read already blocked in (one blocked read each)

    @property
    def nominal_fps(self) -> float | None:
        return self.inner.nominal_fps

    def report(self) -> dict:
        return {**self.stats, **self.faults}

    def open(self) -> None:
        if (time.monotonic_ns() - self.created_ns) / 1e9 < self.missing_s:
            self.faults["missing_opens"] += 1
            raise SourceError(f"{self.inner.name}: no such device (injected: missing for {self.missing_s:g} s)")
        if self.disconnect and self.t0_ns is not None and self._in_window(self.disconnect):
            raise SourceError(f"{self.inner.name}: device disconnected (injected)")
        if not self._opened:
            self.inner.open()
            self._opened = True
        if self.t0_ns is None:
            self.t0_ns = time.monotonic_ns()

    def _in_window(self, window: tuple[float, float]) -> bool:
        return self._window_index(window) is not None

    def _window_index(self, window: tuple[float, float]) -> int | None:
        """Which repetition of `window` now is in (0 without every_s), or None when outside it."""
        elapsed = (time.monotonic_ns() - self.t0_ns) / 1e9 - window[0]
        if elapsed < 0:
            return None
        k, into = divmod(elapsed, self.every_s) if self.every_s else (0, elapsed)
        return int(k) if into < window[1] else None

    def grab(self) -> Frame | None:
        if self.hang:
            k = self._window_index(self.hang)
            if k is not None and k != self._hung_in:  # blocks past any sane frame time; close() releases it
                self._hung_in = k
                self.faults["hung_reads"] += 1
                self._release.clear()
                self._release.wait(self.hang[1])
        while True:
            if self.stall and self._in_window(self.stall):
                t = time.monotonic()
                self.inner.grab()  # the camera keeps running; its frames are lost
                self.faults["stalled_s"] += time.monotonic() - t
                if self._stop.is_set():
                    return None
                continue
            frame = self.inner.grab()
            if frame is None:
                return None
            if self.disconnect and self._in_window(self.disconnect):
                self.faults["disconnected_reads"] += 1
                raise SourceError(f"{self.inner.name}: read failed (injected disconnect)")
            if self.rng.random() < self.drop:
                self.faults["dropped"] += 1
                continue
            break
        if self.freeze and self._in_window(self.freeze) and self._held is not None:
            self.faults["frozen"] += 1  # new capture times, the old pixels: what a frozen driver hands back
            return Frame(self._held.image, frame.t_capture_ns, frame.seq, self._held.meta, frame.stamp,
                         frame.dequeue_delay_ns)
        self._held = frame
        t = frame.t_capture_ns + int(self.rng.uniform(-1, 1) * self.jitter_ns)
        image = frame.image
        if self.rng.random() < self.corrupt:
            self.faults["corrupted"] += 1
            kind = self.rng.integers(4)
            if kind == 0:
                image = image[: image.shape[0] // 3, : image.shape[1] // 5]  # wrong size
            elif kind == 1:
                image = image.mean(axis=2).astype(np.uint8) if image.ndim == 3 else image  # greyscale
            elif kind == 2:
                image = np.zeros((0, 0, 3), np.uint8)  # empty frame
            else:
                image = None  # a driver that hands back nothing
        return Frame(image, t, frame.seq, frame.meta, frame.stamp, frame.dequeue_delay_ns)

    def close(self) -> None:
        self._release.set()  # the inner source stays open across injected faults

    def stop(self) -> None:
        super().stop()
        self.inner.close()


class NonFiniteBackend:
    """Wraps a real backend; every `every`-th call returns NaN/Inf logits (a diverged engine, bad memory)."""

    def __init__(self, inner, every: int = 5):
        self.inner, self.every, self.calls, self.injected = inner, every, 0, 0

    def infer_outputs(self, white_light, fluorescence):
        out = dict(self.inner.infer_outputs(white_light, fluorescence))
        self.calls += 1
        if self.calls % self.every == 0:
            self.injected += 1
            out["logits"] = out["logits"].copy()
            out["logits"][:, 0] = np.nan if self.injected % 2 else np.inf
        return out

    def infer(self, white_light, fluorescence):
        return self.infer_outputs(white_light, fluorescence)["logits"]

    def __getattr__(self, name):
        return getattr(self.inner, name)


class HangingBackend:
    """Wraps a real backend; from `after_s` after its first call, a call never returns: a hung GPU or a deadlocked
    driver, which only a supervisor's watchdog can see. `on_hang()` is called once, as the hang starts."""

    def __init__(self, inner, after_s: float, on_hang=None):
        self.inner, self.after_s, self.on_hang = inner, after_s, on_hang
        self.first_call: float | None = None
        self.hung = threading.Event()

    def infer_outputs(self, white_light, fluorescence):
        now = time.monotonic()
        self.first_call = self.first_call or now
        if now - self.first_call >= self.after_s:
            if not self.hung.is_set():
                self.hung.set()
                if self.on_hang is not None:
                    self.on_hang()
            threading.Event().wait()  # forever
        return self.inner.infer_outputs(white_light, fluorescence)

    def infer(self, white_light, fluorescence):
        return self.infer_outputs(white_light, fluorescence)["logits"]

    def __getattr__(self, name):
        return getattr(self.inner, name)
