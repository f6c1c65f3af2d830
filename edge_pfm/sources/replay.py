"""A recorded video file or an image folder, paced at its own frame rate (or unpaced), optionally looping.
Reads through cv2.VideoCapture, the path a camera takes."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge_pfm.dataset import IMAGE_SUFFIXES
from edge_pfm.sources.base import Frame, FrameSource, SourceError, sleep_until


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
        self.pos = 0

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
            self.pos = 0
        else:
            self.cap = cv2.VideoCapture(str(self.path))
            if not self.cap.isOpened():
                raise SourceError(f"cannot open video {self.path}: not a video OpenCV's FFmpeg can decode")
            self.fps = self.fps_override or self.cap.get(cv2.CAP_PROP_FPS) or 30.0
        self.period_ns = int(1e9 / self.fps)
        self.t0 = time.monotonic_ns()

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
        ok = self.cap.grab()
        if not ok:
            return None
        return self._retrieve(self.cap)

    def grab(self) -> Frame | None:
        if self.paced:
            sleep_until(self.t0 + self.seq * self.period_ns, self._stop)
        img = self._read_next()
        if img is None and self.loop and self.seq > 0:
            self.close()
            t0 = self.t0
            self.open()
            self.t0 = t0  # keep pacing continuous
            img = self._read_next()
        if img is None:
            return None
        # paced: the frame's place on the recording's own clock (what a camera's exposure timestamp is), so a
        # reader delayed by a busy CPU delivers late but never re-times a frame into its neighbour's slot
        t = self.t0 + self.seq * self.period_ns if self.paced else time.monotonic_ns()
        self.seq += 1
        return Frame(img, t, self.seq, {"file_index": self.seq - 1}, "scheduled" if self.paced else "host",
                     time.monotonic_ns() - t if self.paced else 0)

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None
