"""Camera sources: each yields Frame(image, t_capture_ns, seq) from its own reader thread.

One syntax for all (CLI and config):
    0 | /dev/video0                     OpenCV device (V4L2)
    gst:<pipeline>                      GStreamer pipeline (JetPack's OpenCV; ends in appsink)
    path/to/video.mkv | path/to/folder  replay of a video file or image folder, paced at its frame rate
    synthetic[:fps=30,drift_ppm=200,jitter_ms=5,drop=0.05,label=hsil,seed=1]

The reader thread keeps only the freshest frames (OpenCV has no latest-frame mode and driver
buffers lag); device timestamps are time.monotonic_ns() taken right after grab(); paced replays and
synthetic cameras stamp each frame's due time (its exposure time) on the same clock.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_pfm.dataset import IMAGE_SUFFIXES
from edge_pfm.errors import EdgePfmError
from edge_pfm.frame_pool import FramePool


@dataclass
class Frame:
    image: np.ndarray
    t_capture_ns: int
    seq: int
    meta: dict[str, Any] = field(default_factory=dict)
    prepared: Any = None  # the model input and gate results, computed in the reader thread (see FrameSource.process)


class SourceError(EdgePfmError, RuntimeError):
    """A source cannot be opened; the message says why and what to do."""


class FrameSource:
    """Base: a reader thread calls _grab() in a loop and keeps the newest `keep` frames.

    Subclasses implement _open(), _grab() -> Frame | None (None: end of stream) and _close().
    A grab that raises counts as a read error; the source is reopened with exponential backoff
    (device sources) while the rest of the pipeline keeps running.
    """

    reconnect = False  # device sources reopen after read errors; files and synthetic end

    def __init__(self, name: str, modality: str, keep: int = 2):
        self.name = name
        self.modality = modality
        self._frames: collections.deque[Frame] = collections.deque(maxlen=keep)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ended = False
        self.connected = False
        self.stats = collections.Counter()  # grabbed, overwritten, read_errors, reconnects
        self.last_frame_ns = 0
        self.on_frame = None  # called (from the reader thread) after each new frame
        # called in the reader thread on each new frame before it is offered: the runner preprocesses here, so
        # a frame is ready the moment its partner arrives and each camera's frames use their own core
        self.process = None
        self.pool = FramePool()  # frame buffers, reused once nothing holds them
        self._last_shape: tuple[int, ...] | None = None

    # -- subclass hooks -------------------------------------------------------------------------
    def _open(self) -> None:
        pass

    def _grab(self) -> Frame | None:
        raise NotImplementedError

    def _close(self) -> None:
        pass

    def _retrieve(self, cap) -> np.ndarray | None:
        """cap.retrieve() into a free pooled buffer shaped like the last frame (the first one OpenCV allocates);
        -> the image, or None when retrieve fails."""
        ok, img = cap.retrieve(self.pool.take(self._last_shape) if self._last_shape is not None else None)
        if not ok or img is None:
            return None
        self._last_shape = img.shape
        return img

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> FrameSource:
        self._open()
        self.connected = True
        self._thread = threading.Thread(target=self._run, name=f"source-{self.modality}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._close()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                frame = self._grab()
            except Exception as exc:  # a camera read failure: count it, reopen with backoff
                self.stats["read_errors"] += 1
                self.connected = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                if not self.reconnect:
                    break
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
                try:
                    self._close()
                    self._open()
                    self.connected = True
                    self.stats["reconnects"] += 1
                except Exception as reopen_exc:  # still gone: try again after the next backoff
                    self.last_error = f"reopen failed: {reopen_exc}"
                continue
            if frame is None:
                break
            backoff = 0.1
            self.connected = True
            if self.process is not None:
                self.process(frame)
            with self._cond:
                if len(self._frames) == self._frames.maxlen:
                    self.stats["overwritten"] += 1
                self._frames.append(frame)
                self.stats["grabbed"] += 1
                self.last_frame_ns = frame.t_capture_ns
                self._cond.notify_all()
            if self.on_frame is not None:
                self.on_frame()
        self.ended = True
        self.connected = False
        with self._cond:
            self._cond.notify_all()
        if self.on_frame is not None:
            self.on_frame()

    def take(self) -> list[Frame]:
        """All buffered frames, oldest first (the buffer is emptied)."""
        with self._cond:
            out = list(self._frames)
            self._frames.clear()
        return out

    def wait(self, timeout: float) -> bool:
        """Block until a frame is buffered or the source ended; -> whether a frame is there."""
        with self._cond:
            if not self._frames and not self.ended:
                self._cond.wait(timeout)
            return bool(self._frames)

    def describe(self) -> str:
        return f"{type(self).__name__}({self.name})"


def _sleep_until(t_ns: int, stop: threading.Event) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        stop.wait(delay)


class OpenCVSource(FrameSource):
    """A V4L2 device by index or path. Sets FOURCC/size/fps/exposure/gain/buffer size where supported."""

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

    def _open(self) -> None:
        import cv2

        self.cap = cv2.VideoCapture(self.device, self.api) if self.api is not None else cv2.VideoCapture(self.device)
        if not self.cap.isOpened():
            raise SourceError(f"cannot open camera {self.device!r} ({self.modality}); check `v4l2-ctl --list-devices`, "
                              "permissions (video group) and that no other process holds it")
        s = self.settings
        if s["fourcc"] and isinstance(self.device, (int, str)) and not str(self.device).startswith("gst"):
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

    def _grab(self) -> Frame | None:
        if not self.cap.grab():
            raise SourceError(f"camera {self.device!r}: grab() failed")
        t = time.monotonic_ns()
        img = self._retrieve(self.cap)
        if img is None:
            raise SourceError(f"camera {self.device!r}: retrieve() failed")
        self.seq += 1
        return Frame(img, t, self.seq)

    def _close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


def opencv_has_gstreamer() -> bool:
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if "GStreamer" in line:
            return "YES" in line
    return False


class GStreamerSource(OpenCVSource):
    """A GStreamer pipeline through JetPack's OpenCV, e.g. for a CSI camera:
    nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1 ! nvvidconv !
    video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1"""

    def __init__(self, pipeline: str, modality: str):
        import cv2

        if not opencv_has_gstreamer():
            raise SourceError("this OpenCV has no GStreamer support (the pip opencv wheels never do). On a Jetson use "
                              "JetPack's OpenCV: `pip uninstall opencv-python opencv-python-headless` and create the "
                              "venv with --system-site-packages; or give a V4L2 device (0, /dev/video0) instead")
        if "appsink" not in pipeline:
            raise SourceError("a GStreamer source pipeline must end in appsink (add `! appsink drop=true max-buffers=1`)")
        super().__init__(pipeline, modality, fourcc=None, buffer_size=0, api=cv2.CAP_GSTREAMER)


class ReplaySource(FrameSource):
    """A video file or an image folder, paced at its own frame rate (or unpaced), optionally looping.
    Reads through cv2.VideoCapture, the same path a camera uses."""

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

    def _open(self) -> None:
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

    def _grab(self) -> Frame | None:
        if self.paced:
            _sleep_until(self.t0 + self.seq * self.period_ns, self._stop)
        img = self._read_next()
        if img is None and self.loop and self.seq > 0:
            self._close()
            self._open()
            self.t0 -= self.seq * self.period_ns  # keep pacing continuous
            img = self._read_next()
        if img is None:
            return None
        # paced: the frame's place on the recording's own clock (what a camera's exposure timestamp is), so a
        # reader delayed by a busy CPU delivers late but never re-times a frame into its neighbour's slot
        t = self.t0 + self.seq * self.period_ns if self.paced else time.monotonic_ns()
        self.seq += 1
        return Frame(img, t, self.seq, {"file_index": self.seq - 1})

    def _close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


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
    """Synthetic camera: fps, phase offset, clock drift (ppm), jitter, drop probability; frames carry the
    true label (meta['label']) and are stamped with their index and modality."""

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

    def _open(self) -> None:
        self.t0 = time.monotonic_ns() + int(self.phase_ns)

    def _grab(self) -> Frame | None:
        from edge_pfm.stamp import stamp

        while True:
            if self.frames is not None and self.k >= self.frames:
                return None
            t_due = self.t0 + int(self.k * self.period_ns + self.rng.uniform(-1, 1) * self.jitter_ns)
            self.k += 1
            _sleep_until(t_due, self._stop)
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
        return Frame(img, t, self.seq, {"label": scene.label, "index": self.k - 1})


def _parse_kv(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise SourceError(f"synthetic option {part!r} must be key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


SYNTHETIC_KEYS = {"fps": float, "drift_ppm": float, "jitter_ms": float, "drop": float, "label": str, "seed": int,
                  "phase_ms": float, "width": int, "height": int, "frames": int}


def _synthetic_options(spec: str) -> dict[str, Any]:
    opts = _parse_kv(spec.partition(":")[2])
    unknown = set(opts) - set(SYNTHETIC_KEYS)
    if unknown:
        raise SourceError(f"unknown synthetic options {sorted(unknown)}; known: {sorted(SYNTHETIC_KEYS)}")
    try:
        o = {k: SYNTHETIC_KEYS[k](v) for k, v in opts.items()}
    except ValueError as exc:
        raise SourceError(f"bad synthetic option in {spec!r}: {exc}") from exc
    from edge_pfm.synthetic import SCENES

    if o.get("label") and o["label"] not in SCENES:
        raise SourceError(f"synthetic label {o['label']!r} is not one of {SCENES}")
    return o


def synthetic_bank(spec: str) -> SceneBank:
    """The scene bank a synthetic source string describes; pass it to both cameras so they see one scene."""
    o = _synthetic_options(spec)
    return SceneBank((o.get("width", 1280), o.get("height", 720)), o.get("label"), o.get("seed", 0))


def open_source(spec: str, modality: str, bank: SceneBank | None = None, paced: bool = True, loop: bool = False,
                **camera: Any) -> FrameSource:
    """Parse a source string (see module doc) into an unstarted FrameSource."""
    spec = str(spec).strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        o = _synthetic_options(spec)
        bank = bank or synthetic_bank(spec)
        return SyntheticSource(modality, bank, o.get("fps", 30.0), o.get("phase_ms", 0.0), o.get("drift_ppm", 0.0),
                               o.get("jitter_ms", 0.0), o.get("drop", 0.0), o.get("seed", 0) + (modality == "fluorescence"),
                               o.get("frames"))
    if spec.startswith("gst:"):
        return GStreamerSource(spec[4:], modality)
    if spec.isdigit():
        return OpenCVSource(int(spec), modality, **camera)
    if spec.startswith("/dev/video"):
        if not os.path.exists(spec):
            raise SourceError(f"{spec} does not exist: is the camera plugged in? (`ls /dev/video*`)")
        return OpenCVSource(spec, modality, **camera)
    if Path(spec).exists():
        return ReplaySource(spec, modality, paced=paced, loop=loop)
    raise SourceError(f"source {spec!r} is neither a device (0, /dev/video0), gst:<pipeline>, an existing video file "
                      "or image folder, nor synthetic[:options]")
