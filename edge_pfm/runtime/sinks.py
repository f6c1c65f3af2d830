"""Where decisions go: small sinks behind one protocol, attached to a Runner from outside (as Holoscan attaches
data loggers). The Runner opens each with the run's header, hands it every DecisionEvent from the inference
thread, and closes it.

    runner = Runner(bundle, white, fluo, sinks=[DecisionLogSink("d.jsonl"), ObserverSink(print_it)])

A sink whose output fails (a full disk) raises a RuntimeFailure from write() or sets `failure`; the run then
ends cleanly with the sink's `failed_state` (log_failed, video_failed) on stderr, the preview and current().
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_pfm.decision import Decision
from edge_pfm.outputs import (
    LOG_BYTES_PER_DECISION,
    LOG_RETENTION,
    VIDEO_BYTES_PER_PIXEL,
    VIDEO_RETENTION,
    OutputPlan,
    Retention,
)
from edge_pfm.runtime.config import RunConfig
from edge_pfm.runtime.paired_stream import PreparedPair
from edge_pfm.runtime.record import DecisionEvent


@dataclass(frozen=True)
class RunStart:
    header: dict[str, Any]  # the run header (decision_log): run id, bundle, engine, precision, config hash
    classes: tuple[str, ...]


class Sink:
    """The protocol, with do-nothing defaults."""

    failed_state = "output_failed"
    failure: Exception | None = None

    def plan(self, decisions_per_s: float) -> OutputPlan | None:
        """What this sink will write, for the disk preflight (None: nothing on disk)."""
        return None

    def open(self, run: RunStart) -> None:
        pass

    def write(self, event: DecisionEvent) -> None:
        raise NotImplementedError

    def show_failure(self, decision: Decision) -> None:
        """Another output failed: show it to the person at the device, if this sink can."""

    def switch(self, run: RunStart) -> None:
        """The model changed mid-run (a bundle update): what follows is decided by `run`'s engine."""

    def close(self) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {}


class DecisionLogSink(Sink):
    """The decision log (edge_pfm.decision_log): JSON lines, rotated under its retention."""

    failed_state = "log_failed"

    def __init__(self, path: str | Path, retention: Retention = LOG_RETENTION):
        self.path, self.retention = Path(path), retention
        self.log = None

    def plan(self, decisions_per_s: float) -> OutputPlan:
        return OutputPlan("the decision log", self.path, LOG_BYTES_PER_DECISION * decisions_per_s, self.retention)

    def open(self, run: RunStart) -> None:
        from edge_pfm.decision_log import DecisionLog

        self.log = DecisionLog(self.path, run.header, self.retention)

    def write(self, event: DecisionEvent) -> None:
        self.log.write(event.record)

    def switch(self, run: RunStart) -> None:
        self.log.new_run(run.header)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    def report(self) -> dict[str, Any]:
        if self.log is None:
            return {}
        return {"log": {"path": str(self.path), "lines": self.log.lines, "removed": [str(p) for p in self.log.removed]}}


class AnnotatedVideoSink(Sink):
    """The annotated side-by-side video and/or the preview window (edge_pfm.overlay), drawn off the inference
    thread."""

    failed_state = "video_failed"
    DRAWN_FPS = 15.0

    def __init__(self, path: str | Path | None, preview: bool = False, retention: Retention = VIDEO_RETENTION,
                 on_drawn: Callable | None = None):
        """on_drawn(frame, decision, t_capture_ns): another consumer of the drawn frames (the live view): one
        drawing thread serves the file, the window and the view, nothing is drawn twice."""
        self.path, self.preview, self.retention = (None if path is None else str(path)), preview, retention
        self.on_drawn = on_drawn
        self.video = None

    @property
    def failure(self) -> Exception | None:  # type: ignore[override]
        return None if self.video is None else self.video.failure

    def plan(self, decisions_per_s: float) -> OutputPlan | None:
        if self.path is None:
            return None
        pixels = 2 * 640 * 400  # annotate(): both frames side by side at 360 px high, and the status bar
        return OutputPlan("the video", Path(self.path), VIDEO_BYTES_PER_PIXEL * pixels * self.DRAWN_FPS,
                          self.retention)

    def open(self, run: RunStart) -> None:
        from edge_pfm.overlay import AnnotatedVideo

        self.video = AnnotatedVideo(self.path, self.preview, run.classes, self.DRAWN_FPS, retention=self.retention,
                                    on_drawn=self.on_drawn)

    def write(self, event: DecisionEvent) -> None:
        if event.work is not None:
            p = event.work.pair
            self.video.submit(p.white_light.image, p.fluorescence.image, event.decision, event.work.gates,
                              p.t_capture_ns)
        elif self.on_drawn is not None:  # no_signal, camera_lost: the view shows it over the last frame
            self.video.show_failure(event.decision)

    def show_failure(self, decision: Decision) -> None:
        if self.video is not None:
            self.video.show_failure(decision)

    def close(self) -> None:
        if self.video is not None:
            self.video.close()

    def report(self) -> dict[str, Any]:
        if self.video is None or self.path is None:
            return {}
        return {"video": {"path": self.path, "frames": self.video.frames, "removed": [str(p) for p in self.video.removed]}}


class ObserverSink(Sink):
    """Calls each of `observers` (a list that may grow before the run) with (prepared pair, decision) for every
    inferred pair: checks, metrics, a test's watcher."""

    def __init__(self, observers: list[Callable[[PreparedPair, Decision], None]]):
        self.observers = observers

    def write(self, event: DecisionEvent) -> None:
        if event.work is not None:
            for observe in self.observers:
                observe(event.work, event.decision)


class MemorySink(Sink):
    """Keeps every record in memory (short runs, tests)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, event: DecisionEvent) -> None:
        self.records.append(event.record)


def sinks_from_config(cfg: RunConfig, on_drawn: Callable | None = None) -> list[Sink]:
    """The outputs RunConfig names (--log, --video, --preview) as sinks; `on_drawn` (the live view) shares the
    video's drawing thread."""
    sinks: list[Sink] = []
    if cfg.log:
        sinks.append(DecisionLogSink(cfg.log, cfg.log_retention))
    if cfg.video or cfg.preview or on_drawn is not None:
        sinks.append(AnnotatedVideoSink(cfg.video, cfg.preview, cfg.video_retention, on_drawn))
    return sinks
