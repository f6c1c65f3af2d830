"""`edge-pfm serve`: the Runner of `edge-pfm run`, supervised. One code path: nothing here classifies, pairs or
writes decisions; it attaches to the Runner from outside (a sink for the metrics, the Runner's progress and waiting
hooks, its readiness) and reports to systemd and over HTTP.

    start   the config is read and checked, the bundle verified, the health listener bound (any of them failing:
            exit 2 with one line, before READY); then STATUS= says what it waits for, EXTEND_TIMEOUT_USEC= keeps
            systemd waiting while the engine builds, as long as it takes
    READY   once the engine has passed its check, the outputs are open and the cameras started; a camera missing
            at boot does not hold it back: it is reopened, and /readyz says 503 naming it until it delivers
    running WATCHDOG=1 only after progress (WatchdogGate); a camera whose read blocks or whose frames freeze is
            reopened with backoff; one lost past camera_give_up_s ends serve with exit 6, for systemd to restart
    stop    SIGTERM (or SIGINT): STOPPING=1, the Runner stops, the log is closed whole, exit 0
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from edge_pfm.runtime.record import DecisionEvent
from edge_pfm.runtime.sinks import Sink
from edge_pfm.service.metrics import ServiceMetrics
from edge_pfm.service.notify import Notifier, WatchdogGate
from edge_pfm.service.settings import ServeSettings, ViewSettings

_LOG = logging.getLogger(__name__)
WATCHDOG_FRACTION = 0.3  # a ping at most every 0.3 x WatchdogSec (+ a tick): at least two per interval
EXTEND_EVERY_S = 10.0  # while the engine loads: push systemd's start timeout out this often...
EXTEND_BY_S = 60.0  # ...by this much (well past the next push, so a busy machine never misses it)
SYNC_EVERY_S = 0.5  # camera counters into the metrics


class MetricsSink(Sink):
    """Every decision the log gets, counted in the metrics: by state and shown class, its latency, gate flags."""

    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def write(self, event: DecisionEvent) -> None:
        d = event.decision
        total = event.latency_ms.get("total") if event.latency_ms else None
        self.metrics.observe_decision(d.state, d.shown_class, None if total is None else total / 1e3,
                                      pair=event.work is not None)
        if d.state == "gated":
            for flag in d.flags:
                self.metrics.gate_rejected(flag)


# source stats -> the metrics' camera events
CAMERA_COUNTERS = {"frames": ("grabbed",), "drops": ("overwritten", "dropped_gaps", "dropped"),
                   "stalls": ("stalls", "freezes"), "reopens": ("reconnects",)}


class Supervisor:
    """Watches a Runner for systemd and /metrics from one daemon thread: READY once it has started, the watchdog
    pings (fed by the Runner's progress), the cameras' counters, which camera is lost."""

    def __init__(self, runner: Any, notifier: Notifier, metrics: ServiceMetrics, settings: ServeSettings):
        self.runner, self.notifier, self.metrics, self.settings = runner, notifier, metrics, settings
        self.gate = WatchdogGate(notifier, fraction=WATCHDOG_FRACTION)
        self.done = threading.Event()
        self.ready_sent = False
        self._counted: dict[tuple[str, str], int] = {}
        self._last_extend = -EXTEND_EVERY_S  # the first push at the first second of waiting
        runner.attach(MetricsSink(metrics))
        runner.progress_hooks.append(self.gate.progress)
        runner.waiting_hooks.append(self._waiting)

    # -- before READY --------------------------------------------------------------------------------
    def _waiting(self, waited_s: float) -> None:
        """The backend is still loading (called every second): keep systemd waiting, say for how long."""
        if waited_s - self._last_extend >= EXTEND_EVERY_S:
            self._last_extend = waited_s
            self.notifier.extend_timeout(EXTEND_BY_S)
            self.notifier.status(f"building and checking the engine: {waited_s:.0f} s so far (a first TensorRT "
                                 "build on a Jetson takes minutes)")

    def status(self, text: str) -> None:
        _LOG.info(text)
        self.notifier.status(text)

    # -- the thread ----------------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        t = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        t.start()
        return t

    def _loop(self) -> None:
        r = self.runner
        last_sync = 0.0
        engine_said = False
        while not self.done.wait(self.gate.tick_period_s if self.gate.enabled else 0.25):
            if not engine_said and r.ready_event.is_set() and r.classifier is not None:
                engine_said = True
                self._engine_checked()
            if not self.ready_sent and r.started.is_set():
                self.ready_sent = True
                ready, why = r.readiness()
                self.notifier.ready(status="serving" + ("" if ready or "camera_lost" not in why else f"; {why}"))
                _LOG.info("ready: serving")
            self.gate.tick()
            now = time.monotonic()
            if now - last_sync >= SYNC_EVERY_S:
                last_sync = now
                self.sync()

    def _engine_checked(self) -> None:
        b = self.runner.classifier.backend
        check = getattr(b, "check", None)
        verdict = getattr(check, "describe", lambda: "checked")() if check is not None else "checked"
        self.status(f"engine checked: {b.describe()} ({verdict}); opening the outputs and the cameras")
        sig = self.runner.bundle.signature
        self.metrics.set_bundle(version=sig.bundle_version if sig else None,
                                key_id=sig.key_id if sig and sig.verified else None, precision=b.precision,
                                backend=b.identity()["backend"], model=self.runner.bundle.manifest["model"].get("variant"))

    def sync(self) -> None:
        """The cameras' counters since the last sync, and which are lost, into the metrics."""
        for label, source in self.runner.stream.sources.items():
            stats = source.report()
            for kind, keys in CAMERA_COUNTERS.items():
                total = sum(int(stats.get(k, 0)) for k in keys)
                new = total - self._counted.get((label, kind), 0)
                if new > 0:
                    self.metrics.camera_event(label, kind, new)
                    self._counted[(label, kind)] = total
            self.metrics.set_camera_lost(label, bool(source.lost))


def _outputs(config: Any) -> dict[str, Path]:
    return {name: Path(p) for name, p in (("log", config.log), ("video", config.video)) if p}


def view_listeners(view: Any, view_settings: ViewSettings, security: Any, shared: Any = None) -> list[Any]:
    """The live view's routes on `shared` (a listener on the same address: one socket for health and the view), or
    on a listener of its own -> the listeners to start."""
    from edge_pfm.service.listener import Listener

    if shared is not None and shared.address == view_settings.address:
        shared.add_routes(view.routes())
        shared.max_streams = max(shared.max_streams, view_settings.max_clients)
        return [shared]
    own = Listener(view_settings.address, security, view.routes(), max_streams=view_settings.max_clients)
    return [own] if shared is None else [shared, own]


def serve(bundle: Any, config: Any, sources: dict[str, Any], settings: ServeSettings,
          view_settings: ViewSettings | None = None, updates: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `bundle` on `sources` under supervision until SIGTERM/SIGINT, with the live view when [view] listen is
    set, and bundle updates when it runs from the store (`updates`: store, trust, health_pairs, pending). -> the run's
    summary (exit 0). Raises before READY for a port in use (exit 2); CameraLost (exit 6) after camera_give_up_s."""
    from edge_pfm.runtime import Runner
    from edge_pfm.service.health import health_routes
    from edge_pfm.service.listener import Listener

    notifier = Notifier.from_env()
    metrics = ServiceMetrics()
    metrics.set_outputs(_outputs(config))
    view = None
    if view_settings is not None and view_settings.listen:
        from edge_pfm.service.view import LiveView

        view = LiveView()
    runner = Runner(bundle, config=config, view=view, **sources)
    supervisor = Supervisor(runner, notifier, metrics, settings)
    health = Listener(settings.address, settings.security, health_routes(runner.readiness, metrics))
    listeners = view_listeners(view, view_settings, settings.security, health) if view else [health]
    started: list[Any] = []
    try:
        for listener in listeners:  # before the engine loads: /readyz answers "loading the engine" meanwhile
            listener.start()
            started.append(listener)
    except BaseException:
        for listener in started:
            listener.stop()
        raise
    if view is not None:
        _LOG.info(f"live view on {listeners[-1].url}/")

    def stop(signum: int, _frame: object) -> None:
        notifier.stopping()
        notifier.status(f"stopping ({signal.Signals(signum).name})")
        runner.stop_event.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    supervisor.status(f"loading the engine for {bundle.root} ({bundle.signature.describe() if bundle.signature else 'unsigned'})")
    supervisor.start()
    watcher = None
    if updates is not None:
        from edge_pfm.service.updates import UpdateWatcher

        watcher = UpdateWatcher(runner, updates["store"], updates["trust"], updates["health_pairs"], metrics)
        watcher.start(updates.get("pending"))
    try:
        summary = runner.run(install_signal_handlers=False)
    finally:
        if watcher is not None:
            watcher.done.set()
        supervisor.done.set()
        supervisor.sync()
        for listener in listeners:
            listener.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        notifier.close()
    return summary
