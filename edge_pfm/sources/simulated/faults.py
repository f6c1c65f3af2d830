"""Fault-injecting sources: wrap any FrameSource and misbehave on purpose, deterministically by seed.

    FaultySource(ReplaySource("w.mkv", "white_light"), drop=0.1, jitter_ms=10,
                 stall=(2.0, 2.0), disconnect=(4.0, 1.5), corrupt=0.05)

drop: probability a frame is lost; jitter_ms: timestamp noise (exposure/readout/scheduling);
stall=(after_s, for_s): no frames for a while; disconnect=(after_s, for_s): reads fail (the runtime
reopens with backoff); every_s: repeat the stall and disconnect windows with this period;
corrupt: probability a frame is replaced by a wrong-size, greyscale, empty or None frame.
Clock drift between cameras is a frame-rate difference (both are stamped by the host's monotonic
clock): give the inner source the rate, e.g. SyntheticSource(drift_ppm=1000) or ReplaySource(fps=29.97).
Used by the tests and the soak benchmark; never by a clinical run. NonFiniteBackend is the backend's fault:
a real backend whose every n-th output is NaN or Inf.
"""
from __future__ import annotations

import time

import numpy as np

from edge_pfm.sources.base import Frame, FrameSource, SourceError


class FaultySource(FrameSource):
    def __init__(self, inner: FrameSource, drop: float = 0.0, jitter_ms: float = 0.0,
                 stall: tuple[float, float] | None = None, disconnect: tuple[float, float] | None = None,
                 corrupt: float = 0.0, every_s: float | None = None, seed: int = 0):
        super().__init__(f"faulty:{inner.name}", inner.modality)
        self.inner = inner
        self.drop, self.jitter_ns = drop, jitter_ms * 1e6
        self.stall, self.disconnect, self.corrupt, self.every_s = stall, disconnect, corrupt, every_s
        self.rng = np.random.default_rng(seed)
        self.reconnect = disconnect is not None
        self.faults = {"dropped": 0, "stalled_s": 0.0, "disconnected_reads": 0, "corrupted": 0}
        self.t0_ns: int | None = None
        self._opened = False

    @property
    def nominal_fps(self) -> float | None:
        return self.inner.nominal_fps

    def report(self) -> dict:
        return {**self.stats, **self.faults}

    def open(self) -> None:
        if self.disconnect and self.t0_ns is not None and self._in_window(self.disconnect):
            raise SourceError(f"{self.inner.name}: device disconnected (injected)")
        if not self._opened:
            self.inner.open()
            self._opened = True
        if self.t0_ns is None:
            self.t0_ns = time.monotonic_ns()

    def _in_window(self, window: tuple[float, float]) -> bool:
        elapsed = (time.monotonic_ns() - self.t0_ns) / 1e9 - window[0]
        if elapsed < 0:
            return False
        return (elapsed % self.every_s if self.every_s else elapsed) < window[1]

    def grab(self) -> Frame | None:
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
        pass  # the inner source stays open across injected disconnects

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
