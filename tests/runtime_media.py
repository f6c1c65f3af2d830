"""Real media for runtime tests: lossless (FFV1) videos of stamped synthetic scenes."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge_pfm.sources.simulated.stamp import stamp
from edge_pfm.synthetic import SCENES, render_pair

SIZE = (320, 240)


def scene_frames(n: int, label_every: int = 10, size=SIZE, defects: dict[int, dict] | None = None, seed: int = 0):
    """n (white, fluo, label) triples; the class changes every `label_every` frames; defects[i] -> render kwargs."""
    cache = {}
    out = []
    for i in range(n):
        label = SCENES[(i // label_every) % len(SCENES)]
        kw = (defects or {}).get(i, {})
        key = (label, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = render_pair(label, seed + len(cache), size, **kw)
        s = cache[key]
        out.append((stamp(s.white_light.copy(), i, "white_light"), stamp(s.fluorescence.copy(), i, "fluorescence"),
                    label))
    return out


def write_video(path: Path, frames: list[np.ndarray], fps: float = 30.0) -> Path:
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), fps, (w, h))
    assert vw.isOpened(), "FFV1 writer unavailable"
    for f in frames:
        vw.write(f)
    vw.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            return frames
        frames.append(f)
