"""Does each camera deliver its own modality? Two cameras that trade device names after a replug would be
classified with full confidence, white light as fluorescence.

White light on the cervix is pink-red: red leads. Fluorescence under blue excitation, behind the emission
filter, is green autofluorescence: green leads, red is low. A frame is judged by its colour shares (mean B, G,
R over the whole frame, subsampled); one that is neither (grey test patterns, a dark frame) claims nothing.
The run is refused at start when a camera's first frames look like the other modality, and during the run a
camera whose recent frames all look like the other one gates the decisions ("<modality>:modality").
"""
from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import numpy as np

from edge_pfm.bundle import MODALITIES

SUBSAMPLE = 16  # every 16th pixel each way: 8k samples of a 1080p frame, ~0.1 ms


@dataclass(frozen=True)
class ModalityRule:
    enabled: bool = True
    fluo_green_share_min: float = 0.40  # green's share of B+G+R for a fluorescence-like frame ...
    fluo_green_over_red: float = 1.5  # ... and green at least this many times red
    white_red_share_min: float = 0.36  # red's share for a white-light-like frame ...
    white_red_over_green: float = 1.2  # ... and red at least this many times green
    dark_mean_max: float = 8.0  # a frame darker than this (lens cap, lamp off) claims nothing
    first_frames: int = 3  # frames per camera judged before the first decision
    every_s: float = 1.0  # then one frame per camera each this often
    window: int = 5  # a swap during the run: this many judged frames in a row look like the other modality
    start_timeout_s: float = 2.0  # waited for the first frames (a silent camera is signal health's business)

    @classmethod
    def from_dict(cls, d: dict) -> ModalityRule:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown [modality] keys {sorted(unknown)}")
        return cls(**d)


def colour_shares(image: np.ndarray) -> tuple[float, float, float, float]:
    """-> (blue, green, red shares of their sum, mean level) of a BGR frame."""
    px = image[::SUBSAMPLE, ::SUBSAMPLE].reshape(-1, image.shape[2]).astype(np.float32)
    mean = px.mean(axis=0)
    total = float(mean.sum()) or 1.0
    return float(mean[0]) / total, float(mean[1]) / total, float(mean[2]) / total, total / 3


def looks_like(image: np.ndarray, rule: ModalityRule) -> str | None:
    """'white_light', 'fluorescence', or None (a grey or dark frame, or one camera's frames in mono)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] < 3 or image.size == 0:
        return None  # an empty or broken frame is preprocessing's to refuse (bad_frames), not a modality
    b, g, r, level = colour_shares(image)
    if level < rule.dark_mean_max:
        return None
    if g >= rule.fluo_green_share_min and g >= rule.fluo_green_over_red * r:
        return "fluorescence"
    if r >= rule.white_red_share_min and r >= rule.white_red_over_green * g:
        return "white_light"
    return None


class ModalityWatch:
    """Fed frames from the reader threads; says which cameras look like the other modality."""

    def __init__(self, rule: ModalityRule, modalities: tuple[str, ...] = MODALITIES):
        self.rule = rule
        self.modalities = modalities
        self._lock = threading.Lock()
        self._judged: dict[str, collections.deque] = {m: collections.deque(maxlen=max(rule.window, rule.first_frames))
                                                      for m in modalities}
        self._first: dict[str, list] = {m: [] for m in modalities}
        self._next_ns = dict.fromkeys(modalities, 0)
        self._ready = threading.Event()
        self.counts: collections.Counter = collections.Counter()  # judged frames by camera and verdict

    def wants(self, modality: str, t_ns: int) -> bool:
        """Whether the next frame of this camera should be judged (cheap; called for every frame)."""
        if not self.rule.enabled or modality not in self._next_ns:
            return False
        return len(self._first[modality]) < self.rule.first_frames or t_ns >= self._next_ns[modality]

    def observe(self, modality: str, t_ns: int, image: np.ndarray) -> None:
        verdict = looks_like(image, self.rule)
        with self._lock:
            self.counts[f"{modality}:{verdict or 'unclear'}"] += 1
            first = self._first[modality]
            if len(first) < self.rule.first_frames:
                first.append((verdict, colour_shares(image) if verdict is not None else None))
                if all(len(f) >= self.rule.first_frames for f in self._first.values()):
                    self._ready.set()
            self._judged[modality].append(verdict)
            self._next_ns[modality] = t_ns + int(self.rule.every_s * 1e9)

    def refusal(self) -> str | None:
        """After the first frames (waits up to start_timeout_s): why the run must not start, or None."""
        if not self.rule.enabled:
            return None
        self._ready.wait(self.rule.start_timeout_s)
        problems = []
        with self._lock:
            for modality, first in self._first.items():
                other = self._other(modality)
                wrong = [shares for verdict, shares in first if verdict == other]
                if first and len(wrong) * 2 > len(first):
                    b, g, r, _ = np.mean([s for s in wrong], axis=0)
                    problems.append(f"the {modality} camera delivers {other}-like frames ({len(wrong)} of "
                                    f"{len(first)}: blue {b:.2f}, green {g:.2f}, red {r:.2f} of the colour)")
        if not problems:
            return None
        return ("; ".join(problems) + ". Are the cameras swapped? Name them by /dev/v4l/by-id/... paths or serial: "
                "in device.toml (a replug or reboot can renumber /dev/videoN); if a camera is right, tune [modality] "
                "in device.toml")

    def flags(self) -> list[str]:
        """Gate flags for the current pair: '<modality>:modality' for a camera whose last `window` judged frames
        all looked like the other modality."""
        out = []
        with self._lock:
            for modality, judged in self._judged.items():
                recent = list(judged)[-self.rule.window:]
                if len(recent) == self.rule.window and all(v == self._other(modality) for v in recent):
                    out.append(f"{modality}:modality")
        return out

    def _other(self, modality: str) -> str:
        return next(m for m in self.modalities if m != modality)

    def report(self) -> dict:
        return dict(self.counts)
