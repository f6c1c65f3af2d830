"""Frame timestamps on CLOCK_MONOTONIC, from the driver's stamp when there is one (GStreamer's v4l2src checks).

A reader thread that the scheduler wakes late must not move a frame in time: the driver stamped the buffer
when it was captured. TimestampMapper turns a source's device stamp into monotonic time:

    device          the stamp is already monotonic: increasing, and between 0 and max_age old
    device+offset   a steady stamp in another clock domain (a Tegra capture has been seen ~29 s off): its
                    offset is the lower envelope of (host - device) over a sliding window, so it follows drift
    host            no stamp, a zero one, or one that went backward: the host's time at dequeue, counted

Every mapped time is <= the host's time at dequeue (a stamp is never in the future).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

STAMP_KINDS = ("device", "device+offset", "host")
MAX_AGE_NS = 1_000_000_000  # a device stamp older than this is taken for another clock domain
OFFSET_WINDOW = 256  # (host - device) samples in the lower envelope: ~8 s at 30 fps
DELAY_WINDOW = 2048  # dequeue delays kept for the summary's percentiles


@dataclass(frozen=True)
class Stamp:
    t_ns: int  # capture time on CLOCK_MONOTONIC
    kind: str  # one of STAMP_KINDS
    dequeue_delay_ns: int  # host time at dequeue minus t_ns: how late the reader got the frame


class TimestampMapper:
    def __init__(self, max_age_ns: int = MAX_AGE_NS, window: int = OFFSET_WINDOW):
        self.max_age_ns = max_age_ns
        self._diffs: collections.deque[int] = collections.deque(maxlen=window)
        self._last_device: int | None = None
        self.counts: collections.Counter = collections.Counter()  # by kind, and host_missing / host_backward
        self._delays: collections.deque[int] = collections.deque(maxlen=DELAY_WINDOW)

    def map(self, device_ns: int | None, host_ns: int) -> Stamp:
        """One frame's device stamp (None: the source has none) and the host's monotonic time at dequeue."""
        stamp = self._map(device_ns, host_ns)
        self.counts[stamp.kind] += 1
        self._delays.append(stamp.dequeue_delay_ns)
        return stamp

    def _map(self, device_ns: int | None, host_ns: int) -> Stamp:
        if device_ns is None or device_ns <= 0:
            self.counts["host_missing"] += 1
            return Stamp(host_ns, "host", 0)
        if self._last_device is not None and device_ns <= self._last_device:
            self.counts["host_backward"] += 1
            return Stamp(host_ns, "host", 0)
        self._last_device = device_ns
        age = host_ns - device_ns
        if 0 <= age <= self.max_age_ns:
            self._diffs.clear()  # back in the monotonic domain
            return Stamp(device_ns, "device", age)
        self._diffs.append(age)
        offset = min(self._diffs)  # the least-delayed frame in the window shows the clocks' offset best
        t = device_ns + offset
        return Stamp(t, "device+offset", host_ns - t)

    def report(self) -> dict:
        """Stamp kinds counted and the dequeue delay's p50/p95 (ms), for the summary and `edge-pfm info`."""
        out: dict = {f"stamps_{k}": v for k, v in self.counts.items()}
        if self._delays:
            d = np.asarray(self._delays) / 1e6
            out["dequeue_delay_ms"] = {"p50": round(float(np.percentile(d, 50)), 3),
                                       "p95": round(float(np.percentile(d, 95)), 3)}
        return out
