"""Pairing white-light and fluorescence frames.

TimestampPairer: two free-running cameras. Nearest timestamp within a tolerance (default half a
frame period), each frame used at most once, older unmatched frames dropped and counted.

AlternatingPairer: one sensor with time-multiplexed illumination. A pair is the two frames of one
illumination cycle, in cycle order (white light then fluorescence by default); each frame's
modality comes from its illumination tag (meta['illumination']) or, without one, from its
brightness (fluorescence frames are much darker). Two frames of the same modality in a row, or a
cycle out of order, mean a frame was dropped: the orphan is discarded, so a drop can never swap
white light and fluorescence nor join two cycles.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from edge_pfm.bundle import MODALITIES
from edge_pfm.sources.base import Frame


@dataclass
class Pair:
    white_light: Frame
    fluorescence: Frame

    @property
    def skew_ns(self) -> int:
        return self.fluorescence.t_capture_ns - self.white_light.t_capture_ns

    @property
    def t_capture_ns(self) -> int:
        """The older frame's capture time: latency is measured from here."""
        return min(self.white_light.t_capture_ns, self.fluorescence.t_capture_ns)


class TimestampPairer:
    def __init__(self, tolerance_ns: int, max_buffer: int = 8):
        self.tolerance_ns = int(tolerance_ns)
        self.buf = {m: collections.deque(maxlen=max_buffer) for m in MODALITIES}
        self.stats = collections.Counter()  # pairs, unpaired_white_light, unpaired_fluorescence

    def add(self, modality: str, frames: list[Frame]) -> None:
        for f in frames:
            if len(self.buf[modality]) == self.buf[modality].maxlen:
                self.stats[f"unpaired_{modality}"] += 1
            self.buf[modality].append(f)

    def _drop(self, modality: str) -> None:
        self.buf[modality].popleft()
        self.stats[f"unpaired_{modality}"] += 1

    def pairs(self) -> list[Pair]:
        out = []
        w, f = self.buf["white_light"], self.buf["fluorescence"]
        while w and f:
            # the oldest frame overall either pairs with its nearest partner or can never pair
            a_mod = "white_light" if w[0].t_capture_ns <= f[0].t_capture_ns else "fluorescence"
            b_mod = "fluorescence" if a_mod == "white_light" else "white_light"
            a, others = self.buf[a_mod][0], self.buf[b_mod]
            j = min(range(len(others)), key=lambda i: abs(others[i].t_capture_ns - a.t_capture_ns))
            b = others[j]
            if abs(b.t_capture_ns - a.t_capture_ns) > self.tolerance_ns:
                self._drop(a_mod)  # everything in `others` is later than a + tolerance
                continue
            # a later frame of a's stream may be nearer to b: then a is unmatched
            nxt = self.buf[a_mod][1] if len(self.buf[a_mod]) > 1 else None
            if nxt is not None and abs(nxt.t_capture_ns - b.t_capture_ns) < abs(a.t_capture_ns - b.t_capture_ns):
                self._drop(a_mod)
                continue
            for _ in range(j):  # frames of b's stream older than b can no longer pair
                self._drop(b_mod)
            self.buf[a_mod].popleft()
            others.popleft()
            pair = Pair(a, b) if a_mod == "white_light" else Pair(b, a)
            self.stats["pairs"] += 1
            out.append(pair)
        return out


class AlternatingPairer:
    def __init__(self, tolerance_ns: int, brightness_threshold: float = 60.0, first: str = "white_light"):
        if first not in MODALITIES:
            raise ValueError(f"first must be one of {MODALITIES}")
        self.tolerance_ns = int(tolerance_ns)
        self.brightness_threshold = brightness_threshold
        self.first = first
        self.pending: tuple[str, Frame] | None = None
        self.stats = collections.Counter()

    def modality_of(self, frame: Frame) -> str:
        tag = frame.meta.get("illumination")
        if tag in MODALITIES:
            return tag
        img = frame.image
        small = img[:: max(1, img.shape[0] // 64), :: max(1, img.shape[1] // 64)]
        return "fluorescence" if float(np.mean(small)) < self.brightness_threshold else "white_light"

    def add(self, frames: list[Frame]) -> list[Pair]:
        out = []
        for frame in frames:
            mod = self.modality_of(frame)
            self.stats[f"frames_{mod}"] += 1
            if self.pending is None:
                if mod == self.first:
                    self.pending = (mod, frame)
                else:  # the second frame of a cycle whose first frame was lost
                    self.stats[f"unpaired_{mod}"] += 1
                    self.stats["orphans"] += 1
                continue
            p_mod, p_frame = self.pending
            too_far = frame.t_capture_ns - p_frame.t_capture_ns > self.tolerance_ns
            if p_mod == mod or too_far:
                self.stats[f"unpaired_{p_mod}"] += 1
                self.stats["alternation_breaks" if p_mod == mod else "stale_pending"] += 1
                self.pending = (mod, frame) if mod == self.first else None
                continue
            self.pending = None
            out.append(Pair(frame, p_frame) if mod == "white_light" else Pair(p_frame, frame))
            self.stats["pairs"] += 1
        return out
