"""Annotated side-by-side video (and an optional preview window), written off the inference thread."""
from __future__ import annotations

import collections
import threading
import time

import numpy as np

COLOURS = {"ok": (60, 200, 60), "warming_up": (200, 200, 200), "gated": (0, 200, 255), "no_signal": (0, 0, 255),
           "stale": (0, 0, 255), "rejected": (0, 0, 255)}


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


class AnnotatedVideo:
    def __init__(self, path: str | None, preview: bool, classes, fps: float = 15.0):
        self.path, self.preview, self.fps = path, preview, fps
        self.queue: collections.deque = collections.deque(maxlen=2)
        self.cond = threading.Condition()
        self.writer = None
        self.stop = False
        self.frames = 0
        self.rate = collections.deque(maxlen=30)
        self.thread = threading.Thread(target=self._loop, name="video", daemon=True)
        self.thread.start()

    def submit(self, work, decision, runner) -> None:
        self.rate.append(time.monotonic())
        fps = (len(self.rate) - 1) / (self.rate[-1] - self.rate[0]) if len(self.rate) > 1 else 0.0
        with self.cond:
            self.queue.append((work.pair.white_light.image, work.pair.fluorescence.image, decision, fps, work.gates))
            self.cond.notify()

    def _loop(self) -> None:
        import cv2

        last = 0.0
        while True:
            with self.cond:
                while not self.queue and not self.stop:
                    self.cond.wait(0.1)
                if not self.queue and self.stop:
                    break
                item = self.queue.popleft()
            now = time.monotonic()
            if now - last < 1.0 / self.fps:  # the video runs at a fixed rate; extra pairs are skipped
                continue
            last = now
            frame = annotate(*item)
            if self.path:
                if self.writer is None:
                    h, w = frame.shape[:2]
                    self.writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*"MJPG"), self.fps, (w, h))
                self.writer.write(frame)
                self.frames += 1
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
