"""A live GStreamer camera rig for the tests (test_gstreamer, test_recording): two `appsrc` cameras fed frames of
one exposure schedule, pixel-stamped with their frame number (test_gstreamer's module doc), and a CPU hog."""
import os
import subprocess
import sys
import threading
import time

from edge_pfm.sources import open_source
from edge_pfm.sources.gstreamer import load_gst, pygobject_gstreamer
from edge_pfm.sources.simulated.stamp import stamp

FPS = 30
PERIOD_NS = 1_000_000_000 // FPS
W, H = 320, 240


def _why_skip():
    why = pygobject_gstreamer()
    if why is not None:
        return (f"PyGObject's GStreamer is not available ({why}): apt install gstreamer1.0-plugins-base "
                "gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 libgirepository1.0-dev libcairo2-dev pkg-config, "
                "then pip install -c constraints.txt -e '.[gst]' (what .ci/run does)")
    Gst = load_gst()
    missing = [e for e in ("videotestsrc", "appsrc", "appsink", "videoconvert") if Gst.ElementFactory.find(e) is None]
    return f"GStreamer elements missing: {missing} (apt install gstreamer1.0-plugins-base)" if missing else None


WHY_SKIP = _why_skip()


def rig_source(modality):
    return open_source(f"gst:appsrc name=cam is-live=true format=time caps=video/x-raw,format=BGR,width={W},"
                       f"height={H},framerate={FPS}/1 ! queue ! videoconvert ! video/x-raw,format=BGR ! appsink",
                       modality)


class StampedRig:
    """Feeds two appsrc cameras one exposure schedule (module doc), once both pipelines play. `images` gives each
    camera's picture; `swap_after` swaps them from that frame on (a replug mid-run)."""

    def __init__(self, sources, images, swap_after=None):
        self.sources, self.images, self.swap_after = sources, images, swap_after
        self.stop = threading.Event()
        self.started = threading.Event()
        self.t0 = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def exposure(self, k):
        return self.t0 + k * PERIOD_NS

    def start(self):
        self.thread.start()
        return self

    def _run(self):
        Gst = load_gst()
        while not all(src.pipeline is not None for src in self.sources.values()):  # both pipelines are open
            if self.stop.wait(0.01):
                return
        self.t0 = time.monotonic_ns() + 50_000_000
        self.started.set()
        k = 0
        while not self.stop.is_set():
            due = self.exposure(k)
            self.stop.wait(max(0.0, (due - time.monotonic_ns()) / 1e9))
            swapped = self.swap_after is not None and k >= self.swap_after
            for m, src in self.sources.items():
                pipe = src.pipeline
                if pipe is None:
                    continue
                shown = m if not swapped else next(o for o in self.sources if o != m)
                img = stamp(self.images[shown].copy(), k, m)
                buf = Gst.Buffer.new_wrapped(img.tobytes())
                buf.pts = due - pipe.get_base_time()  # the exposure, in this pipeline's running time
                buf.duration = PERIOD_NS
                pipe.get_by_name("cam").push_buffer(buf)
            k += 1


class CpuHog:
    """A busy loop in a process per core: the readers, the rig and inference all wake late."""

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
