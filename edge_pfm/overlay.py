"""Annotated side-by-side frames, drawn once off the inference thread at a capped rate, for every consumer: the
video file, the preview window and the live view (`on_drawn`)."""
from __future__ import annotations

import collections
import contextlib
import errno
import os
import threading
import time
from pathlib import Path

import numpy as np

from edge_pfm.errors import RuntimeFailure
from edge_pfm.outputs import VIDEO_RETENTION, Retention, enforce_cap, free_bytes, next_segment, rotatable

COLOURS = {"ok": (60, 200, 60), "warming_up": (200, 200, 200), "gated": (0, 200, 255), "no_signal": (0, 0, 255),
           "camera_lost": (0, 0, 255), "stale": (0, 0, 255), "rejected": (0, 0, 255), "log_failed": (0, 0, 255), "video_failed": (0, 0, 255)}


def annotate(white: np.ndarray, fluo: np.ndarray, decision, fps: float, gates: dict, height: int = 360) -> np.ndarray:
    import cv2

    def fit(img):
        if img.ndim == 2:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        w = round(img.shape[1] * height / img.shape[0])
        return cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA)

    white_fit = fit(white)
    if getattr(decision, "lesion", None) is not None:  # only while a map class is shown (decision.py), never gated/stale
        from edge_pfm.lesion import draw_lesion_map

        draw_lesion_map(white_fit, decision.lesion)
    canvas = np.hstack([white_fit, fit(fluo)])
    bar = np.zeros((56, canvas.shape[1], 3), np.uint8)
    label = decision.shown_class or decision.state.upper().replace("_", " ")
    text = f"{label}  {decision.confidence:.0%}" if decision.shown_class else label
    cv2.putText(bar, text, (10, 38), cv2.FONT_HERSHEY_SIMPLEX, 1.1, COLOURS.get(decision.state, (255, 255, 255)), 2,
                cv2.LINE_AA)
    flags = ", ".join(f"{m[:5]}:{'/'.join(f)}" for m, f in gates.items() if f) or "gates ok"
    cv2.putText(bar, f"{fps:5.1f} pairs/s   {flags}", (canvas.shape[1] // 2, 36), cv2.FONT_HERSHEY_SIMPLEX, 0.55,
                (220, 220, 220), 1, cv2.LINE_AA)
    cv2.putText(canvas, "white light", (10, height - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.putText(canvas, "fluorescence", (canvas.shape[1] // 2 + 10, height - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([bar, canvas])


class VideoWriteError(RuntimeFailure):
    """The annotated video cannot be written (a full disk, a file-size limit, a vanished folder)."""


class AnnotatedVideo:
    """Writes (and previews) the annotated pairs on its own thread; rotates the file under its retention
    (edge_pfm.outputs). OpenCV's VideoWriter reports no write errors, so the file is watched: when it stops growing
    while frames go in, or its filesystem is out of space, writing stops and `failure` says why (the file written
    until then is kept)."""

    CHECK_EVERY = 15  # frames between growth checks
    STUCK_CHECKS = 3  # checks without growth that mean the writes are failing

    def __init__(self, path: str | None, preview: bool, classes, fps: float = 15.0,
                 retention: Retention = VIDEO_RETENTION, on_drawn=None):
        """on_drawn(frame, decision, t_capture_ns): another consumer of each drawn frame (the live view); it is
        also given the failure and signal states drawn over the last frame (t_capture_ns 0 then)."""
        self.path, self.preview, self.fps, self.on_drawn = path, preview, fps, on_drawn
        self.retention = retention if path and rotatable(Path(path)) else Retention(None, None, None)
        self.queue: collections.deque = collections.deque(maxlen=2)
        self.cond = threading.Condition()
        self.writer = None
        self.stop = False
        self.frames = 0
        self.failure: VideoWriteError | None = None
        self.removed: list[Path] = []
        self._file_frames, self._opened, self._size, self._stuck = 0, 0.0, -1, 0
        self._frame_bytes = 0.0  # bytes a frame took in the last finished file
        self._overshoot = 0  # bytes a finished file passed rotate_bytes by (the encoder's unflushed buffer)
        self._last = None  # the last item drawn (show_failure redraws it)
        self.rate = collections.deque(maxlen=30)
        self.thread = threading.Thread(target=self._loop, name="video", daemon=True)
        self.thread.start()

    def submit(self, white: np.ndarray, fluo: np.ndarray, decision, gates: dict, t_capture_ns: int = 0) -> None:
        """One decided pair's camera frames, to draw (the drawing thread skips what exceeds its rate)."""
        self.rate.append(time.monotonic())
        fps = (len(self.rate) - 1) / (self.rate[-1] - self.rate[0]) if len(self.rate) > 1 else 0.0
        with self.cond:
            self.queue.append(((white, fluo, decision, fps, gates), t_capture_ns, False))
            self.cond.notify()

    def show_failure(self, decision) -> None:
        """Draw a state that comes without a frame (log_failed, no_signal, camera_lost) over the last frame, for
        the preview and the live view (the video file gets decided pairs only)."""
        if (self.preview or self.on_drawn) and self._last is not None:
            with self.cond:
                self.queue.append(((*self._last[:2], decision, 0.0, {}), 0, True))
                self.cond.notify()

    def _open_writer(self, frame) -> None:
        import cv2

        h, w = frame.shape[:2]
        self.writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*"MJPG"), self.fps, (w, h))
        if not self.writer.isOpened():
            raise OSError(f"OpenCV could not open {self.path} for writing")
        self._file_frames, self._opened, self._size, self._stuck = 0, time.monotonic(), -1, 0

    def _rotate_due(self) -> bool:
        r = self.retention
        if not self._file_frames:
            return False
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        # rotate before the file would pass rotate_bytes (so the cap holds): room for two more frames, their AVI
        # index entries and what FFmpeg has not flushed yet (its 32 KiB buffer)
        room = 2 * size / self._file_frames + 64 * 1024
        if self._frame_bytes:  # a finished file measured the true bytes a frame: lagging getsize is not needed
            size = max(size, self._file_frames * self._frame_bytes)
            room = max(room, 2 * self._frame_bytes)
        return bool((r.rotate_bytes and size + room >= r.rotate_bytes)
                    or (r.rotate_seconds and time.monotonic() - self._opened >= r.rotate_seconds))

    def _check_growth(self) -> None:
        size = os.path.getsize(self.path)
        self._stuck = self._stuck + 1 if size == self._size else 0
        self._size = size
        if self._stuck >= self.STUCK_CHECKS:
            raise OSError(f"the file stopped growing at {size} bytes while frames were written (OpenCV reports no "
                          "write errors: the disk is full, the file-size limit was reached, or the device is gone)")
        if free_bytes(Path(self.path)) < 1 << 20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def _write(self, frame) -> None:
        try:
            if self.writer is not None and self._rotate_due():
                self.writer.release()
                self.writer = None
                final = os.path.getsize(self.path)
                self._frame_bytes = final / self._file_frames
                if self.retention.rotate_bytes:  # FFmpeg's buffer lets a file pass the size a little: measured
                    self._overshoot = max(self._overshoot, final - self.retention.rotate_bytes)
                os.replace(self.path, next_segment(Path(self.path)))
                # room for the new file to grow into, with twice the overshoot seen, so the total stays under the cap
                self.removed += enforce_cap(Path(self.path), self.retention.cap_bytes, f"video {self.path}",
                                            (self.retention.rotate_bytes or 0) + 2 * self._overshoot)
            if self.writer is None:
                self._open_writer(frame)
            self.writer.write(frame)
            self.frames += 1
            self._file_frames += 1
            if self._file_frames % self.CHECK_EVERY == 0:
                self._check_growth()
        except OSError as exc:
            why = exc.strerror or str(exc)
            self.failure = VideoWriteError(f"cannot write the video {self.path}: {why}; free space on its filesystem "
                                           "or point --video elsewhere (the video written before is kept)")
            with contextlib.suppress(Exception):
                if self.writer is not None:
                    self.writer.release()
            self.writer = None
            self.path = None  # nothing more is written; the preview goes on

    def _loop(self) -> None:
        import cv2

        last = 0.0
        while True:
            with self.cond:
                while not self.queue and not self.stop:
                    self.cond.wait(0.1)
                if not self.queue and self.stop:
                    break
                item, t_capture_ns, frameless = self.queue.popleft()  # frameless: a state over the last frame
            now = time.monotonic()
            decision = item[2]
            if now - last < 1.0 / self.fps and not frameless:
                continue  # drawn at a capped rate; extra pairs are skipped
            last = now
            frame = annotate(*item)
            if not frameless:
                self._last = item
                if self.path:
                    self._write(frame)
            if self.on_drawn is not None:
                self.on_drawn(frame, decision, t_capture_ns)
            if self.preview:
                try:
                    cv2.imshow("edge-pfm", frame)
                    cv2.waitKey(1)
                except cv2.error:  # headless OpenCV: no window support
                    self.preview = False

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify()
        self.thread.join(10)
        if self.writer is not None:
            self.writer.release()
