"""`edge-pfm record --mode video`: each camera's own frames, as the camera delivered them, into its own video, with
a frame record beside it (recording.sidecar), so that a replay gets back the recorded timing.

    REC/
      recording.json                  the codec and each camera's source and settings
      white_light.000.avi             part 0 of the white-light camera; a resumed recording adds part 1, ...
      white_light.000.frames.jsonl    its frame record: frame number, seq, capture time, stamp kind, dequeue delay
      fluorescence.000.avi
      fluorescence.000.frames.jsonl

The codec is FFV1 in AVI by default: lossless, and OpenCV's FFmpeg writes and reads it back. AVI, because its
frames reach the disk as they are written: a SIGKILL cost the frame in flight (Matroska buffers its cluster
and lost 7 of 41). Each camera encodes in its own thread, so its reader never waits on the encoder; a frame
that finds the encoder QUEUE_FRAMES behind is left out of the recording and counted (`dropped_busy`, and in
the next frame line's `dropped_before`). Measured on one core of the build machine, synthetic frames with
sensor-like noise: FFV1 12 ms and 211 kB a 640x360 frame (23 GB an hour at 30 fps), 46-56 ms and 829 kB at
1280x720 (90 GB an hour, more than one core keeps up with at 30 fps); `--codec mjpg` (near-lossless: up to 32
grey levels off at edges, chroma halved) 3 ms and 27 kB at 640x360 (2.9 GB an hour), 8 ms and 92 kB at 720p.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_pfm.fileio import atomic_write_json, read_json
from edge_pfm.outputs import MIB, OutputPlan, Retention, free_bytes
from edge_pfm.recording.sidecar import SidecarWriter, camera_info, read_sidecar, sidecar_path, truncate_sidecar
from edge_pfm.runtime.sinks import RunStart, Sink
from edge_pfm.sources.base import Frame, FrameSource, SourceError

_LOG = logging.getLogger(__name__)
FORMAT = "edge-pfm/recording v1"
MANIFEST = "recording.json"
CODECS = {"ffv1": "FFV1", "mjpg": "MJPG"}  # fourcc by --codec
BYTES_PER_PIXEL = {"ffv1": 0.92, "mjpg": 0.12}  # measured above (noisy frames); the preflight plans with them
PLANNED_PIXELS = 1280 * 720  # a camera's frame size for the preflight, before the first frame says
QUEUE_FRAMES = 8  # frames a camera's encoder may fall behind before a frame is left out
PART_BYTES = 512 * MIB  # a new part past this: a resume decodes only the last part to find where it ended
SYNC_EVERY_S = 1.0  # the frame records are fsynced this often


class RecordingError(SourceError):
    """A recording cannot be written or resumed; the message names the file."""


def part_name(modality: str, part: int) -> str:
    return f"{modality}.{part:03d}.avi"


def parts(directory: Path, modality: str) -> list[Path]:
    """A camera's parts in the recording, in order."""
    return sorted(directory.glob(f"{modality}.[0-9][0-9][0-9].avi"))


