"""A GStreamer pipeline through JetPack's OpenCV (CSI cameras on a Jetson). The pip OpenCV wheels have no
GStreamer: opencv_has_gstreamer() says whether this one does."""
from __future__ import annotations

from edge_pfm.sources.base import SourceError
from edge_pfm.sources.opencv import OpenCVSource


def opencv_has_gstreamer() -> bool:
    import cv2

    for line in cv2.getBuildInformation().splitlines():
        if "GStreamer" in line:
            return "YES" in line
    return False


class GStreamerSource(OpenCVSource):
    """For example, for a CSI camera:
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
