"""Camera sources, one file each: the contract (base), OpenCV/V4L2, GStreamer, replay, and the URI factory.
Test doubles (synthetic cameras, fault injectors, pixel stamps) live apart, in sources/simulated/."""
from edge_pfm.sources.base import Frame, FrameSource, SourceError
from edge_pfm.sources.factory import open_source

__all__ = ["Frame", "FrameSource", "SourceError", "open_source"]
