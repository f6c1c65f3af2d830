"""The source contract: a camera yields Frame(image, t_capture_ns, seq) from its own reader thread.

A source implements three public calls, so decorators (the fault injector) and the bench drive it without a
reader thread: open(), grab() -> Frame | None (None: end of stream), close(). The base adds the reader
thread: start(on_frame) pushes every new frame to `on_frame` in the reader thread (the runtime prepares
and pairs there); start() without it keeps the newest `keep` frames for take()/wait().
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_pfm.errors import EdgePfmError
from edge_pfm.sources.frame_pool import FramePool

FPS_WINDOW = 32  # frame intervals kept to measure a source's real rate


@dataclass
class Frame:
    image: np.ndarray
    t_capture_ns: int  # CLOCK_MONOTONIC
    seq: int
    meta: dict[str, Any] = field(default_factory=dict)
    stamp: str = "host"  # where t_capture_ns came from: device, device+offset, host (sources.clock), or scheduled
    dequeue_delay_ns: int = 0  # how long after t_capture_ns the reader had the frame


class SourceError(EdgePfmError, RuntimeError):
    """A source cannot be opened; the message says why and what to do."""


def sleep_until(t_ns: int, stop: threading.Event) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        stop.wait(delay)


class FrameSource:
    """Base of every source. A grab that raises counts as a read error; device sources (`reconnect`) are
    reopened with exponential backoff while the rest of the pipeline keeps running."""

    reconnect = False  # device sources reopen after read errors; files and synthetic end

    def __init__(self, name: str, modality: str, keep: int = 2):
        self.name = name
        self.modality = modality
        self.ended = False
        self.connected = False
        self.opened = False
        self.stats: collections.Counter = collections.Counter()  # grabbed, overwritten, read_errors, reconnects
        self.last_frame_ns = 0
        self.last_error: str | None = None
        self.pool = FramePool()  # frame buffers, reused once nothing holds them
        self._frames: collections.deque[Frame] = collections.deque(maxlen=keep)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_frame: Callable[[Frame], None] | None = None
        self._last_shape: tuple[int, ...] | None = None
        self._intervals: collections.deque[int] = collections.deque(maxlen=FPS_WINDOW)
        self._last_gap_t = 0

    # -- what a source implements ------------------------------------------------------------------
    def open(self) -> None:
        pass

    def grab(self) -> Frame | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    @property
    def nominal_fps(self) -> float | None:
        """The frame rate the source negotiated or was told (None: unknown until measured)."""
        return None

    def report(self) -> dict[str, Any]:
        """Counters for the run summary."""
        return dict(self.stats)

    # -- helpers for implementations -------------------------------------------------------------
    def _retrieve(self, cap) -> np.ndarray | None:
        """cap.retrieve() into a free pooled buffer shaped like the last frame (the first one OpenCV allocates);
        -> the image, or None when retrieve fails."""
        ok, img = cap.retrieve(self.pool.take(self._last_shape) if self._last_shape is not None else None)
        if not ok or img is None:
            return None
        self._last_shape = img.shape
        return img

    def _count_gaps(self, t_ns: int) -> None:
        """Frames the driver dropped, from gaps in the capture times (needs the rate)."""
        fps = self.nominal_fps
        if fps and self._last_gap_t:
            periods = (t_ns - self._last_gap_t) * fps / 1e9
            if periods > 1.5:
                self.stats["dropped_gaps"] += int(round(periods)) - 1
        self._last_gap_t = t_ns

    # -- the reader thread -----------------------------------------------------------------------
    def start(self, on_frame: Callable[[Frame], None] | None = None) -> FrameSource:
        """Open (unless open already) and start the reader thread. `on_frame(frame)` is called in the reader thread
        for every frame; without it the newest frames are kept for take()."""
        self.ensure_open()
        self.connected = True
        self._on_frame = on_frame
        self._thread = threading.Thread(target=self._run, name=f"source-{self.modality}", daemon=True)
        self._thread.start()
        return self

    def ensure_open(self) -> None:
        """open() once, whoever asks first (the runtime opens every camera before it writes the run header)."""
        if not self.opened:
            self.open()
            self.opened = True

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.close()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the reader thread to end (a finite source's last frame delivered)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def measured_fps(self) -> float | None:
        """The rate the frames actually came at, from their capture times (None: too few frames yet)."""
        if len(self._intervals) < FPS_WINDOW // 2:
            return None
        return 1e9 / float(np.median(self._intervals))

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                frame = self.grab()
            except Exception as exc:  # a camera read failure: count it, reopen with backoff
                self.stats["read_errors"] += 1
                self.connected = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                if not self.reconnect or self._stop.wait(backoff):  # stopped while failing: do not reopen
                    break
                backoff = min(backoff * 2, 2.0)
                try:
                    self.close()
                    self.open()
                    self.connected = True
                    self.stats["reconnects"] += 1
                except Exception as reopen_exc:  # still gone: try again after the next backoff
                    self.last_error = f"reopen failed: {reopen_exc}"
                continue
            if frame is None:
                break
            backoff = 0.1
            self.connected = True
            self.stats["grabbed"] += 1
            if self.last_frame_ns:
                self._intervals.append(frame.t_capture_ns - self.last_frame_ns)
            self.last_frame_ns = frame.t_capture_ns
            if self._on_frame is not None:
                self._on_frame(frame)
                continue
            with self._cond:
                if len(self._frames) == self._frames.maxlen:
                    self.stats["overwritten"] += 1
                self._frames.append(frame)
                self._cond.notify_all()
        self.ended = True
        self.connected = False
        with self._cond:
            self._cond.notify_all()

    def take(self) -> list[Frame]:
        """All buffered frames, oldest first (the buffer is emptied). Only without an `on_frame` callback."""
        with self._cond:
            out = list(self._frames)
            self._frames.clear()
        return out

    def wait(self, timeout: float) -> bool:
        """Block until a frame is buffered or the source ended; -> whether a frame is there."""
        with self._cond:
            if not self._frames and not self.ended:
                self._cond.wait(timeout)
            return bool(self._frames)

    def describe(self) -> str:
        return f"{type(self).__name__}({self.name})"
