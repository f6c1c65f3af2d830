"""Synthetic cameras: two free-running cameras that see one rendered scene, with fps, phase, clock drift,
jitter and drops, each frame carrying its true label and (by default) its index and modality stamped in its
pixels."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from edge_pfm.sources.base import Frame, FrameSource, SourceError, sleep_until


class SceneBank:
    """Pre-rendered synthetic scenes shared by both synthetic cameras, so they show the same scene.
    The scene changes every `scene_seconds`; without a fixed label the classes cycle."""

    def __init__(self, size: tuple[int, int], label: str | None = None, seed: int = 0, per_class: int = 1,
                 scene_seconds: float = 2.0):
        from edge_pfm.synthetic import SCENES, render_pair

        labels = [label] if label else list(SCENES)
        rng = np.random.default_rng(seed)
        self.scenes = [render_pair(lab, int(rng.integers(2**31)), size) for lab in labels for _ in range(per_class)]
        self.scene_ns = int(scene_seconds * 1e9)
        self.t0 = time.monotonic_ns()

    def at(self, t_ns: int):
        return self.scenes[((t_ns - self.t0) // self.scene_ns) % len(self.scenes)]


class SyntheticSource(FrameSource):
    """fps, phase offset, clock drift (ppm), jitter, drop probability; frames carry the true label
    (meta['label']) and are stamped with their index and modality."""

    def __init__(self, modality: str, bank: SceneBank, fps: float = 30.0, phase_ms: float = 0.0,
                 drift_ppm: float = 0.0, jitter_ms: float = 0.0, drop: float = 0.0, seed: int = 0,
                 frames: int | None = None, stamp_frames: bool = True):
        super().__init__(f"synthetic:{modality}", modality)
        self.bank, self.fps = bank, fps
        self.period_ns = 1e9 / fps * (1 + drift_ppm * 1e-6)
        self.phase_ns, self.jitter_ns, self.drop = phase_ms * 1e6, jitter_ms * 1e6, drop
        self.rng = np.random.default_rng(seed)
        self.frames, self.stamp_frames = frames, stamp_frames
        self.k = 0
        self.seq = 0
        self.t0 = 0

    @property
    def nominal_fps(self) -> float | None:
        return self.fps

    def open(self) -> None:
        self.t0 = time.monotonic_ns() + int(self.phase_ns)

    def grab(self) -> Frame | None:
        from edge_pfm.sources.simulated.stamp import stamp

        while True:
            if self.frames is not None and self.k >= self.frames:
                return None
            t_due = self.t0 + int(self.k * self.period_ns + self.rng.uniform(-1, 1) * self.jitter_ns)
            self.k += 1
            sleep_until(t_due, self._stop)
            if self._stop.is_set():
                return None
            if self.rng.random() >= self.drop:
                break
            self.stats["dropped_at_source"] += 1
        # the exposure time, as a camera's own (V4L2 buffer) timestamp would give it: a reader thread that wakes
        # late delivers the frame late, which counts as latency, but does not move the frame in time
        t = t_due
        scene = self.bank.at(t)
        img = scene.white_light if self.modality == "white_light" else scene.fluorescence
        if self.stamp_frames:  # stamping writes: give each frame its own copy
            img = stamp(self.pool.copy_of(img), self.k - 1, self.modality)
        self.seq += 1
        # stamped like a driver's buffer: the exposure time, and how late this reader got the frame
        return Frame(img, t, self.seq, {"label": scene.label, "index": self.k - 1}, "device",
                     time.monotonic_ns() - t)


def _parse_kv(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise SourceError(f"synthetic option {part!r} must be key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _window(text: str) -> tuple[float, float]:
    """'AFTER:FOR' (seconds) -> (after, for): when an injected fault starts and how long it lasts."""
    after, sep, length = text.partition(":")
    if not sep:
        raise ValueError(f"{text!r} is not AFTER_S:FOR_S")
    return float(after), float(length)


SYNTHETIC_KEYS = {"fps": float, "drift_ppm": float, "jitter_ms": float, "drop": float, "label": str, "seed": int,
                  "phase_ms": float, "width": int, "height": int, "frames": int}
# faults a separate process can ask for (serve's tests): the camera is wrapped in a FaultySource
FAULT_KEYS = {"freeze": _window, "hang": _window, "stall": _window, "disconnect": _window, "missing_s": float,
              "every_s": float}


def synthetic_options(spec: str) -> dict[str, Any]:
    """`synthetic[:key=value,...]` -> its options, checked."""
    opts = _parse_kv(spec.partition(":")[2])
    known = {**SYNTHETIC_KEYS, **FAULT_KEYS}
    unknown = set(opts) - set(known)
    if unknown:
        raise SourceError(f"unknown synthetic options {sorted(unknown)}; known: {sorted(known)}")
    try:
        o = {k: known[k](v) for k, v in opts.items()}
    except ValueError as exc:
        raise SourceError(f"bad synthetic option in {spec!r}: {exc}") from exc
    from edge_pfm.synthetic import SCENES

    if o.get("label") and o["label"] not in SCENES:
        raise SourceError(f"synthetic label {o['label']!r} is not one of {SCENES}")
    return o


def synthetic_bank(spec: str) -> SceneBank:
    """The scene bank a synthetic source string describes; pass it to both cameras so they see one scene."""
    o = synthetic_options(spec)
    return SceneBank((o.get("width", 1280), o.get("height", 720)), o.get("label"), o.get("seed", 0))


def synthetic_source(spec: str, modality: str, bank: SceneBank | None = None) -> FrameSource:
    """A synthetic camera; with fault options (FAULT_KEYS, e.g. `synthetic:freeze=3:2,every_s=10`) wrapped in a
    FaultySource that injects them."""
    o = synthetic_options(spec)
    seed = o.get("seed", 0) + (modality == "fluorescence")
    camera = SyntheticSource(modality, bank or synthetic_bank(spec), o.get("fps", 30.0), o.get("phase_ms", 0.0),
                             o.get("drift_ppm", 0.0), o.get("jitter_ms", 0.0), o.get("drop", 0.0), seed,
                             o.get("frames"))
    faults = {k: o[k] for k in FAULT_KEYS if k in o}
    if not faults:
        return camera
    from edge_pfm.sources.simulated.faults import FaultySource

    return FaultySource(camera, seed=seed, **faults)
