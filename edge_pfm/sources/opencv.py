"""A V4L2 camera through OpenCV, by index or path. Sets FOURCC, size, fps, exposure, gain and buffer size where
the driver supports them. Frames are stamped with time.monotonic_ns() right after grab()."""
from __future__ import annotations

import time

from edge_pfm.sources.base import Frame, FrameSource, SourceError


class OpenCVSource(FrameSource):
    reconnect = True

    def __init__(self, device: int | str, modality: str, fourcc: str | None = "MJPG", width: int | None = None,
                 height: int | None = None, fps: float | None = None, exposure: float | None = None,
                 gain: float | None = None, buffer_size: int = 1, api: int | None = None):
        super().__init__(str(device), modality)
        self.device, self.api = device, api
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

        self.cap = cv2.VideoCapture(self.device, self.api) if self.api is not None else cv2.VideoCapture(self.device)
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

    def grab(self) -> Frame | None:
        if not self.cap.grab():
            raise SourceError(f"camera {self.device!r}: grab() failed")
        t = time.monotonic_ns()
        img = self._retrieve(self.cap)
        if img is None:
            raise SourceError(f"camera {self.device!r}: retrieve() failed")
        self.seq += 1
        return Frame(img, t, self.seq)

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None
