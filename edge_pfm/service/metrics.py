"""The Prometheus metrics of `edge-pfm serve`, rendered for /metrics.

    metrics = ServiceMetrics()                       # imports prometheus_client (the `service` extra)
    metrics.observe_decision("ok", "cin2plus", 0.042)
    metrics.camera_event("fluorescence", "drops")
    metrics.set_outputs({"log": Path("/var/lib/edge-pfm/decisions.jsonl")})
    body, content_type = metrics.render()

One registry of our own, not prometheus_client's global REGISTRY: a second ServiceMetrics (a test, a restarted
runtime) starts from zero instead of colliding on names, and /metrics shows only what this service measures.
Everything is `edge_pfm_`-prefixed. Values read from the system (free disk, RSS, the recent pairs/s) are computed
when scraped, never by a timer; a value that cannot be read is NaN, never a failed scrape.

Rates are Prometheus' job: `rate(edge_pfm_pairs_decided_total[1m])` is pairs/s; `edge_pfm_pairs_per_second` is the
same over the last `window_s` seconds, for a glance at /metrics without a Prometheus.
"""
from __future__ import annotations

import math
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edge_pfm._lazy import MissingDependencyError

INSTALL = "pip install 'edge-pfm[service]'"
CAMERA_EVENTS = ("frames", "drops", "stalls", "reopens")
# capture-to-decision latency: 10-500 ms is the working range (a pair every 33-66 ms, inference 5-100 ms);
# finer steps where a regression first shows, and a tail past a second for a stalled pipeline
LATENCY_BUCKETS_S = (0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
NO_CLASS = "none"  # the cls label of a decision that shows no class (warming up, gated, no signal)


def _prometheus_client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise MissingDependencyError(f"edge-pfm serve's /metrics needs prometheus_client, which is not importable "
                                     f"({exc}). Install it: {INSTALL}") from exc
    return prometheus_client


def rss_bytes() -> float:
    """This process's resident set: VmRSS from /proc/self/status (Linux, the device); elsewhere the peak RSS from
    getrusage (ru_maxrss: KiB on Linux, bytes on macOS); NaN when neither answers."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(int(line.split()[1]) * 1024)  # "VmRSS:    123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return math.nan


def free_bytes(path: Path) -> float:
    """Free bytes (for an unprivileged writer) on the filesystem that holds `path`, or on its nearest existing
    folder when the output is not written yet; NaN when that cannot be read (an unmounted card)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return float(shutil.disk_usage(p).free)
    except OSError:
        return math.nan


class ServiceMetrics:
    """The service's metrics in a registry of their own; every method is safe from any thread."""

    def __init__(self, *, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        pc = _prometheus_client()
        self._pc = pc
        self.registry = pc.CollectorRegistry()
        r = self.registry
        self._window_s = float(window_s)
        self._clock = clock
        self._recent: deque[float] = deque(maxlen=100_000)
        self._lock = threading.Lock()

        self.pairs = pc.Counter("edge_pfm_pairs_decided", "Pairs decided (rate() of it is pairs/s).", registry=r)
        pc.Gauge("edge_pfm_pairs_per_second", f"Pairs decided per second over the last {window_s:g} s.",
                 registry=r).set_function(self._pairs_per_second)
        self.decisions = pc.Counter("edge_pfm_decisions", "Decisions by state and shown class.", ["state", "cls"],
                                    registry=r)
        self.latency = pc.Histogram("edge_pfm_decision_latency_seconds", "Capture-to-decision latency.",
                                    buckets=LATENCY_BUCKETS_S, registry=r)
        self.camera = {kind: pc.Counter(f"edge_pfm_camera_{kind}", f"Camera {kind}.", ["camera"], registry=r)
                       for kind in CAMERA_EVENTS}
        self.gate_rejections = pc.Counter("edge_pfm_gate_rejections", "Pairs rejected by a quality gate.", ["gate"],
                                          registry=r)
        self.disk_free = pc.Gauge("edge_pfm_disk_free_bytes", "Free bytes on each output's filesystem.", ["output"],
                                  registry=r)
        pc.Gauge("edge_pfm_process_resident_memory_bytes", "Resident memory of this process.",
                 registry=r).set_function(rss_bytes)
        self.bundle = pc.Info("edge_pfm_bundle", "The bundle being served.", registry=r)
        self.ready = pc.Gauge("edge_pfm_ready", "1 when a decision can be made now (as /readyz answers).",
                              registry=r)
        self.updates = pc.Counter("edge_pfm_bundle_updates", "Bundle updates by result (installed, switched, "
                                  "committed, refused, rolled_back) and the step that refused or rolled back.",
                                  ["result", "step"], registry=r)
        self.camera_lost = pc.Gauge("edge_pfm_camera_lost", "1 while the camera is lost (being reopened).",
                                    ["camera"], registry=r)

    # -------------------------------------------------------- what the runtime reports

    def observe_decision(self, state: str, cls: str | None, latency_s: float | None, pair: bool = True) -> None:
        """One decision, in `state` (decision.STATES) showing `cls` (None: no class shown); `pair`: made from a pair
        (False for no_signal and camera_lost, which count as decisions but not as pairs decided)."""
        self.decisions.labels(state=state, cls=cls or NO_CLASS).inc()
        if latency_s is not None and math.isfinite(latency_s) and latency_s >= 0:
            self.latency.observe(latency_s)
        if not pair:
            return
        self.pairs.inc()
        now = self._clock()
        with self._lock:
            self._recent.append(now)

    def camera_event(self, camera: str, kind: str, n: int = 1) -> None:
        """Count `n` of `kind` (frames, drops, stalls, reopens) for `camera`."""
        counter = self.camera.get(kind)
        if counter is None:
            raise ValueError(f"camera event {kind!r}: one of {', '.join(CAMERA_EVENTS)}")
        counter.labels(camera=camera).inc(n)

    def gate_rejected(self, gate: str) -> None:
        self.gate_rejections.labels(gate=gate).inc()

    def set_bundle(self, *, version: str | int | None, key_id: str | None, precision: str | None,
                   backend: str | None, model: str | None) -> None:
        """The bundle being served, as labels of edge_pfm_bundle_info (an unsigned bundle: key_id 'unsigned')."""
        self.bundle.info({"version": "" if version is None else str(version), "key_id": key_id or "unsigned",
                          "precision": precision or "", "backend": backend or "", "model": model or ""})

    def set_outputs(self, outputs: Mapping[str, Path | str]) -> None:
        """The outputs whose filesystems' free space is reported (replaces the previous set)."""
        self.disk_free.clear()
        for name, path in outputs.items():
            self.disk_free.labels(output=name).set_function(lambda p=Path(path): free_bytes(p))

    def update_event(self, result: str, step: str = "") -> None:
        self.updates.labels(result=result, step=step).inc()

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def set_camera_lost(self, camera: str, lost: bool) -> None:
        self.camera_lost.labels(camera=camera).set(1 if lost else 0)

    # -------------------------------------------------------- scraping

    def _pairs_per_second(self) -> float:
        now = self._clock()
        with self._lock:
            while self._recent and self._recent[0] < now - self._window_s:
                self._recent.popleft()
            n = len(self._recent)
        return n / self._window_s  # over the whole window: it ramps up in a service's first window, never spikes

    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type. The 0.0.4 content type where this prometheus_client
        names it (0.26: CONTENT_TYPE_LATEST became 1.0.0, which older scrapers do not know; our names are plain, so
        the bytes are the same), else CONTENT_TYPE_LATEST (0.20-0.25: that is 0.0.4)."""
        content_type = getattr(self._pc, "CONTENT_TYPE_PLAIN_0_0_4", None) or self._pc.CONTENT_TYPE_LATEST
        return self._pc.generate_latest(self.registry), content_type
