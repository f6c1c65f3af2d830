"""A recorded video file or an image folder, paced at its own timing (or unpaced), optionally looping.
Reads through cv2.VideoCapture, the path a camera takes.

Where a frame's time comes from, best first (`timing` says which):
- `sidecar`: the frame record `edge-pfm record` writes beside the video (recording.sidecar): each frame at its
  recorded capture time, with its recorded seq and meta. Two replays of one recording share one time base
  (link_replays: the earlier of their first frames), so the recorded offset between the cameras and its
  jitter come back.
- `container`: the video's own timestamps (FFmpeg's, through CAP_PROP_POS_MSEC), when they increase.
- `index`: the frame index at the file's (or the given) frame rate; an image folder always.
Replays without a frame record share the moment the first of them opens (link_replays), so two folders (or
videos) of pairs play frame k of each at the same time.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from edge_pfm.dataset import IMAGE_SUFFIXES
from edge_pfm.sources.base import Frame, FrameSource, SourceError, sleep_until


class ReplayTimeline:
    """One time base for the replays of one recording: recorded time `base_ns` is replayed at the moment the first
    of them starts; a loop moves every replay on by `span_ns`."""

    def __init__(self, base_ns: int, span_ns: int):
        self.base_ns, self.span_ns = base_ns, span_ns
        self.t0_ns: int | None = None
        self._lock = threading.Lock()

    def start(self) -> int:
        with self._lock:
            if self.t0_ns is None:
                self.t0_ns = time.monotonic_ns()
            return self.t0_ns


def _span(times: list[int]) -> int:
    """A recording's length for looping: first to last frame, plus one median frame period."""
    period = int(np.median(np.diff(times))) if len(times) > 1 else 33_333_333
    return times[-1] - times[0] + max(period, 1)


def link_replays(sources: Iterable[FrameSource]) -> ReplayTimeline | None:
    """Give the replays one shared time base (module doc); -> the frame-recorded ones' timeline (or the shared
    start of those without a record), or None when fewer than two replays. Sources wrapped by a decorator are
    found through its `inner`.

    Replays without a frame record (image folders; videos timed by their container or frame index) share the
    moment the first of them opens, so frame k of each is scheduled at the same time whatever the delay between
    opening them: each opened on its own clock, two folders of pairs opened 31 ms apart at 30 fps paired every
    white frame k+1 with fluorescence frame k (two scenes), and a whole `record --mode dataset` of them was
    mispaired."""
    replays: list[ReplaySource] = []
    for s in sources:
        while not isinstance(s, ReplaySource) and getattr(s, "inner", None) is not None:
            s = s.inner
        if isinstance(s, ReplaySource):
            replays.append(s)
    unrecorded = [r for r in replays if not r.recorded]
    shared_start = None
    if len(unrecorded) >= 2:  # only its start is used: no recorded time base, nothing to loop by
        shared_start = ReplayTimeline(0, 0)
        for r in unrecorded:
            r.timeline = shared_start
    replays = [r for r in replays if r.recorded]
    if len(replays) < 2:
        return shared_start
    times = [[r["t_capture_ns"] for r in rep.recorded] for rep in replays]
    first, last = min(t[0] for t in times), max(t[-1] for t in times)
    period = min(_span(t) - (t[-1] - t[0]) for t in times)
    timeline = ReplayTimeline(first, last - first + period)
    for r in replays:
        r.timeline = timeline
    return timeline


