"""open_source(uri): one syntax for every source, on the command line and in the config (jetson-utils'
videoSource shape):

    0 | /dev/video0                     OpenCV device (V4L2)
    gst:<pipeline>                      GStreamer pipeline (JetPack's OpenCV; ends in appsink)
    path/to/video.mkv | path/to/folder  replay of a video file or image folder, paced at its frame rate
    synthetic[:fps=30,drift_ppm=200,jitter_ms=5,drop=0.05,label=hsil,seed=1]   a simulated camera
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge_pfm.sources.base import FrameSource, SourceError


def open_source(spec: str, modality: str, bank: Any = None, paced: bool = True, loop: bool = False,
                **camera: Any) -> FrameSource:
    """Parse a source string (module doc) into an unstarted FrameSource. `bank`: a synthetic SceneBank shared by
    both synthetic cameras; `camera`: OpenCV settings (fourcc, width, height, fps, exposure, gain, buffer_size)."""
    spec = str(spec).strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from edge_pfm.sources.simulated.cameras import synthetic_source

        return synthetic_source(spec, modality, bank)
    if spec.startswith("gst:"):
        from edge_pfm.sources.gstreamer import GStreamerSource

        return GStreamerSource(spec[4:], modality)
    if spec.isdigit() or spec.startswith("/dev/video"):
        from edge_pfm.sources.opencv import OpenCVSource

        if spec.startswith("/dev/video") and not os.path.exists(spec):
            raise SourceError(f"{spec} does not exist: is the camera plugged in? (`ls /dev/video*`)")
        return OpenCVSource(int(spec) if spec.isdigit() else spec, modality, **camera)
    if Path(spec).exists():
        from edge_pfm.sources.replay import ReplaySource

        return ReplaySource(spec, modality, paced=paced, loop=loop)
    raise SourceError(f"source {spec!r} is neither a device (0, /dev/video0), gst:<pipeline>, an existing video file "
                      "or image folder, nor synthetic[:options]")