def decodable_frames(video: Path) -> int:
    """How many frames OpenCV's FFmpeg reads back from `video` (a crash leaves the last one torn)."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    n = 0
    try:
        while cap.isOpened() and cap.grab():
            n += 1
    finally:
        cap.release()
    return n


class CameraRecorder:
    """One camera's frames into its parts and frame records, in a writer thread."""

    def __init__(self, directory: Path, modality: str, codec: str, source: FrameSource,
                 part_bytes: int = PART_BYTES, settings: dict[str, Any] | None = None):
        if codec not in CODECS:
            raise RecordingError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")
        self.dir, self.modality, self.codec, self.source = directory, modality, codec, source
        self.part_bytes, self.settings = part_bytes, settings or {}
        self.stats: collections.Counter = collections.Counter()  # written, dropped_busy, parts
        self.failure: Exception | None = None
        self.bytes_before = 0  # the finished parts' bytes (this run's and a resumed recording's)
        self.frame_number, self.part, self.resumed = self._resume_point()
        self._queue: queue.Queue[Frame | None] = queue.Queue(QUEUE_FRAMES)
        self._dropped_since = 0
        self._writer: Any = None
        self._sidecar: SidecarWriter | None = None
        self._shape: tuple[int, ...] | None = None
        self._thread = threading.Thread(target=self._run, name=f"record-{modality}", daemon=True)

    # -- resuming ------------------------------------------------------------------------------------
    def _resume_point(self) -> tuple[int, int, dict[str, Any] | None]:
        """(next frame number, next part, what the resume found): after the last part's last decodable frame,
        its frame record cut to match (a crash can leave lines for frames the video never got)."""
        found = parts(self.dir, self.modality)
        # a part a crash left before its first frame: an empty or frameless video, maybe no record
        while found and decodable_frames(found[-1]) == 0:
            for p in (found[-1], sidecar_path(found[-1])):
                p.unlink(missing_ok=True)
            found.pop()
        if not found:
            return 0, 0, None
        last = found[-1]
        record = sidecar_path(last)
        if not record.exists():
            raise RecordingError(f"{last} has no frame record ({record.name}): this is not a recording edge-pfm "
                                 "record can resume; record into a new folder")
        header, lines = read_sidecar(record)
        frames = decodable_frames(last)
        kept = min(frames, len(lines))
        if kept < len(lines):
            truncate_sidecar(record, kept)
        self.bytes_before = sum(p.stat().st_size for p in found)
        next_frame = int(header.get("first_frame", 0)) + kept
        return next_frame, int(last.name.split(".")[1]) + 1, {
            "part": last.name, "frames_in_video": frames, "frame_lines": len(lines), "continues_at": next_frame}

    # -- the reader thread's side --------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def put(self, frame: Frame) -> None:
        """Queue a frame for the encoder (the camera's reader thread; never blocks)."""
        if self.failure is not None:
            return
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self.stats["dropped_busy"] += 1
            self._dropped_since += 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._close_part()

    @property
    def bytes_written(self) -> int:
        current = self.dir / part_name(self.modality, self.part) if self._writer is not None else None
        return self.bytes_before + (current.stat().st_size if current is not None and current.exists() else 0)

    # -- the writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        last_sync = time.monotonic()
        while True:
            frame = self._queue.get()
            if frame is None:
                return
            try:
                self._write(frame)
            except Exception as exc:  # a full disk, a failed encoder: the run stops on it
                self.failure = exc if isinstance(exc, RecordingError) else RecordingError(
                    f"recording {self.modality} failed: {type(exc).__name__}: {exc}")
                return
            if time.monotonic() - last_sync >= SYNC_EVERY_S:
                self._sidecar.sync()
                last_sync = time.monotonic()

    def _write(self, frame: Frame) -> None:
        image = frame.image
        if self._writer is not None and (image.shape != self._shape or self._part_full()):
            self._close_part()
            self.part += 1
        if self._writer is None:
            self._open_part(frame)
        self._writer.write(image)
        dropped, self._dropped_since = self._dropped_since, 0
        meta = dict(frame.meta, **({"dropped_before": dropped} if dropped else {}))
        self._sidecar.frame(self.frame_number, frame.seq, frame.t_capture_ns, frame.stamp, frame.dequeue_delay_ns,
                            meta)
        self.frame_number += 1
        self.stats["written"] += 1

    def _part_full(self) -> bool:
        path = self.dir / part_name(self.modality, self.part)
        return path.stat().st_size >= self.part_bytes

    def _open_part(self, frame: Frame) -> None:
        import cv2

        h, w = frame.image.shape[:2]
        colour = frame.image.ndim == 3
        path = self.dir / part_name(self.modality, self.part)
        fps = self.source.nominal_fps or 30.0
        writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*CODECS[self.codec]), fps,
                                 (w, h), colour)
        if not writer.isOpened():
            raise RecordingError(f"OpenCV's FFmpeg cannot write {CODECS[self.codec]} to {path} "
                                 f"({w}x{h}{'' if colour else ' grey'}); try --codec mjpg")
        self._writer, self._shape = writer, frame.image.shape
        self._sidecar = SidecarWriter(sidecar_path(path), {
            "modality": self.modality, "video": path.name, "part": self.part, "first_frame": self.frame_number,
            "codec": CODECS[self.codec], "fps": fps, "width": w, "height": h, "colour": colour,
            "source": self.source.describe(), "settings": self.settings})
        self.stats["parts"] += 1

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            path = self.dir / part_name(self.modality, self.part)
            self.bytes_before += path.stat().st_size if path.exists() else 0
        if self._sidecar is not None:
            self._sidecar.close()
            self._sidecar = None


class RecordedSource(FrameSource):
    """A camera whose every frame also goes to its CameraRecorder (a decorator, as sources.simulated.faults):
    the frame the runtime pairs is the frame recorded, with the same capture time and seq."""

    def __init__(self, inner: FrameSource, recorder: CameraRecorder):
        super().__init__(inner.name, inner.modality)
        self.inner, self.recorder = inner, recorder
        self.reconnect = inner.reconnect

    @property
    def nominal_fps(self) -> float | None:
        return self.inner.nominal_fps

    def open(self) -> None:
        self.inner.open()

    def grab(self) -> Frame | None:
        frame = self.inner.grab()
        if frame is not None and frame.image is not None and getattr(frame.image, "size", 0):
            self.recorder.put(frame)
        return frame

    def close(self) -> None:
        self.inner.close()

    def stop(self) -> None:
        self.inner.stop()  # wakes a reader blocked in the camera (a GStreamer pull, a paced sleep)
        super().stop()

    def report(self) -> dict[str, Any]:
        return {**self.inner.report(), **self.stats, "recorded": dict(self.recorder.stats)}

    def describe(self) -> str:
        return self.inner.describe()


