"""The Runner: owns the threads, the freshest-pair slot and start/stop; everything else is a room of its own.

Threads: one reader per camera (sources), which prepares and pairs each frame as it lands (paired_stream); one
inference thread that owns the backend (TensorRT contexts are per thread), decides (decision) and hands each
decision to the sinks (sinks: the log, the video, observers); the caller's thread waits, watches the sinks and
stops. Latency runs from the capture of a pair's older frame to its decision (record.LATENCY_STAGES).
"""
from __future__ import annotations

import collections
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_pfm.bundle import Bundle
from edge_pfm.decision import Decision, DecisionEngine
from edge_pfm.errors import ExitCode, RuntimeFailure
from edge_pfm.outputs import preflight
from edge_pfm.runtime.config import RunConfig
from edge_pfm.runtime.health import SourceHealth, signal_problem
from edge_pfm.runtime.latency_window import LatencyWindow
from edge_pfm.runtime.modality import ModalityWatch
from edge_pfm.runtime.paired_stream import CAMERA, PairedStream, PreparedPair
from edge_pfm.runtime.record import LATENCY_STAGES, DecisionEvent, RunContext, latencies
from edge_pfm.runtime.sinks import MemorySink, ObserverSink, RunStart, Sink, sinks_from_config
from edge_pfm.runtime.summary import percentiles
from edge_pfm.sources.base import FrameSource
from edge_pfm.sources.replay import link_replays

if TYPE_CHECKING:
    from edge_pfm.classifier import Classifier

_LOG = logging.getLogger(__name__)
STAGES = LATENCY_STAGES
LATENCY_WINDOW = 20_000  # latency samples kept per stage: the summary covers the last ~11 minutes at 30 fps
BACKEND_LOAD_S = 120.0  # the engine is built or loaded before the cameras start


class CamerasMismatched(RuntimeFailure):
    """A camera's first frames look like the other modality (swapped cameras): the run does not start."""


class CameraLost(RuntimeFailure):
    """A camera stayed lost past RunConfig.camera_give_up_s: the run ends so that a supervisor restarts it."""

    exit_code = ExitCode.CAMERA_LOST


