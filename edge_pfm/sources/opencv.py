"""A V4L2 camera through OpenCV, by index or path. Sets FOURCC, size, fps, exposure, gain and buffer size where
the driver supports them.

Frames are stamped by the driver: after grab(), OpenCV's V4L2 backend gives the buffer's timestamp as
CAP_PROP_POS_MSEC (modules/videoio/src/cap_v4l.cpp; uvcvideo stamps CLOCK_MONOTONIC), mapped by
sources.clock.TimestampMapper. Other backends, or `stamps="host"`, stamp time.monotonic_ns() at dequeue,
which a reader woken late gets wrong by its lateness.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from edge_pfm.sources.base import Frame, FrameSource, SourceError
from edge_pfm.sources.clock import TimestampMapper


class OpenCVSource(FrameSource):
    reconnect = True

    def __init__(self, device: int | str, modality: str, fourcc: str | None = "MJPG", width: int | None = None,
                 height: int | None = None, fps: float | None = None, exposure: float | None = None,
                 gain: float | None = None, buffer_size: int = 1, api: int | None = None, stamps: str = "auto",
                 capture: Callable[[], Any] | None = None, link: str | None = None):
        """stamps: "auto" (the driver's, where the backend gives them) or "host". capture: makes the
        cv2.VideoCapture-like object to read (default: cv2.VideoCapture(device, api)); a scripted capture in the
        tests, a vendor's wrapper in the field. link: a stable name (/dev/v4l/by-id/...) resolved again at every
        open, so a camera replugged as another /dev/videoN, or plugged in after boot, is found."""
        if stamps not in ("auto", "host"):
            raise SourceError(f"stamps must be auto or host, not {stamps!r}")
        super().__init__(str(device), modality)
        self.device, self.api, self.stamps, self._make_capture = device, api, stamps, capture
        self.link = link
        self.clock = TimestampMapper()
        self._device_stamps = False
        self.settings = dict(fourcc=fourcc, width=width, height=height, fps=fps, exposure=exposure, gain=gain,
                             buffer_size=buffer_size)
        self.cap = None
        self.seq = 0
        self._negotiated_fps: float | None = None

    @property
    def nominal_fps(self) -> float | None:
        return self._negotiated_fps or self.settings["fps"]

    def open(self) -> None:
        import cv2

        if self.link is not None:
            if not os.path.exists(self.link):
                raise SourceError(f"{self.link} does not exist: is the camera plugged in? (`ls -l /dev/v4l/by-id`)")
            self.device = os.path.realpath(self.link)  # OpenCV's V4L2 backend wants /dev/videoN
            self.name = self.link if self.device == self.link else f"{self.link} -> {self.device}"
        if self._make_capture is not None:
            self.cap = self._make_capture()
        else:
            self.cap = (cv2.VideoCapture(self.device, self.api) if self.api is not None
                        else cv2.VideoCapture(self.device))
        if not self.cap.isOpened():
            raise SourceError(f"cannot open camera {self.device!r} ({self.modality}); check `v4l2-ctl --list-devices`, "
                              "permissions (video group) and that no other process holds it")
        s = self.settings
        if s["fourcc"] and not str(self.device).startswith("gst"):
            self.cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*s["fourcc"]))
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, s["width"]), (cv2.CAP_PROP_FRAME_HEIGHT, s["height"]),
                            (cv2.CAP_PROP_FPS, s["fps"]), (cv2.CAP_PROP_BUFFERSIZE, s["buffer_size"])):
            if value:
                self.cap.set(prop, value)
        if s["exposure"] is not None:  # manual exposure: the fluorescence camera needs it
            self.cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, 1)  # V4L2: 1 = manual
            self.cap.set(cv2.CAP_PROP_EXPOSURE, s["exposure"])
        if s["gain"] is not None:
            self.cap.set(cv2.CAP_PROP_GAIN, s["gain"])
        fps = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0)  # what the driver settled on (0: it does not say)
        self._negotiated_fps = fps if 0 < fps < 1000 else None
        # only V4L2's POS_MSEC is the buffer's capture time (GStreamer's is a position query: opencv#19025)
        self._device_stamps = self.stamps == "auto" and self.cap.getBackendName() == "V4L2"

    def grab(self) -> Frame | None:
        import cv2

        if not self.cap.grab():
            raise SourceError(f"camera {self.device!r}: grab() failed")
        host = time.monotonic_ns()
        device = None
        if self._device_stamps:
            ms = self.cap.get(cv2.CAP_PROP_POS_MSEC)
            device = int(round(ms * 1e6)) if ms and ms > 0 else None
        stamp = self.clock.map(device, host)
        img = self._retrieve(self.cap)
        if img is None:
            raise SourceError(f"camera {self.device!r}: retrieve() failed")
        self._count_gaps(stamp.t_ns)
        self.seq += 1
        return Frame(img, stamp.t_ns, self.seq, {}, stamp.kind, stamp.dequeue_delay_ns)

    def report(self) -> dict:
        return {**self.stats, **self.clock.report()}

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None
