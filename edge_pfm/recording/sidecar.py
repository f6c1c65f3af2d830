"""A camera's frame record beside its video: `<part>.frames.jsonl`, one JSON line per frame the video holds, in
the order the video holds them, after a header line.

    {"format": "edge-pfm/frames v1", "modality": "white_light", "video": "white_light.000.avi", "part": 0,
     "first_frame": 0, "codec": "FFV1", "fps": 30.0, "source": "GstAppSinkSource(...)", "settings": {...}}
    {"frame": 0, "seq": 1, "t_capture_ns": 1234, "stamp": "device", "dequeue_delay_ns": 2100000, "meta": {...}}

`frame` counts the camera's recorded frames across parts (a resumed recording continues it); `t_capture_ns` is
the capture time on the recording device's monotonic clock, `stamp` where it came from (sources.clock). Each
line is one write(2) of a whole line, so a crash tears at most the last one, which the reader drops.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edge_pfm.errors import EdgePfmError

FORMAT = "edge-pfm/frames v1"
SUFFIX = ".frames.jsonl"


class SidecarError(EdgePfmError, ValueError):
    """A sidecar is not a frame record this version reads; the message names the file and line."""


def sidecar_path(video: str | os.PathLike) -> Path:
    """white_light.000.avi -> white_light.000.frames.jsonl"""
    video = Path(video)
    return video.with_name(video.stem + SUFFIX)


def camera_info(source: Any) -> dict[str, Any]:
    """What a recording keeps about a camera (a FrameSource): its source, rate and settings."""
    return {"source": source.describe(), "nominal_fps": source.nominal_fps,
            "settings": dict(getattr(source, "settings", {}) or {})}


def plain_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able scalars of a frame's meta (a buffer offset, a label, a file index)."""
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None}


class SidecarWriter:
    """Appends frame lines, one write(2) each; `sync()` makes them durable (called once a second by the recorder,
    not per frame)."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._write({"format": FORMAT, **header})
        os.fsync(self.fd)

    def _write(self, obj: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(obj, separators=(",", ":")) + "\n").encode())

    def frame(self, frame_number: int, seq: int, t_capture_ns: int, stamp: str, dequeue_delay_ns: int,
              meta: dict[str, Any]) -> None:
        self._write({"frame": frame_number, "seq": seq, "t_capture_ns": t_capture_ns, "stamp": stamp,
                     "dequeue_delay_ns": dequeue_delay_ns, "meta": plain_meta(meta)})

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1


def read_sidecar(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """-> (header, frame lines). A torn last line (a crash mid-write) is dropped; a bad line before it is an
    error that names the line."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SidecarError(f"cannot read the frame record {path}: {exc.strerror}") from None
    lines = raw.split(b"\n")
    complete = lines[:-1]  # what follows the last newline is a line a crash tore: dropped
    records = []
    for i, line in enumerate(complete, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise SidecarError(f"{path}:{i}: not a JSON line; the frame record is damaged (re-record, or delete the "
                               "sidecar to replay by the container's timestamps)") from None
    if not records or records[0].get("format") != FORMAT:
        found = records[0].get("format") if records and isinstance(records[0], dict) else None
        raise SidecarError(f"{path}: not an {FORMAT!r} frame record (its first line says {found!r})")
    header, frames = records[0], records[1:]
    for k, r in enumerate(frames, 2):
        if not isinstance(r, dict) or not isinstance(r.get("t_capture_ns"), int):
            raise SidecarError(f"{path}:{k}: a frame line needs an integer t_capture_ns")
    return header, frames


def truncate_sidecar(path: str | os.PathLike, frames: int) -> None:
    """Keep the header and the first `frames` frame lines (a resumed recording: the lines whose frames the video
    lost in a crash), atomically."""
    from edge_pfm.fileio import atomic_write_bytes

    path = Path(path)
    header, records = read_sidecar(path)
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in [header, *records[:frames]])
    atomic_write_bytes(path, text.encode())