class Runner:
    def __init__(self, bundle: str | Path | Bundle, white: FrameSource | None = None, fluo: FrameSource | None = None,
                 alternating: FrameSource | None = None, config: RunConfig | None = None, classifier: Classifier | None = None,
                 sinks: Iterable[Sink] = (), view: Any = None):
        if alternating is None and (white is None or fluo is None):
            raise ValueError("give both white and fluo sources, or one alternating source")
        self.cfg = config or RunConfig()
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        sources = {CAMERA: alternating} if alternating is not None else {"white_light": white, "fluorescence": fluo}
        self.modality = None if alternating is not None else ModalityWatch(self.cfg.modality)
        self.stream = PairedStream(sources, self.bundle.preprocessing, self.cfg.gates, self.cfg.tolerance_ms,
                                   on_error=self._crashed, watch=self.modality)
        self.sources: list[FrameSource] = list(sources.values())
        link_replays(self.sources)  # the replays of one recording share its time base (sources.replay)
        self.classifier: Classifier | None = classifier  # built in the inference thread when None
        self.engine: DecisionEngine | None = None
        self.thread_plan: Any = None  # the backend's thread plan, once it is loaded
        self.observers: list[Callable[[PreparedPair, Decision], None]] = []  # called for every inferred pair
        # supervision (edge_pfm.service) hooks in from outside: progress() on every decision and on every deliberate
        # wait (a camera being reopened, cameras alive but no pair); waiting(seconds) while the backend loads
        self.progress_hooks: list[Callable[[], None]] = []
        self.waiting_hooks: list[Callable[[float], None]] = []
        # view: a live view (edge_pfm.service.view.LiveView) fed by the video's drawing thread and every record
        self.view = view
        drawn = view.frame_drawn if view is not None else None
        self.sinks: list[Sink] = [*sinks_from_config(self.cfg, drawn), *sinks, *([view.sink()] if view else []),
                                  ObserverSink(self.observers)]
        self._memory: MemorySink | None = None
        self.run_id = uuid.uuid4().hex
        # bounded: an always-on device must not grow with uptime
        self.timings: dict[str, LatencyWindow] = {s: LatencyWindow(LATENCY_WINDOW) for s in STAGES}
        self.counts: collections.Counter = collections.Counter()
        self.decisions_made = 0  # every decision's number in this run ("n" in the log): a gap is a lost line
        self.last_state: str | None = None
        self.last_flags: list[str] = []
        self.last_infer_error: str | None = None
        self.error: BaseException | None = None  # a thread's crash, raised by run()
        self.failure: Exception | None = None  # an output that could not be written: the run stops on it
        self.failed_state: str | None = None  # log_failed | video_failed, for current()
        self.stop_event = threading.Event()
        self.ready_event = threading.Event()  # the backend is loaded (or failed)
        self.started = threading.Event()  # outputs open and cameras started: inference may decide and write
        self.t_start_ns = 0
        self.elapsed_s = 0.0
        self.lost_since_ns: dict[str, int] = {}  # camera -> when it was lost (give-up clock)
        self._context: RunContext | None = None
        self._failed: list[Sink] = []  # sinks whose output failed: they get nothing more
        self._lost_said: str | None = None  # the camera_lost reason last emitted
        self._switch: tuple | None = None  # (bundle, classifier, done): applied by the inference thread
        self.switches: list[dict[str, Any]] = []  # each switch: when, after which decision, from and to

    # -- what tests and tools attach ----------------------------------------------------------------
    def attach(self, sink: Sink) -> Sink:
        """Add a sink before run()."""
        self.sinks.insert(len(self.sinks) - 1, sink)
        return sink

    @property
    def keep_decisions(self) -> bool:
        return self._memory is not None

    @keep_decisions.setter
    def keep_decisions(self, keep: bool) -> None:
        """Keep every record in memory (`decisions`): for short runs and tests."""
        if keep and self._memory is None:
            self._memory = self.attach(MemorySink())

    @property
    def decisions(self) -> list[dict[str, Any]]:
        return [] if self._memory is None else self._memory.records

    @property
    def pairer(self):
        return self.stream.pairer

    # -- the inference thread -----------------------------------------------------------------------
    def _load(self) -> None:
        from edge_pfm.classifier import Classifier

        c = self.cfg
        clf = self.classifier or Classifier(self.bundle, c.backend, c.precision, c.threads, c.cache_dir)
        self.classifier = clf
        self.thread_plan = getattr(clf.backend, "thread_plan", None)
        if self.thread_plan is not None:
            from edge_pfm.thread_plan import apply_opencv_threads

            apply_opencv_threads(self.thread_plan)
        self._hold_rollback_floor()
        self.engine = DecisionEngine(clf.classes, c.decision, clf.lesion_verdict.classes)
        self._context = RunContext(self.run_id, clf.backend.describe(), clf.model_sha256, clf.engine_identity,
                                   clf.classes)

    def _hold_rollback_floor(self) -> None:
        """Say what the bundle's signature is; a verified bundle's version becomes the device's rollback floor the
        first time it runs (edge_pfm.trust.rollback), so an older signed bundle is refused from then on."""
        verdict = self.bundle.signature
        if verdict is None:
            return
        _LOG.info(f"bundle {self.bundle.root}: {verdict.describe()}")
        if verdict.verified and verdict.bundle_version is not None and self.cfg.raise_floor_at_start:
            from edge_pfm.trust.rollback import raise_floor

            if raise_floor(verdict.bundle_version, self.bundle.trust.writable_state_dir()):
                _LOG.info(f"rollback floor raised to bundle version {verdict.bundle_version}: older signed bundles "
                          "are refused from now on")

    def _infer_loop(self) -> None:
        from edge_pfm.backends import BackendError
        from edge_pfm.classifier import NonFiniteOutput

        self._load()
        self.ready_event.set()
        while not self.started.wait(0.05):  # the log opens (its header names this engine), then the cameras start
            if self.stop_event.is_set():
                return
        clf, engine = self.classifier, self.engine
        while not self.stop_event.is_set():
            if self._switch is not None:  # at a pair boundary: nothing of the old model is in flight
                clf, engine = self._apply_switch()
            work = self.stream.next(0.05)
            if work is None:
                self._idle(time.monotonic_ns())
                continue
            if work.generation != self.stream.generation:  # prepared for the model before a switch
                self.counts["pairs_dropped_switch"] += 1
                continue
            t0 = time.monotonic_ns()
            try:
                out = clf.backend.infer_outputs(work.white, work.fluo)
            except BackendError as exc:
                self.counts["infer_errors"] += 1
                self.last_infer_error = str(exc)
                continue
            t1 = time.monotonic_ns()  # "infer" is the backend's call alone; checking and deciding is "decide"
            try:
                result = clf.classify_outputs(out, work.pair.white_light.image.shape, every_map=True)
            except NonFiniteOutput:
                self._emit(engine.reject(t1), work, None, t0, t1)
                continue
            gate_flags = [f"{m}:{flag}" for m, fl in work.gates.items() for flag in fl]
            if self.modality is not None:
                gate_flags += self.modality.flags()  # a camera that now looks like the other one: swapped?
            self._emit(engine.update(result.prob_vector, t1, gate_flags, result.lesion_map), work,
                       result.prob_vector, t0, t1)

    def request_switch(self, bundle: Bundle, classifier: Classifier) -> threading.Event:
        """Switch to `classifier` (loaded and checked, for `bundle`) at the next pair boundary: the pairs prepared
        for the old model are dropped, the sinks start a new run (the log a new header), decisions keep their
        numbers. -> an event set once the switch is applied (`switches[-1]` then says when)."""
        done = threading.Event()
        self._switch = (bundle, classifier, done)
        return done

    def _apply_switch(self) -> tuple[Classifier, DecisionEngine]:
        bundle, clf, done = self._switch
        self._switch = None
        old = self.classifier
        clf.backend.adopt_thread()  # loaded by another thread; this one runs it (TensorRT checks the owner)
        self.stream.set_preprocessing(bundle.preprocessing)
        self.bundle, self.classifier = bundle, clf
        self.thread_plan = getattr(clf.backend, "thread_plan", None)
        self.engine = DecisionEngine(clf.classes, self.cfg.decision, clf.lesion_verdict.classes)
        self._context = RunContext(self.run_id, clf.backend.describe(), clf.model_sha256, clf.engine_identity,
                                   clf.classes)
        start = RunStart(self._header(self.stream.tolerance.to_dict()), clf.classes)
        for sink in self.sinks:
            if sink not in self._failed:
                try:
                    sink.switch(start)
                except RuntimeFailure as exc:
                    self._output_failed(exc, sink)
        self.switches.append({"t_ns": time.monotonic_ns(), "last_n": self.decisions_made, "bundle": str(bundle.root),
                              "from": str(old.bundle.root) if old is not None else None})
        _LOG.info(f"switched to {bundle.root} ({clf.backend.describe()}) after decision {self.decisions_made}")
        if old is not None and old is not clf:
            old.backend.close()  # its session, or engine and device buffers, are not needed any more
        done.set()
        return clf, self.engine

    def _idle(self, now_ns: int) -> None:
        """No pair came: say why once (camera_lost naming the camera being reopened, else no_signal), and stop when
        every source has ended. Waiting deliberately (a camera being reopened, or every reader alive) is progress."""
        lost = self.lost_cameras()
        if lost:
            why = "; ".join(f"{label}: {reason}" for label, reason in lost.items())
            if self.last_state != "camera_lost" or self._lost_said != why:
                self._lost_said = why
                self._emit(self.engine.no_signal(now_ns, why, state="camera_lost"))
        else:
            health = [SourceHealth(label, s.ended, s.last_frame_ns) for label, s in self.stream.sources.items()]
            why = signal_problem(now_ns, self.t_start_ns, health, self.stream.last_pair_ns,
                                 self.cfg.signal_timeout_s, self.stream.tolerance.ns)
            if why and self.last_state != "no_signal":
                self._emit(self.engine.no_signal(now_ns, why))
        if self.stream.ended:
            self.stop_event.set()
        elif lost or all(s.reading for s in self.stream.sources.values()):
            self._progress()

    def lost_cameras(self) -> dict[str, str]:
        """camera -> why, for each camera being reopened (decision.py: camera_lost)."""
        return {label: s.lost for label, s in self.stream.sources.items() if s.lost}

    def _progress(self) -> None:
        for hook in self.progress_hooks:
            hook()

    def _emit(self, decision: Decision, work: PreparedPair | None = None, probs=None, t0: int = 0, t1: int = 0) -> None:
        t_dec = time.monotonic_ns()
        self.last_state, self.last_flags = decision.state, list(decision.flags)
        self.counts[f"decisions_{decision.state}"] += 1
        self.decisions_made += 1
        lat = None
        if work is not None:
            lat = latencies(work, t0, t1, t_dec)
            for k, v in lat.items():
                self.timings[k].append(v)
            self.counts["pairs_inferred"] += 1
        event = DecisionEvent(self.decisions_made, t_dec, decision, self._context, work, probs, lat)
        for sink in self.sinks:
            if sink in self._failed:
                continue
            try:
                sink.write(event)
            except RuntimeFailure as exc:
                self._output_failed(exc, sink)
        self._progress()

    # -- public -------------------------------------------------------------------------------------
    def run(self, seconds: float | None = None, install_signal_handlers: bool = False) -> dict[str, Any]:
        seconds = seconds if seconds is not None else self.cfg.seconds
        # before the engine loads and the cameras start
        preflight([p for s in self.sinks if (p := s.plan(self.stream.nominal_fps)) is not None], seconds,
                  self.cfg.min_free_bytes)
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGXFSZ"):
            # past a file-size limit (RLIMIT_FSIZE) writes fail with EFBIG instead of the signal killing the process
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop_event.set())
        infer_thread = threading.Thread(target=self._guard(self._infer_loop), name="infer", daemon=True)
        infer_thread.start()
        opened: list[Sink] = []
        try:
            if not self._wait_for_backend():  # stopped (SIGTERM) while the engine loaded: nothing was opened
                self.stop_event.set()
                return self.summary()
            tolerance = self.stream.open(self.cfg.missing_cameras_ok)
            start = RunStart(self._header(tolerance.to_dict()), self.classifier.classes)
            for sink in self.sinks:
                sink.open(start)
                opened.append(sink)
        except BaseException:
            self.stop_event.set()
            self.stream.stop()  # the sources opened before one failed
            infer_thread.join(5)
            self._close(opened, quiet=True)
            raise
        self.t_start_ns = time.monotonic_ns()
        self.stream.start(self.cfg.missing_cameras_ok, self.cfg.frozen_frames)
        try:
            why = self.modality.refusal() if self.modality is not None else None
            if why:  # before the first decision: a swapped camera would be classified with full confidence
                raise CamerasMismatched(why)
            self.started.set()
            deadline = None if seconds is None else time.monotonic() + seconds
            while not self.stop_event.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self._watch_sinks()
                self._watch_cameras(time.monotonic_ns())
                self.stop_event.wait(0.05)
        finally:
            self.stop_event.set()
            self.stream.stop()
            infer_thread.join(10)
            self._close(self.sinks)
        self.elapsed_s = (time.monotonic_ns() - self.t_start_ns) / 1e9
        if self.error:
            raise self.error
        if self.failure is not None:
            raise self.failure
        return self.summary()

    def _wait_for_backend(self) -> bool:
        """Wait while the inference thread builds or loads the engine: at most cfg.backend_load_s, or as long as it
        takes (None), telling waiting_hooks every second. -> False when stopped meanwhile (the build goes on in its
        daemon thread and ends with the process: engine files are written atomically, so nothing half-built stays)."""
        limit, t0 = self.cfg.backend_load_s, time.monotonic()
        while not self.ready_event.wait(1.0):
            waited = time.monotonic() - t0
            if self.stop_event.is_set():
                return False
            if limit is not None and waited >= limit:
                raise RuntimeFailure(f"the backend did not load within {limit:.0f} s")
            for hook in self.waiting_hooks:
                hook(waited)
        if self.error:
            raise self.error
        return not self.stop_event.is_set()

    def _watch_cameras(self, now_ns: int) -> None:
        """Recovery the caller's thread sees to: a read blocked past camera_stall_s is abandoned and the camera
        reopened; a camera lost past camera_give_up_s ends the run (CameraLost)."""
        cfg = self.cfg
        for label, source in self.stream.sources.items():
            since = source.grab_since_ns  # read once: the reader may clear it meanwhile
            blocked = since and now_ns - since
            if cfg.camera_stall_s is not None and blocked and blocked > cfg.camera_stall_s * 1e9 and \
                    source.restart(f"a read blocked for more than {cfg.camera_stall_s:g} s (stalled)"):
                _LOG.warning(f"{label} camera: a read blocked for more than {cfg.camera_stall_s:g} s: reopening")
            if not source.lost:
                self.lost_since_ns.pop(label, None)
                continue
            since = self.lost_since_ns.setdefault(label, now_ns)
            if cfg.camera_give_up_s is not None and now_ns - since > cfg.camera_give_up_s * 1e9:
                raise CameraLost(f"the {label} camera has been lost for {(now_ns - since) / 1e9:.0f} s "
                                 f"({source.lost}); giving up after camera_give_up_s = {cfg.camera_give_up_s:g} s "
                                 "so that the service is restarted")

    def readiness(self) -> tuple[bool, str]:
        """(whether a decision can be made now, why not): the engine loaded and checked, the outputs open, every
        camera delivering, and the last decision made from a pair."""
        if self.error is not None:
            return False, f"the runtime failed: {self.error}"
        if self.failure is not None:
            return False, f"{self.failed_state}: {self.failure}"
        if not self.ready_event.is_set():
            return False, "loading the engine (building and checking it can take minutes on a first start)"
        if not self.started.is_set():
            return False, "opening the cameras and outputs"
        lost = self.lost_cameras()
        if lost:
            return False, "camera_lost: " + "; ".join(f"{label} camera: {why}" for label, why in lost.items())
        state = self.last_state
        if state is None:
            return False, "waiting for the first pair"
        if state == "no_signal":
            return False, "no_signal: " + "; ".join(self.last_flags)
        return True, state

    def _close(self, sinks: list[Sink], quiet: bool = False) -> None:
        for sink in sinks:
            try:
                sink.close()
            except RuntimeFailure as exc:  # e.g. the log's last fsync failed: the lines before it are on disk
                if not quiet:
                    self._output_failed(exc, sink)
        if not quiet:
            self._watch_sinks()

    def _watch_sinks(self) -> None:
        for sink in self.sinks:
            if sink.failure is not None:
                self._output_failed(sink.failure, sink)

    def _crashed(self, exc: BaseException) -> None:
        """A thread hit a bug: run() raises it; the other threads stop."""
        if self.error is None:
            self.error = exc
        self.stop_event.set()
        self.ready_event.set()

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                self._crashed(exc)

        return run

    def current(self) -> Decision | None:
        """What a display may show right now (a decision older than its bound comes back 'stale'; a failed output
        comes back as its state, log_failed or video_failed, with the reason as its flag)."""
        if self.failed_state is not None:
            return Decision(self.failed_state, None, 0.0, [], time.monotonic_ns(), [str(self.failure)])
        return None if self.engine is None else self.engine.current(time.monotonic_ns())

    def _output_failed(self, exc: Exception, sink: Sink) -> None:
        """An output failed while running: say so at once (stderr, preview, current()), then stop cleanly."""
        if sink not in self._failed:
            self._failed.append(sink)
        if self.failure is not None:
            return
        state = sink.failed_state
        self.failure, self.failed_state = exc, state
        _LOG.error(f"{state}: {exc}")
        shown = self.current()
        for sink in self.sinks:
            sink.show_failure(shown)
        self.stop_event.set()

    def _header(self, pairing: dict[str, Any]) -> dict[str, Any]:
        """The run header that opens every decision-log file: which run, bundle, engine, pairing and configuration."""
        import edge_pfm
        from edge_pfm.fileio import sha256_file

        bundle, backend = self.bundle, self.classifier.backend
        ident = backend.identity()
        return {"run_id": self.run_id, "edge_pfm": edge_pfm.__version__, "bundle": str(bundle.root),
                "bundle_sha256": sha256_file(bundle.root / "manifest.json"),
                "model": bundle.manifest["model"].get("variant"), "precision": backend.precision,
                "engine": {"backend": ident["backend"], "version": ident.get("version"),
                           "flavour": ident.get("flavour", ident["backend"]), "built_from": ident["built_from"],
                           "engine_sha256": ident["engine_sha256"]},
                "signature": bundle.signature.to_record() if bundle.signature else None,
                "pairing": pairing, "config_sha256": self.cfg.digest()}

    def summary(self) -> dict[str, Any]:
        inferred = self.counts["pairs_inferred"]
        stats = self.stream.pairer.stats
        tolerance = self.stream.tolerance
        outputs: dict[str, Any] = {}
        for sink in self.sinks:
            outputs.update(sink.report())
        return {
            "seconds": round(self.elapsed_s, 2),
            "pairs": int(stats["pairs"]),
            "pairs_inferred": inferred,
            "pairs_per_s": round(inferred / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "pairs_dropped_stale": self.stream.stats["pairs_dropped_stale"],
            "unpaired": {k: v for k, v in stats.items() if k.startswith("unpaired")},
            "pairing": dict(stats),
            "tolerance": {**tolerance.to_dict(), "describe": tolerance.describe()},
            "sources": {label: s.report() for label, s in self.stream.sources.items()},
            "decisions": {k.removeprefix("decisions_"): v for k, v in self.counts.items() if k.startswith("decisions_")},
            "decisions_made": self.decisions_made,
            "gated": self.engine.stats["gated"] if self.engine else 0,
            "rejected_nonfinite": self.engine.stats["rejected_nonfinite"] if self.engine else 0,
            "bad_frames": self.stream.stats["bad_frames"],
            "modality": self.modality.report() if self.modality is not None else None,
            "infer_errors": self.counts["infer_errors"],
            "latency_ms": {k: percentiles(v) for k, v in self.timings.items()},
            "backend": self.classifier.backend.describe() if self.classifier else None,
            "thread_plan": self.thread_plan.to_dict() if self.thread_plan else None,
            "lesion_map": self.classifier.lesion_verdict.describe() if self.classifier else None,
            "outputs": outputs,
        }
