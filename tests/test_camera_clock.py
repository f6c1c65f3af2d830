"""Frames stamped by the driver, not by a busy reader: a scripted V4L2 capture (its buffer stamps scripted, its
reader's stalls scripted, under real threads) read through the real OpenCVSource, and the timestamp mapper's
properties."""
import threading
import time

import cv2
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_pfm.runtime.pairing import TimestampPairer
from edge_pfm.sources.clock import TimestampMapper
from edge_pfm.sources.opencv import OpenCVSource
from edge_pfm.sources.simulated.stamp import read_stamp, stamp

FPS = 30.0
PERIOD_NS = int(1e9 / FPS)


class ScriptedCapture:
    """A cv2.VideoCapture-like V4L2 capture: frame k is exposed at t0 + phase + k * period and its buffer stamp
    (CAP_PROP_POS_MSEC) says so, in the driver's clock domain (`domain_ns` from CLOCK_MONOTONIC); grab() returns
    once the frame is exposed, plus a scripted stall for the frames in `stalls` (the scheduler waking the reader
    late: the frames behind it queue in the driver and come at once)."""

    def __init__(self, modality, t0_ns, phase_ms=0.0, stalls=None, domain_ns=0):
        self.modality, self.t0, self.phase = modality, t0_ns, int(phase_ms * 1e6)
        self.stalls, self.domain_ns = stalls or {}, domain_ns
        self.k = -1

    def exposure(self, k):
        return self.t0 + self.phase + k * PERIOD_NS

    def isOpened(self):
        return True

    def set(self, prop, value):
        return True

    def getBackendName(self):
        return "V4L2"

    def get(self, prop):
        if prop == cv2.CAP_PROP_FPS:
            return FPS
        if prop == cv2.CAP_PROP_POS_MSEC:
            return (self.exposure(self.k) + self.domain_ns) / 1e6
        return 0.0

    def grab(self):
        self.k += 1
        due = self.exposure(self.k) + int(self.stalls.get(self.k, 0.0) * 1e6)
        delay = (due - time.monotonic_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        return True

    def retrieve(self, image=None):
        img = image if image is not None and image.shape == (48, 200, 3) else np.zeros((48, 200, 3), np.uint8)
        return True, stamp(img, self.k, self.modality)

    def release(self):
        pass


def capture_pairs(stamps, seconds=3.0, domain_ns=0):
    """Two scripted cameras (phase 3 ms), each reader stalled 12-25 ms on every 5th/7th frame, read by the real
    OpenCVSource in its reader thread and paired. -> (capture-time errors in ms, mispaired, pairs, sources)."""
    t0 = time.monotonic_ns() + 50_000_000
    caps = {"white_light": ScriptedCapture("white_light", t0, 0.0, {k: 25.0 for k in range(3, 10_000, 7)}, domain_ns),
            "fluorescence": ScriptedCapture("fluorescence", t0, 3.0, {k: 18.0 for k in range(2, 10_000, 5)},
                                            domain_ns)}
    sources = {m: OpenCVSource(0, m, fourcc=None, stamps=stamps, capture=lambda c=c: c) for m, c in caps.items()}
    pairer = TimestampPairer(PERIOD_NS // 2)
    errors, pairs = [], []
    for s in sources.values():
        s.start()
    t_end = time.monotonic() + seconds
    try:
        while time.monotonic() < t_end:
            sources["white_light"].wait(0.02)
            for m, s in sources.items():
                frames = s.take()
                for f in frames:
                    k, _ = read_stamp(f.image)
                    errors.append((f.t_capture_ns - caps[m].exposure(k)) / 1e6)
                pairer.add(m, frames)
            pairs += pairer.pairs()
    finally:
        for s in sources.values():
            s.stop()
    mispaired = sum(1 for p in pairs if read_stamp(p.white_light.image)[0] != read_stamp(p.fluorescence.image)[0])
    return np.abs(errors), mispaired, pairs, sources


def _summary(errors):
    return f"p50 {np.percentile(errors, 50):.2f} p99 {np.percentile(errors, 99):.2f} max {errors.max():.2f} ms"


def test_device_stamps_hold_however_late_the_reader_wakes():
    errors, mispaired, pairs, sources = capture_pairs("auto")
    host_errors, host_mispaired, host_pairs, _ = capture_pairs("host")
    print(f"\ndevice stamps: capture-time error {_summary(errors)}, {mispaired} of {len(pairs)} mispaired"
          f"\nhost stamps:   capture-time error {_summary(host_errors)}, {host_mispaired} of {len(host_pairs)} "
          "mispaired")
    assert errors.max() < 1e-3 and mispaired == 0 and len(pairs) > 60  # exactly the driver's times
    assert all(s.report().get("stamps_device", 0) > 60 for s in sources.values())
    assert host_errors.max() >= 15.0  # the contrast: a stalled reader moves host-stamped frames in time


def test_a_driver_in_another_clock_domain_is_mapped_by_its_offset():
    """A Tegra capture has been seen ~29 s off CLOCK_MONOTONIC: the offset is estimated, not trusted blindly."""
    errors, mispaired, pairs, sources = capture_pairs("auto", seconds=2.5, domain_ns=-29_000_000_000)
    settled = errors[20:]
    assert all(s.report().get("stamps_device+offset", 0) > 40 for s in sources.values())
    assert np.percentile(settled, 99) < 2.0 and mispaired == 0, _summary(settled)


def test_frames_a_driver_dropped_are_counted_from_the_gaps():
    t0 = time.monotonic_ns() + 20_000_000
    cap = ScriptedCapture("white_light", t0)
    src = OpenCVSource(0, "white_light", fourcc=None, capture=lambda: cap)
    src.open()
    for _ in range(3):
        src.grab()
    cap.k += 2  # the driver lost two frames
    src.grab()
    assert src.stats["dropped_gaps"] == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-2_000_000_000, 40_000_000_000), st.integers(0, 50_000_000)), min_size=1,
                max_size=60),
       st.sampled_from([0, -29_000_000_000, 5_000_000_000]))