class ReplaySource(FrameSource):
    def __init__(self, path: str | Path, modality: str, paced: bool = True, loop: bool = False,
                 fps: float | None = None, keep: int = 2):
        super().__init__(str(path), modality, keep=keep)
        self.path, self.paced, self.loop = Path(path), paced, loop
        self.fps_override = fps
        if not self.path.exists():
            raise SourceError(f"replay source {self.path} does not exist")
        self.cap = None
        self.files: list[Path] = []
        self.seq = 0
        self.fps: float | None = None
        self.period_ns = 0
        self.t0 = 0
        self.pos = 0  # frames read from the file (or folder) in this pass
        self.recorded: list[dict[str, Any]] = []  # the frame record's lines (sidecar timing)
        self.recorded_header: dict[str, Any] = {}
        self.timeline: ReplayTimeline | None = None
        self.timing = "index"
        self._loop_ns = 0  # how far the loops so far moved the recorded times on
        self._first_pts_ms: float | None = None
        self._last_pts_ms = -1.0
        if self.path.is_file():
            from edge_pfm.recording.sidecar import read_sidecar, sidecar_path

            record = sidecar_path(self.path)
            if record.exists() and fps is None:
                self.recorded_header, self.recorded = read_sidecar(record)
                self.timing = "sidecar" if self.recorded else "index"

    @property
    def nominal_fps(self) -> float | None:
        return self.fps or self.fps_override

    def open(self) -> None:
        import cv2

        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise SourceError(f"image folder {self.path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            self.fps = self.fps_override or 30.0
        else:
            self.cap = cv2.VideoCapture(str(self.path))
            if not self.cap.isOpened():
                raise SourceError(f"cannot open video {self.path}: not a video OpenCV's FFmpeg can decode")
            self.fps = (self.fps_override or self.recorded_header.get("fps") or self.cap.get(cv2.CAP_PROP_FPS)
                        or 30.0)
            if self.timing == "index" and self.fps_override is None and not self.recorded:
                self.timing = "container"  # until its timestamps fail to increase
        self.pos = 0
        self.period_ns = int(1e9 / self.fps)
        if self.recorded and self.timeline is None:
            times = [r["t_capture_ns"] for r in self.recorded]
            self.timeline = ReplayTimeline(times[0], _span(times))
        self.t0 = self.timeline.start() if self.timeline is not None else time.monotonic_ns()

    def _read_next(self) -> np.ndarray | None:
        import cv2

        if self.cap is None:
            if self.pos >= len(self.files):
                return None
            img = cv2.imread(str(self.files[self.pos]), cv2.IMREAD_COLOR)
            self.pos += 1
            if img is None:
                raise SourceError(f"unreadable image {self.files[self.pos - 1]}")
            return img
        if self.recorded and self.pos >= len(self.recorded):
            return None  # frames past the record (none, unless the record was cut): its timing is the truth
        if not self.cap.grab():
            return None
        self.pos += 1
        return self._retrieve(self.cap)

    def _scheduled_ns(self) -> int:
        """The frame just read's place on the replay's clock (module doc: sidecar, container or index timing)."""
        if self.recorded:
            return self.t0 + self._loop_ns + self.recorded[self.pos - 1]["t_capture_ns"] - self.timeline.base_ns
        if self.timing == "container":
            import cv2

            pts = self.cap.get(cv2.CAP_PROP_POS_MSEC)
            if pts > self._last_pts_ms and np.isfinite(pts):
                self._last_pts_ms = pts
                if self._first_pts_ms is None:
                    self._first_pts_ms = pts
                return self.t0 + self._loop_ns + int((pts - self._first_pts_ms) * 1e6)
            self.timing = "index"  # timestamps that do not increase say nothing: the frame index from here
        return self.t0 + self.seq * self.period_ns

    def grab(self) -> Frame | None:
        img = self._read_next()
        if img is None and self.loop and self.seq > 0:
            self.close()
            if self.recorded:
                self._loop_ns += self.timeline.span_ns
            elif self.timing == "container":  # (index timing counts on: seq goes on across loops)
                self._loop_ns += int((self._last_pts_ms - (self._first_pts_ms or 0)) * 1e6) + self.period_ns
            self._last_pts_ms, self._first_pts_ms = -1.0, None
            t0 = self.t0
            self.open()
            self.t0 = t0  # keep pacing continuous
            img = self._read_next()
        if img is None:
            return None
        t = self._scheduled_ns()
        # paced: the frame's place on the recording's own clock (what a camera's exposure timestamp is), so a
        # reader delayed by a busy CPU delivers late but never re-times a frame into its neighbour's slot
        if self.paced:
            sleep_until(t, self._stop)
        else:
            t = time.monotonic_ns()
        self.seq += 1
        if self.recorded:
            rec = self.recorded[self.pos - 1]
            meta = {**rec.get("meta", {}), "file_index": self.pos - 1, "frame": rec.get("frame")}
            stamp = f"replay:{rec.get('stamp', '?')}" if self.paced else "host"
            return Frame(img, t, int(rec.get("seq", self.seq)), meta, stamp,
                         time.monotonic_ns() - t if self.paced else 0)
        return Frame(img, t, self.seq, {"file_index": self.seq - 1}, "scheduled" if self.paced else "host",
                     time.monotonic_ns() - t if self.paced else 0)

    def describe(self) -> str:
        return f"ReplaySource({self.path}, timing {self.timing})"

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None
