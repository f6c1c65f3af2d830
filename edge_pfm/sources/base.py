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
    reopened with exponential backoff while the rest of the pipeline keeps running, and so are frozen frames
    (`frozen_frames`) and, through restart(), a read that blocks."""

    reconnect = False  # device sources reopen after read errors; files and synthetic end

    def __init__(self, name: str, modality: str, keep: int = 2):
        self.name = name
        self.modality = modality
        self.ended = False
        self.connected = False
        self.opened = False
        self.stats: collections.Counter = collections.Counter()  # grabbed, overwritten, read_errors, reconnects
        self.last_frame_ns = 0
        self.grab_since_ns = 0  # when the read in progress began (0: none): a read blocked too long is a stall
        self.last_error: str | None = None
        self.lost: str | None = None  # why the camera is being reopened, until its next frame
        self.frozen_frames = 0  # this many identical frames in a row count as a failure (0: off)
        self._same_frames, self._last_sample = 0, None
        self._generation = 0  # restart() abandons a blocked reader: only the newest generation delivers
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
    def start(self, on_frame: Callable[[Frame], None] | None = None, missing_ok: bool = False) -> FrameSource:
        """Open (unless open already) and start the reader thread. `on_frame(frame)` is called in the reader thread
        for every frame; without it the newest frames are kept for take(). `missing_ok`: a device source that
        cannot be opened now is reopened with backoff by the reader thread (a camera missing at boot), `lost`
        saying why, instead of raising."""
        reopen = None
        try:
            self.ensure_open()
            self.connected = True
        except Exception as exc:
            if not (missing_ok and self.reconnect):
                raise
            reopen = self._lose(f"cannot open: {exc}")
        self._on_frame = on_frame
        self._spawn(reopen)
        return self

    def _spawn(self, reopen: str | None) -> None:
        self._thread = threading.Thread(target=self._run, args=(self._generation, reopen),
                                        name=f"source-{self.modality}", daemon=True)
        self._thread.start()

    def restart(self, why: str) -> bool:
        """Abandon a reader blocked in grab() (a read that never returns) and start a new one that reopens the
        camera: the blocked thread's frame, if it ever comes, is dropped. -> False for sources that do not
        reconnect (files, synthetic cameras without faults)."""
        if not self.reconnect or self._stop.is_set():
            return False
        self.stats["stalls"] += 1
        self._generation += 1
        self.grab_since_ns = 0
        self._spawn(self._lose(why))
        return True

    def _lose(self, why: str) -> str:
        """The camera is lost until its next frame: the runtime says camera_lost, naming `why`."""
        self.connected = False
        self.lost = self.last_error = why
        return why

    @property
    def reading(self) -> bool:
        """The reader thread is alive and not reopening: frames are expected."""
        return self._thread is not None and self._thread.is_alive() and not self.lost and not self.ended

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

    def _reopen(self) -> bool:
        """After a failure (and its backoff): close and open again. -> whether it reopened."""
        try:
            self.close()
            self.open()
            self.opened = self.connected = True
            self.stats["reconnects"] += 1
            return True
        except Exception as exc:  # still gone: try again after the next backoff
            self.last_error = f"reopen failed: {exc}"
            return False

    def _frozen(self, image: np.ndarray | None) -> bool:
        """`frozen_frames` identical frames in a row: a driver that repeats its last buffer while reporting
        success (seen with Argus). A sparse sample of the pixels is enough: a live sensor's noise changes it."""
        if not self.frozen_frames or image is None or not hasattr(image, "shape") or not image.size:
            return False
        sample = hash(np.ascontiguousarray(image[::17, ::13]).tobytes())
        self._same_frames = self._same_frames + 1 if sample == self._last_sample else 0
        self._last_sample = sample
        return self._same_frames >= self.frozen_frames - 1

    def _run(self, generation: int = 0, reopen: str | None = None) -> None:
        backoff = 0.1
        while not self._stop.is_set() and generation == self._generation:
            if reopen is not None:  # a read failed, the frames froze, or the camera is not there yet
                if not self.reconnect or self._stop.wait(backoff):  # stopped while failing: do not reopen
                    break
                backoff = min(backoff * 2, 2.0)
                if generation != self._generation:
                    return
                if self._reopen():
                    reopen = None
                    self._same_frames, self._last_sample = 0, None
                continue
            self.grab_since_ns = time.monotonic_ns()
            try:
                frame = self.grab()
            except Exception as exc:  # a camera read failure: count it, reopen with backoff
                if generation != self._generation:
                    return  # abandoned by restart(), then released by close()
                self.stats["read_errors"] += 1
                self.grab_since_ns = 0
                reopen = self._lose(f"{type(exc).__name__}: {exc}") if self.reconnect else None
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.connected = False
                if reopen is None:
                    break
                continue
            if generation != self._generation:
                return  # abandoned by restart(): another reader owns the camera now
            self.grab_since_ns = 0
            if frame is None:
                break
            if self._frozen(frame.image):
                self.stats["freezes"] += 1
                reopen = self._lose(f"the same frame {self.frozen_frames} times in a row (frozen)")
                continue
            backoff = 0.1
            self.connected = True
            self.lost = None
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
        if generation != self._generation:
            return
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