def test_mapper_never_stamps_the_future_and_falls_back_counted(steps, domain_ns):
    """Any device stamps, in any domain, with any dequeue delay: the mapped time is never after the dequeue;
    missing, zero and backward stamps fall back to host time and are counted."""
    mapper = TimestampMapper()
    host, last_device, fallbacks = 100_000_000_000, None, 0
    for advance, delay in steps:
        host += abs(advance) % 100_000_000 + delay
        device = host - delay + domain_ns if advance >= 0 else (0 if advance % 2 else None)
        s = mapper.map(device, host)
        assert s.t_ns <= host and s.dequeue_delay_ns >= 0
        if device is None or device <= 0 or (last_device is not None and device <= last_device):
            assert s.kind == "host"
            fallbacks += 1
        else:
            last_device = device
    assert mapper.counts["host"] == fallbacks == mapper.counts["host_missing"] + mapper.counts["host_backward"]


def test_offset_converges_to_the_least_delayed_frame():
    mapper = TimestampMapper()
    rng = np.random.default_rng(0)
    host, errors = 40_000_000_000, []  # the driver clock 29 s behind stays positive
    for k in range(300):
        true = host + k * PERIOD_NS
        delay = int(rng.uniform(0.2e6, 8e6))
        s = mapper.map(true - 29_000_000_000, true + delay)
        errors.append((s.t_ns - true) / 1e6)
    assert max(errors[50:]) < 0.5 and all(e >= 0 for e in errors)  # never earlier than the truth, soon close


def test_real_threads_keep_device_times_under_a_cpu_hog():
    """A busy CPU (a Python hog holding the GIL between bytecodes) delays the readers, never the capture times."""
    stop = threading.Event()

    def hog():
        x = 0
        while not stop.is_set():
            x += 1

    hogs = [threading.Thread(target=hog, daemon=True) for _ in range(2)]
    for h in hogs:
        h.start()
    try:
        errors, mispaired, pairs, sources = capture_pairs("auto", seconds=2.0)
    finally:
        stop.set()
    assert errors.max() < 1e-3 and mispaired == 0 and len(pairs) > 30
    assert max(s.report()["dequeue_delay_ms"]["p95"] for s in sources.values()) > 0