class VideoRecording(Sink):
    """The recording's outputs as a Runner sink: the preflight's plan, the manifest, progress, and the stop on a
    failed write or on the free-space floor. `wrap(sources)` puts the recorders in front of the cameras."""

    failed_state = "recording_failed"

    def __init__(self, directory: str | Path, codec: str = "ffv1", cap_bytes: int | None = None,
                 min_free_bytes: int = 0, progress_s: float = 2.0, part_bytes: int = PART_BYTES):
        self.dir = Path(directory)
        self.codec, self.cap_bytes, self.min_free = codec, cap_bytes, min_free_bytes
        self.progress_s, self.part_bytes = progress_s, part_bytes
        self.recorders: dict[str, CameraRecorder] = {}
        self.stopped: str | None = None  # why the recording stopped before the run did
        self.request_stop: Callable[[], None] = lambda: None  # the record command: ends the run cleanly
        self._last_progress = 0.0
        self._t0 = time.monotonic()

    def wrap(self, sources: dict[str, FrameSource]) -> dict[str, FrameSource]:
        """{"white": src, "fluo": src} -> the same, recorded. Resumes the recording already in the folder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / MANIFEST
        if manifest.exists():
            old = read_json(manifest, RecordingError, "record into a new folder")
            if old.get("codec") != self.codec:
                raise RecordingError(f"{self.dir} was recorded with --codec {old.get('codec')}; resume it with that "
                                     "codec, or record into a new folder")
        wrapped = {}
        for key, src in sources.items():
            rec = CameraRecorder(self.dir, src.modality, self.codec, src, self.part_bytes,
                                 camera_info(src)["settings"])
            self.recorders[src.modality] = rec
            wrapped[key] = RecordedSource(src, rec)
        return wrapped

    @property
    def resumed(self) -> dict[str, Any]:
        return {m: r.resumed for m, r in self.recorders.items() if r.resumed}

    @property
    def failure(self) -> Exception | None:  # type: ignore[override]
        return next((r.failure for r in self.recorders.values() if r.failure), None)

    def plan(self, decisions_per_s: float) -> OutputPlan | None:
        fps = sum((r.source.nominal_fps or 30.0) for r in self.recorders.values())
        return OutputPlan("the recording", self.dir / MANIFEST, BYTES_PER_PIXEL[self.codec] * PLANNED_PIXELS * fps,
                          Retention(rotate_bytes=None, cap_bytes=self.cap_bytes))

    def open(self, run: RunStart) -> None:
        manifest = {"format": FORMAT, "codec": self.codec, "fourcc": CODECS[self.codec],
                    "cameras": {m: camera_info(r.source) for m, r in self.recorders.items()},
                    "run_id": run.header.get("run_id")}
        path = self.dir / MANIFEST
        if path.exists():  # a resumed recording keeps its first manifest and lists each run
            old = read_json(path, RecordingError)
            manifest = {**old, "runs": [*old.get("runs", [old.get("run_id")]), run.header.get("run_id")]}
        atomic_write_json(path, manifest)
        for r in self.recorders.values():
            r.start()
        self._t0 = self._last_progress = time.monotonic()

    def write(self, event: Any) -> None:
        now = time.monotonic()
        if now - self._last_progress < self.progress_s:
            return
        self._last_progress = now
        written = sum(r.bytes_written for r in self.recorders.values())
        counts = ", ".join(f"{m} {r.stats['written']} frames" + (f" ({r.stats['dropped_busy']} left out: encoder "
                                                                   "busy)" if r.stats["dropped_busy"] else "")
                           for m, r in self.recorders.items())
        _LOG.info(f"recording {now - self._t0:5.0f} s: {counts}; {written / MIB:.1f} MB in {self.dir}")
        if self.cap_bytes and written >= self.cap_bytes:
            self._stop(f"the recording reached its cap of {self.cap_bytes / MIB:.0f} MB (--max-mb)")
        elif self.min_free and free_bytes(self.dir) < self.min_free:
            self._stop(f"less than {self.min_free / MIB:.0f} MB free on the filesystem of {self.dir}")

    def _stop(self, why: str) -> None:
        if self.stopped is None:
            self.stopped = why
            _LOG.warning(f"recording stopped: {why}; what was recorded is kept")
            self.request_stop()

    def close(self) -> None:
        for r in self.recorders.values():
            r.close()

    def report(self) -> dict[str, Any]:
        return {"recording": {"path": str(self.dir), "codec": self.codec,
                              "bytes": sum(r.bytes_written for r in self.recorders.values()),
                              "cameras": {m: dict(r.stats) for m, r in self.recorders.items()},
                              "resumed": self.resumed, "stopped": self.stopped}}
