"""open_source(uri): one syntax for every source, on the command line and in the config (jetson-utils'
videoSource shape):

    0 | /dev/video0                     OpenCV device (V4L2); the number can change after a replug or a reboot
    /dev/v4l/by-id/<name>               the same camera by a stable name (udev's by-id or by-path links)
    serial:<serial number>              the V4L2 camera whose by-id name holds this serial
    gst:<pipeline>                      GStreamer pipeline ending in appsink (PyGObject, else JetPack's OpenCV)
    path/to/video.mkv | path/to/folder  replay of a video file or image folder, paced at its frame rate
    synthetic[:fps=30,drift_ppm=200,jitter_ms=5,drop=0.05,label=hsil,seed=1]   a simulated camera
    synthetic:freeze=5:2,hang=9:30,missing_s=3,every_s=20   ... with injected faults (tests; never clinical)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge_pfm.sources.base import FrameSource, SourceError

BY_ID = "/dev/v4l/by-id"


def by_serial(serial: str, modality: str) -> str:
    """The /dev/v4l/by-id link of the camera with this serial number (its capture node, video-index0)."""
    by_id = BY_ID
    names = sorted(p.name for p in Path(by_id).glob("*")) if Path(by_id).is_dir() else []
    matches = [n for n in names if serial and serial in n.split("-video-index")[0]]
    capture = [n for n in matches if n.endswith("video-index0")] or matches
    if len(capture) != 1:
        found = ", ".join(names) or "none"
        what = "no camera" if not capture else f"{len(capture)} cameras"
        raise SourceError(f"serial:{serial} ({modality}): {what} in {by_id} match (there: {found}); "
                          "`udevadm info /dev/videoN | grep SERIAL` shows a camera's serial")
    return str(Path(by_id) / capture[0])


def open_source(spec: str, modality: str, bank: Any = None, paced: bool = True, loop: bool = False,
                missing_ok: bool = False, **camera: Any) -> FrameSource:
    """Parse a source string (module doc) into an unstarted FrameSource. `bank`: a synthetic SceneBank shared by
    both synthetic cameras; `camera`: OpenCV settings (fourcc, width, height, fps, exposure, gain, buffer_size);
    `missing_ok`: a device path that is not there yet is looked for again at every open (serve: a camera missing
    at boot) instead of refused now."""
    spec = str(spec).strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from edge_pfm.sources.simulated.cameras import synthetic_source

        return synthetic_source(spec, modality, bank)
    if spec.startswith("gst:"):
        from edge_pfm.sources.gstreamer import gstreamer_source

        return gstreamer_source(spec[4:], modality)
    if spec.startswith("serial:"):
        return _v4l2(by_serial(spec[len("serial:"):], modality), modality, camera)
    if spec.isdigit() or spec.startswith(("/dev/video", "/dev/v4l/")):
        return _v4l2(spec, modality, camera, missing_ok)
    if Path(spec).exists():
        from edge_pfm.sources.replay import ReplaySource

        return ReplaySource(spec, modality, paced=paced, loop=loop)
    raise SourceError(f"source {spec!r} is neither a device (0, /dev/video0), gst:<pipeline>, an existing video file "
                      "or image folder, nor synthetic[:options]")


def _v4l2(spec: str, modality: str, camera: dict, missing_ok: bool = False) -> FrameSource:
    from edge_pfm.sources.opencv import OpenCVSource

    if spec.isdigit():
        return OpenCVSource(int(spec), modality, **camera)
    if not os.path.exists(spec) and not missing_ok:
        raise SourceError(f"{spec} does not exist: is the camera plugged in? (`ls -l /dev/v4l/by-id`)")
    # a stable link opens the device it points to (OpenCV's V4L2 backend wants /dev/videoN), resolved again at
    # every open: it follows its camera to whichever /dev/videoN the camera gets when replugged
    real = os.path.realpath(spec) if os.path.exists(spec) else spec
    source = OpenCVSource(real, modality, link=spec, **camera)
    if real != spec:
        source.name = f"{spec} -> {real}"
    return source
