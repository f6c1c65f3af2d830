"""A GStreamer pipeline ending in an appsink: CSI cameras on a Jetson, or any pipeline `gst-launch-1.0` accepts.

Two ways in, the first that works:

- **PyGObject** (`gi`, with the Gst and GstApp typelibs): frames are stamped `base_time + running time(pts)`
  on the pipeline's clock, which is forced to GStreamer's monotonic system clock, so a stamp is
  CLOCK_MONOTONIC of the buffer's timestamp, however late the reader pulls it. The stamps go through
  sources.clock.TimestampMapper like a V4L2 driver's. On a Jetson, JetPack's python3-gi is seen from a venv
  made with --system-site-packages; elsewhere `pip install "edge-pfm[gst]"` builds PyGObject.
- **OpenCV's GStreamer capture** (JetPack's OpenCV; the pip wheels have none): host stamps at dequeue, because
  cv2 exposes neither the PTS nor the base time (its POS_MSEC is a position query, opencv#19025). One warning
  says so.

What a buffer's PTS means is the source element's business. v4l2src converts the driver's capture stamp.
nvarguscamerasrc stamps the time the buffer leaves the element (basesrc do-timestamp), after the ISP: the
delivery time, with tens of ms of jitter while the sensor's start-of-frame stays steady. Pairing two CSI
cameras tighter than that needs a hardware trigger (both sensors in external-trigger mode from one pulse),
which makes the two exposures simultaneous whatever their PTS says.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from edge_pfm.sources.base import Frame, FrameSource, SourceError
from edge_pfm.sources.clock import TimestampMapper
from edge_pfm.sources.opencv import OpenCVSource

_LOG = logging.getLogger(__name__)
PULL_TIMEOUT_S = 2.0  # no frame for this long: a read error (the base reopens the pipeline with backoff)
FIRST_FRAME_TIMEOUT_S = 10.0  # a camera's first frame may take this long (nvarguscamerasrc starts slowly)
START_WAIT_S = 1.0  # how long open() waits for PLAYING: a live pipeline whose source pushes only once playing
# (appsrc) stays prerolling until data comes, so not reaching it here is not an error
# appsink: never wait on the clock (sync), keep only the newest buffer, never block the camera's thread
APPSINK_SETTINGS = {"sync": False, "drop": True, "max-buffers": 1, "emit-signals": False}
CHANNELS = {"BGR": 3, "BGRx": 4, "BGRA": 4, "GRAY8": 1}  # formats taken as they are (BGRx/BGRA lose the 4th byte)

_gst: Any = None  # the gi.repository Gst module once loaded


def load_gst() -> Any:
    """-> gi.repository.Gst, initialised (raises ImportError or ValueError when PyGObject or a typelib is missing)."""
    global _gst
    if _gst is None:
        _unwind_with_libgcc()
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstApp", "1.0")
        from gi.repository import Gst, GstApp  # noqa: F401  (GstApp registers the AppSink type)

        Gst.init(None)
        _gst = Gst
    return _gst


def _unwind_with_libgcc() -> None:
    """Debian's and Ubuntu's libgstreamer link libunwind, whose _Unwind_* symbols then serve the C++ exceptions
    of every library loaded after it: an exception that TensorRT throws and catches inside its builder reaches
    std::terminate instead, and the process aborts (seen here with TensorRT-RTX's builder after Gst.init).
    Loading libgcc_s globally first keeps the unwinder every C++ library was built against."""
    import contextlib
    import ctypes
    import os

    with contextlib.suppress(OSError):  # not a glibc system: nothing to protect
        ctypes.CDLL("libgcc_s.so.1", mode=os.RTLD_GLOBAL)


def pygobject_gstreamer() -> str | None:
    """None when PyGObject's GStreamer is usable; else why not, in words."""
    try:
        load_gst()
    except (ImportError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def opencv_has_gstreamer() -> bool:
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if "GStreamer" in line:
            return "YES" in line
    return False


def gstreamer_source(pipeline: str, modality: str) -> FrameSource:
    """The `gst:` source: PyGObject when it loads, else OpenCV's GStreamer with host stamps (one warning)."""
    if "appsink" not in pipeline:
        raise SourceError("a GStreamer source pipeline must end in appsink (add `! appsink`)")
    why = pygobject_gstreamer()
    if why is None:
        return GstAppSinkSource(pipeline, modality)
    if opencv_has_gstreamer():
        _LOG.warning("%s camera: PyGObject's GStreamer is not available (%s); using OpenCV's GStreamer capture, "
                     "whose frames are stamped by the host when the reader gets them, not by the pipeline. For "
                     "pipeline stamps: apt install python3-gi gir1.2-gst-plugins-base-1.0 (a venv made with "
                     "--system-site-packages sees it) or pip install 'edge-pfm[gst]'", modality)
        return OpenCVGStreamerSource(pipeline, modality)
    raise SourceError(f"no GStreamer for the {modality} camera: PyGObject's is not available ({why}) and this "
                      "OpenCV has none (the pip wheels never do). Install PyGObject and the typelibs (Debian/JetPack: "
                      "apt install python3-gi gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0, then a venv with "
                      "--system-site-packages; or pip install 'edge-pfm[gst]'), or give a V4L2 device (0, "
                      "/dev/video0) instead")


class GstAppSinkSource(FrameSource):
    """A pipeline read through PyGObject's appsink, stamped by the pipeline (module doc). For example:
    videotestsrc is-live=true ! video/x-raw,format=BGR,width=1280,height=720,framerate=30/1 ! appsink"""

    reconnect = True

    def __init__(self, pipeline: str, modality: str, pull_timeout_s: float = PULL_TIMEOUT_S):
        super().__init__(f"gst:{pipeline}", modality)
        self.description = pipeline
        self.pull_timeout_ns = int(pull_timeout_s * 1e9)
        self.clock = TimestampMapper()
        self.pipeline: Any = None  # Gst.Pipeline while open (tests reach its elements by name)
        self.sink: Any = None
        self.base_time_ns = 0
        self.seq = 0
        self._fps: float | None = None
        self._last_offset: int | None = None
        self._first = True

    @property
    def nominal_fps(self) -> float | None:
        return self._fps

    def open(self) -> None:
        Gst = load_gst()
        try:
            pipeline = Gst.parse_launch(self.description)
        except Exception as exc:  # GLib.Error: the message names the element or the syntax
            raise SourceError(f"{self.modality} camera: GStreamer cannot parse the pipeline: {exc}") from None
        if not isinstance(pipeline, Gst.Pipeline):  # a lone element: gst-launch would wrap it too
            raise SourceError(f"{self.modality} camera: the pipeline must end in an appsink element")
        sink = _find_appsink(Gst, pipeline)
        if sink is None:
            raise SourceError(f"{self.modality} camera: no appsink in the pipeline (end it in `! appsink`)")
        for prop, value in APPSINK_SETTINGS.items():
            sink.set_property(prop, value)
        # GStreamer's system clock, monotonic: base_time + running time is then CLOCK_MONOTONIC
        clock = Gst.SystemClock.obtain()
        if clock.get_property("clock-type") != Gst.ClockType.MONOTONIC:
            clock = Gst.SystemClock(clock_type=Gst.ClockType.MONOTONIC)
        pipeline.use_clock(clock)
        self.pipeline, self.sink = pipeline, sink
        if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            error = self._bus_error()
            self.close()
            raise SourceError(f"{self.modality} camera: the pipeline did not start: {error or 'no message'}")
        result, _, _ = pipeline.get_state(int(START_WAIT_S * 1e9))
        error = self._bus_error()
        if error or result == Gst.StateChangeReturn.FAILURE:
            self.close()
            raise SourceError(f"{self.modality} camera: the pipeline did not start: {error or result.value_nick}")
        self.base_time_ns = int(pipeline.get_base_time())
        self._last_offset = None
        self._first = True

    def grab(self) -> Frame | None:
        Gst = load_gst()
        timeout_ns = int(FIRST_FRAME_TIMEOUT_S * 1e9) if self._first else self.pull_timeout_ns
        sample = self.sink.try_pull_sample(timeout_ns)
        host = time.monotonic_ns()
        if sample is None:
            if self.sink.is_eos():
                return None
            error = self._bus_error()
            raise SourceError(f"{self.modality} camera: {error or f'no frame for {timeout_ns / 1e9:g} s'}")
        self._first = False
        # the base time is the pipeline's once it plays (it may re-base after a pause): read it per frame
        self.base_time_ns = int(self.pipeline.get_base_time())
        buf = sample.get_buffer()
        device = None
        if buf.pts != Gst.CLOCK_TIME_NONE:
            running = sample.get_segment().to_running_time(Gst.Format.TIME, buf.pts)
            if running != Gst.CLOCK_TIME_NONE:
                device = self.base_time_ns + int(running)
        stamp = self.clock.map(device, host)
        image = self._image(Gst, sample, buf)
        self._count_drops(buf.offset, stamp.t_ns)
        self.seq += 1
        meta = {} if buf.offset == Gst.BUFFER_OFFSET_NONE else {"offset": int(buf.offset)}
        return Frame(image, stamp.t_ns, self.seq, meta, stamp.kind, stamp.dequeue_delay_ns)

    def _image(self, Gst: Any, sample: Any, buf: Any) -> np.ndarray:
        """The buffer's pixels, copied once into a pooled array (the buffer goes back to GStreamer)."""
        caps = sample.get_caps().get_structure(0)
        fmt = caps.get_value("format")
        if fmt not in CHANNELS:
            raise SourceError(f"{self.modality} camera: the appsink gets {fmt} frames; end the pipeline in "
                              "`! videoconvert ! video/x-raw,format=BGR ! appsink`")
        width, height = caps.get_value("width"), caps.get_value("height")
        if self._fps is None:
            ok, num, den = caps.get_fraction("framerate")
            self._fps = num / den if ok and num > 0 and den > 0 else None
        channels = CHANNELS[fmt]
        data = buf.extract_dup(0, buf.get_size())  # one copy out of the GstBuffer
        stride = len(data) // height  # rows may be padded to 4 bytes
        if stride < width * channels:
            raise SourceError(f"{self.modality} camera: a {width}x{height} {fmt} buffer of {len(data)} bytes")
        rows = np.frombuffer(data, np.uint8, count=stride * height).reshape(height, stride)
        pixels = rows[:, :width * channels].reshape(height, width, channels)[:, :, :min(channels, 3)]
        if channels == 1:
            pixels = pixels[:, :, 0]
        return self.pool.copy_of(pixels)

    def _count_drops(self, offset: int, t_ns: int) -> None:
        """Frames lost before the reader got them: gaps in the buffer offsets where the source numbers its buffers
        (videotestsrc, v4l2src), else gaps in the capture times."""
        Gst = load_gst()
        if offset == Gst.BUFFER_OFFSET_NONE:
            self._count_gaps(t_ns)
            return
        if self._last_offset is not None and offset > self._last_offset + 1:
            self.stats["dropped_gaps"] += offset - self._last_offset - 1
        self._last_offset = offset

    def _bus_error(self) -> str | None:
        Gst = load_gst()
        if self.pipeline is None:
            return None
        msg = self.pipeline.get_bus().pop_filtered(Gst.MessageType.ERROR)
        if msg is None:
            return None
        err, debug = msg.parse_error()
        return f"{msg.src.get_name()}: {err.message}" + (f" ({debug.splitlines()[0]})" if debug else "")

    def report(self) -> dict:
        return {**self.stats, **self.clock.report(), "base_time_ns": self.base_time_ns}

    def stop(self) -> None:
        self._stop.set()
        if self.pipeline is not None:  # flushing the appsink wakes a reader waiting in try_pull_sample now
            self.pipeline.set_state(load_gst().State.NULL)
        super().stop()

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.set_state(load_gst().State.NULL)
            self.pipeline = self.sink = None


def _find_appsink(Gst: Any, pipeline: Any) -> Any:
    from gi.repository import GstApp

    it = pipeline.iterate_recurse()
    while True:
        result, element = it.next()
        if result == Gst.IteratorResult.RESYNC:
            it.resync()
            continue
        if result != Gst.IteratorResult.OK:
            return None
        if isinstance(element, GstApp.AppSink):
            return element


class OpenCVGStreamerSource(OpenCVSource):
    """JetPack's OpenCV reading a GStreamer pipeline: host stamps (module doc)."""

    def __init__(self, pipeline: str, modality: str):
        import cv2

        super().__init__(pipeline, modality, fourcc=None, buffer_size=0, api=cv2.CAP_GSTREAMER, stamps="host")
