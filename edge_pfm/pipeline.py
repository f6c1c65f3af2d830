"""The streaming runner: capture -> pair -> preprocess -> infer -> decide -> log.

Threads: one reader per camera (in the sources), which also preprocesses and gates each frame as it
arrives, so a pair is ready the moment its second frame lands; one pairing thread; one inference
thread that owns the backend (TensorRT contexts are per thread). Between stages, bounded queues that
drop the oldest, so inference always sees the freshest pair while capture and preprocessing overlap
with it. Every stage is timed; latency runs from the capture of the older frame of a pair to its
decision ("preprocess" is what remains after pairing: frames are prepared before).
"""
from __future__ import annotations

import collections
import datetime as _dt
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_pfm.decision import DecisionConfig, DecisionEngine, softmax
from edge_pfm.decision_log import DecisionLog, LogWriteError
from edge_pfm.latency_window import LatencyWindow
from edge_pfm.lesion import LesionMap
from edge_pfm.outputs import (
    LOG_BYTES_PER_DECISION,
    LOG_RETENTION,
    MIN_FREE_BYTES,
    VIDEO_BYTES_PER_PIXEL,
    VIDEO_RETENTION,
    OutputPlan,
    Retention,
    preflight,
)
from edge_pfm.pairing import AlternatingPairer, Pair, TimestampPairer
from edge_pfm.quality import GateConfig, assess
from edge_pfm.sources import FrameSource

_LOG = logging.getLogger(__name__)
# phase: the older frame waiting for its partner (camera phase offset, not the software's);
# software: from the newer frame's capture to the decision (what the software adds)
STAGES = ("pair_wait", "preprocess", "queue", "infer", "decide", "total", "phase", "software")
LATENCY_WINDOW = 20_000  # latency samples kept per stage: the summary covers the last ~11 minutes at 30 fps


@dataclass
class RunConfig:
    backend: str = "auto"
    precision: str | None = None
    threads: int | None = None
    cache_dir: str | None = None  # engines, check records and the measured pick (default ~/.cache/edge-pfm/engines)
    tolerance_ms: float | None = None  # pairing tolerance; default half a frame period
    fps_hint: float = 30.0
    signal_timeout_s: float = 1.0  # no frame from a camera for this long -> no_signal
    seconds: float | None = None
    log: str | None = None
    video: str | None = None
    preview: bool = False
    gates: GateConfig = field(default_factory=GateConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    log_retention: Retention = LOG_RETENTION
    video_retention: Retention = VIDEO_RETENTION
    min_free_bytes: int = MIN_FREE_BYTES  # the preflight's spare space on each output's filesystem

    def digest(self) -> str:
        """sha256 of the effective configuration, for the decision log's run header."""
        import hashlib
        import json
        from dataclasses import asdict

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Work:
    pair: Pair
    white: np.ndarray
    fluo: np.ndarray
    gates: dict[str, list[str]]
    metrics: dict[str, dict[str, float]]
    t_paired_ns: int
    t_ready_ns: int


def _percentiles(values) -> dict[str, float]:
    if not len(values):
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "n": 0}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "n": len(values)}


class Runner:
    def __init__(self, bundle, white: FrameSource | None = None, fluo: FrameSource | None = None,
                 alternating: FrameSource | None = None, config: RunConfig | None = None, classifier=None):
        if alternating is None and (white is None or fluo is None):
            raise ValueError("give both white and fluo sources, or one alternating source")
        self.bundle_arg = bundle
        self.cfg = config or RunConfig()
        self.sources = [alternating] if alternating is not None else [white, fluo]
        self.alternating = alternating is not None
        tol_ms = self.cfg.tolerance_ms or (1000.0 / self.cfg.fps_hint / 2)
        self.pairer = (AlternatingPairer(int(tol_ms * 2e6)) if self.alternating
                       else TimestampPairer(int(tol_ms * 1e6)))
        self.ready: collections.deque[Work] = collections.deque(maxlen=1)
        self.ready_cond = threading.Condition()
        self.frame_event = threading.Event()
        self.stop_event = threading.Event()
        # bounded: an always-on device must not grow with uptime
        self.timings: dict[str, LatencyWindow] = {s: LatencyWindow(LATENCY_WINDOW) for s in STAGES}
        self.counts = collections.Counter()
        self.classifier = classifier  # built in the inference thread when None
        self.decisions: list[dict] = []
        self.keep_decisions = False
        self.observers: list = []  # callables (work, decision) for every inferred pair (checks, metrics)
        self.last_pair_ns = 0
        self.error: BaseException | None = None
        self.last_state = None
        self.thread_plan = None  # set by the inference thread once the backend is chosen
        self.run_id = uuid.uuid4().hex
        self.failure: Exception | None = None  # an output that could not be written: the run stops on it
        self.failed_state: str | None = None  # log_failed | video_failed, for current()
        self.log: DecisionLog | None = None
        self.video = None
        self.log_lines, self.log_removed = 0, []  # after the run: decision lines written, files the cap removed
        self.decisions_made = 0  # every decision's number in this run ("n" in the log): a gap is a lost line
        self.started = threading.Event()  # outputs open and cameras started: inference may decide and log

    # -- threads ------------------------------------------------------------------------------------
    def _prepare_frame(self, frame, modality: str, specs) -> tuple:
        """One frame -> (model input (1, C, h, w), gate flags, gate metrics), or the error that made it unusable.
        Runs in the camera's reader thread as each frame arrives (OpenCV releases the GIL)."""
        from edge_pfm.preprocess import preprocess_keep_intermediate

        try:
            x = np.empty((1, *specs[modality].input_shape), np.float32)
            _, mid = preprocess_keep_intermediate(frame.image, specs[modality], out=x[0])
        except Exception as exc:  # a malformed frame (wrong type, empty, ...): counted, never inferred
            return (exc,)
        gates = self.cfg.gates
        flags, metrics = assess(mid, getattr(gates, modality)) if gates.enabled else ([], {})
        return x, flags, metrics

    def _prepare_on_arrival(self, frame, modality: str, specs) -> None:
        """Prepare a frame in its reader thread while inference has no pair waiting. When a pair already
        waits (sources faster than the model), most new frames will be superseded: skip them, and the
        pairing thread prepares the one it picks."""
        if not self.ready:
            frame.prepared = self._prepare_frame(frame, modality, specs)

    def _prepare(self, pair: Pair, specs, pool) -> Work | None:
        """A pair's model inputs and gates: prepared on arrival by the reader threads; frames that were not
        (skipped under load, or an alternating camera whose modality is known only once paired) are prepared
        here, both at once (OpenCV releases the GIL)."""
        t_paired = time.monotonic_ns()
        w, f = pair.white_light.prepared, pair.fluorescence.prepared
        pending_f = pool.submit(self._prepare_frame, pair.fluorescence, "fluorescence", specs) if f is None else None
        w = w if w is not None else self._prepare_frame(pair.white_light, "white_light", specs)
        f = f if pending_f is None else pending_f.result()
        bad = next((x for x in (w, f) if len(x) == 1), None)  # (error,): the frame could not be used
        if bad is not None:
            self.counts["bad_frames"] += 1
            self.last_bad_frame = str(bad[0])
            return None
        return Work(pair, w[0], f[0], {"white_light": w[1], "fluorescence": f[1]},
                    {"white_light": w[2], "fluorescence": f[2]}, t_paired, time.monotonic_ns())

    def _pair_loop(self, specs) -> None:
        """Pair continuously; hand inference only the freshest pair, and only when it can take it."""
        from concurrent.futures import ThreadPoolExecutor

        latest: Pair | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="preprocess") as pool:
            while not self.stop_event.is_set():
                self.frame_event.wait(0.05)
                self.frame_event.clear()
                if self.alternating:
                    pairs = self.pairer.add(self.sources[0].take())
                else:
                    self.pairer.add("white_light", self.sources[0].take())
                    self.pairer.add("fluorescence", self.sources[1].take())
                    pairs = self.pairer.pairs()
                if pairs:
                    self.counts["pairs_dropped_stale"] += len(pairs) - 1 + (latest is not None)
                    latest = pairs[-1]
                    self.last_pair_ns = time.monotonic_ns()
                with self.ready_cond:
                    slot_free = not self.ready
                if latest is None or not slot_free:
                    continue
                work = self._prepare(latest, specs, pool)
                latest = None
                if work is None:
                    continue
                with self.ready_cond:
                    if self.ready:
                        self.counts["pairs_dropped_stale"] += 1
                    self.ready.append(work)
                    self.ready_cond.notify()

    def _signal_state(self, now_ns: int) -> str | None:
        """Why there is no signal now, or None."""
        for s in self.sources:
            if s.ended:
                return f"{s.modality if not self.alternating else 'camera'} source ended"
            silent = now_ns - (s.last_frame_ns or self.t_start_ns)
            if silent > self.cfg.signal_timeout_s * 1e9:
                return f"no frame from the {s.modality if not self.alternating else 'camera'} camera for {silent / 1e9:.1f}s"
        unpaired_for = now_ns - (self.last_pair_ns or self.t_start_ns)
        if unpaired_for > self.cfg.signal_timeout_s * 1e9:
            # frames arrive but none pair: out of sync, or one camera runs at another rate
            return (f"frames arrive but none paired within +-{self.pairer.tolerance_ns / 1e6:.0f} ms for "
                    f"{unpaired_for / 1e9:.1f}s: cameras out of sync (check fps and the skew_ms column)")
        return None

    def _infer_loop(self) -> None:
        from edge_pfm.backends import BackendError
        from edge_pfm.classifier import Classifier

        clf = self.classifier or Classifier(self.bundle_arg, self.cfg.backend, self.cfg.precision, self.cfg.threads,
                                                self.cfg.cache_dir)
        self.classifier = clf
        self.thread_plan = getattr(clf.backend, "thread_plan", None)
        if self.thread_plan is not None:
            from edge_pfm.thread_plan import apply_opencv_threads

            apply_opencv_threads(self.thread_plan)
        self.engine = DecisionEngine(clf.classes, self.cfg.decision, clf.lesion_verdict.classes)
        white_spec = clf.bundle.preprocessing["white_light"]
        with_map = clf.lesion_verdict.shown
        self.ready_event.set()
        while not self.started.wait(0.05):  # the log opens (its header names this engine), then the cameras start
            if self.stop_event.is_set():
                return
        backend_desc = clf.backend.describe()
        while not self.stop_event.is_set():
            with self.ready_cond:
                if not self.ready:
                    self.ready_cond.wait(0.05)
                work = self.ready.popleft() if self.ready else None
            if work is not None:
                self.frame_event.set()  # the slot is free: let the pairing thread prepare the next pair
            now = time.monotonic_ns()
            if work is None:
                why = self._signal_state(now)
                if why and self.last_state != "no_signal":
                    self._emit(self.engine.no_signal(now, why), None, None, backend_desc, clf)
                if all(s.ended for s in self.sources) and not any(s._frames for s in self.sources):
                    self.stop_event.set()
                continue
            t0 = time.monotonic_ns()
            try:
                out = clf.backend.infer_outputs(work.white, work.fluo)
            except BackendError as exc:
                self.counts["infer_errors"] += 1
                self.last_infer_error = str(exc)
                continue
            t1 = time.monotonic_ns()
            probs = softmax(out["logits"][0].astype(np.float64))
            lesion = None
            if with_map and np.all(np.isfinite(out["lesion_map"])):
                lesion = LesionMap.from_output(out["lesion_map"][0], work.pair.white_light.image.shape, white_spec)
            gate_flags = [f"{m}:{flag}" for m, fl in work.gates.items() for flag in fl]
            decision = self.engine.update(probs, t1, gate_flags, lesion)
            self._emit(decision, work, probs, backend_desc, clf, t0, t1)

    def _emit(self, decision, work: Work | None, probs, backend_desc, clf, t0=None, t1=None) -> None:
        t_dec = time.monotonic_ns()
        self.last_state = decision.state
        self.counts[f"decisions_{decision.state}"] += 1
        self.decisions_made += 1
        rec = {"n": self.decisions_made, "t_ns": t_dec, "wall": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
               "state": decision.state, "shown_class": decision.shown_class,
               "confidence": round(decision.confidence, 5), "smoothed": decision.smoothed,
               "flags": decision.flags, "run_id": self.run_id, "backend": backend_desc, "model_sha256": clf.model_sha256,
               "engine": clf.engine_identity,
               # the shown (smoothed) lesion map in camera pixels; null when none is shown
               "lesion": decision.lesion.summary() if decision.lesion is not None else None}
        if work is not None:
            p = work.pair
            cap = p.t_capture_ns
            lat = {"pair_wait": (work.t_paired_ns - max(p.white_light.t_capture_ns, p.fluorescence.t_capture_ns)) / 1e6,
                   "preprocess": (work.t_ready_ns - work.t_paired_ns) / 1e6, "queue": (t0 - work.t_ready_ns) / 1e6,
                   "infer": (t1 - t0) / 1e6, "decide": (t_dec - t1) / 1e6, "total": (t_dec - cap) / 1e6,
                   "phase": abs(p.white_light.t_capture_ns - p.fluorescence.t_capture_ns) / 1e6,
                   "software": (t_dec - max(p.white_light.t_capture_ns, p.fluorescence.t_capture_ns)) / 1e6}
            for k, v in lat.items():
                self.timings[k].append(v)
            rec.update({
                "seq_white": p.white_light.seq, "seq_fluo": p.fluorescence.seq,
                "t_capture_white_ns": p.white_light.t_capture_ns, "t_capture_fluo_ns": p.fluorescence.t_capture_ns,
                "skew_ms": round(p.skew_ns / 1e6, 3), "raw_class": clf.classes[int(np.argmax(probs))],
                "probs": [round(float(x), 6) for x in probs], "gates": work.gates,
                "gate_metrics": {m: {k: round(v, 4) for k, v in mt.items()} for m, mt in work.metrics.items()},
                "latency_ms": {k: round(v, 3) for k, v in lat.items()},
            })
            for key in ("label", "index", "file_index"):
                for m, fr in (("white", p.white_light), ("fluo", p.fluorescence)):
                    if key in fr.meta:
                        rec[f"{key}_{m}"] = fr.meta[key]
            self.counts["pairs_inferred"] += 1
            for observe in self.observers:
                observe(work, decision)
            if self.video is not None:
                self.video.submit(work, decision, self)
        if self.log is not None and self.failure is None:
            try:
                self.log.write(rec)
            except LogWriteError as exc:
                self._output_failed(exc, "log_failed")
                return
        if self.keep_decisions:
            self.decisions.append(rec)

    # -- public -------------------------------------------------------------------------------------
    def run(self, seconds: float | None = None, install_signal_handlers: bool = False) -> dict:
        from edge_pfm.bundle import Bundle

        seconds = seconds if seconds is not None else self.cfg.seconds
        bundle = self.bundle_arg if isinstance(self.bundle_arg, Bundle) else Bundle.load(self.bundle_arg)
        self.bundle_arg = bundle
        preflight(self._outputs(), seconds, self.cfg.min_free_bytes)  # before the engine loads and the cameras start
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGXFSZ"):
            # past a file-size limit (RLIMIT_FSIZE) writes fail with EFBIG instead of the signal killing the process
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop_event.set())
        self.ready_event = threading.Event()
        infer_thread = threading.Thread(target=self._guard(self._infer_loop), name="infer", daemon=True)
        infer_thread.start()
        if not self.ready_event.wait(120) or self.error:  # backend loaded (engine built) before cameras start
            self.stop_event.set()
            infer_thread.join(5)
            raise self.error or RuntimeError("the backend did not load within 120 s")
        try:
            self.log = DecisionLog(self.cfg.log, self._header(bundle), self.cfg.log_retention) if self.cfg.log else None
        except LogWriteError:
            self.stop_event.set()
            infer_thread.join(5)
            raise
        if self.cfg.video or self.cfg.preview:
            from edge_pfm.overlay import AnnotatedVideo

            self.video = AnnotatedVideo(self.cfg.video, self.cfg.preview, bundle.classes,
                                        retention=self.cfg.video_retention)
        for s in self.sources:
            s.on_frame = self.frame_event.set
            if not self.alternating:
                s.process = lambda frame, m=s.modality: self._prepare_on_arrival(frame, m, bundle.preprocessing)
            s.start()
        self.t_start_ns = time.monotonic_ns()
        self.started.set()
        pair_thread = threading.Thread(target=self._guard(lambda: self._pair_loop(bundle.preprocessing)),
                                       name="pair", daemon=True)
        pair_thread.start()
        try:
            deadline = None if seconds is None else time.monotonic() + seconds
            while not self.stop_event.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if self.video is not None and self.video.failure is not None:
                    self._output_failed(self.video.failure, "video_failed")
                self.stop_event.wait(0.05)
        finally:
            self.stop_event.set()
            for s in self.sources:
                s.stop()
            pair_thread.join(5)
            infer_thread.join(10)
            if self.video is not None:
                self.video.close()
                if self.video.failure is not None:
                    self._output_failed(self.video.failure, "video_failed")
            if self.log is not None:
                self.log_lines, self.log_removed = self.log.lines, list(self.log.removed)
                try:
                    self.log.close()
                except LogWriteError as exc:  # the last fsync failed: the lines before it are on disk
                    self._output_failed(exc, "log_failed")
        self.elapsed_s = (time.monotonic_ns() - self.t_start_ns) / 1e9
        if self.error:
            raise self.error
        if self.failure is not None:
            raise self.failure
        return self.summary()

    def _guard(self, fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # surfaced by run(); the other threads stop
                self.error = exc
                self.stop_event.set()
                if hasattr(self, "ready_event"):
                    self.ready_event.set()

        return run

    def current(self):
        """What a display may show right now (a decision older than its bound comes back 'stale'; a failed output
        comes back as its state, log_failed or video_failed, with the reason as its flag)."""
        if self.failed_state is not None:
            from edge_pfm.decision import Decision

            return Decision(self.failed_state, None, 0.0, [], time.monotonic_ns(), [str(self.failure)])
        engine = getattr(self, "engine", None)
        return None if engine is None else engine.current(time.monotonic_ns())

    def _output_failed(self, exc: Exception, state: str) -> None:
        """An output failed while running: say so at once (stderr, preview, current()), then stop cleanly."""
        if self.failure is not None:
            return
        self.failure, self.failed_state = exc, state
        _LOG.error(f"{state}: {exc}")
        if self.video is not None:
            self.video.show_failure(self.current())
        self.stop_event.set()

    def _outputs(self) -> list[OutputPlan]:
        """What this run writes, at what rate, under which retention (for the preflight)."""
        plans = []
        rate = self.cfg.fps_hint
        if self.cfg.log:
            plans.append(OutputPlan("the decision log", Path(self.cfg.log), LOG_BYTES_PER_DECISION * rate,
                                    self.cfg.log_retention))
        if self.cfg.video:
            pixels = 2 * 640 * 400  # annotate(): both frames side by side at 360 px high, and the status bar
            plans.append(OutputPlan("the video", Path(self.cfg.video), VIDEO_BYTES_PER_PIXEL * pixels * 15.0,
                                    self.cfg.video_retention))
        return plans

    def _header(self, bundle) -> dict:
        """The run header that opens every decision-log file: which run, bundle, engine and configuration."""
        import edge_pfm
        from edge_pfm.fileio import sha256_file

        ident = self.classifier.backend.identity()
        return {"run_id": self.run_id, "edge_pfm": edge_pfm.__version__, "bundle": str(bundle.root),
                "bundle_sha256": sha256_file(bundle.root / "manifest.json"),
                "model": bundle.manifest["model"].get("variant"), "precision": self.classifier.backend.precision,
                "engine": {"backend": ident["backend"], "version": ident.get("version"),
                           "flavour": ident.get("flavour", ident["backend"]), "built_from": ident["built_from"],
                           "engine_sha256": ident["engine_sha256"]},
                "config_sha256": self.cfg.digest()}

    def summary(self) -> dict:
        inferred = self.counts["pairs_inferred"]
        src = {s.modality if not self.alternating else "camera": {**dict(s.stats), **getattr(s, "faults", {})}
               for s in self.sources}
        return {
            "seconds": round(self.elapsed_s, 2),
            "pairs": int(self.pairer.stats["pairs"]),
            "pairs_inferred": inferred,
            "pairs_per_s": round(inferred / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "pairs_dropped_stale": self.counts["pairs_dropped_stale"],
            "unpaired": {k: v for k, v in self.pairer.stats.items() if k.startswith("unpaired")},
            "pairing": dict(self.pairer.stats),
            "sources": src,
            "decisions": {k.removeprefix("decisions_"): v for k, v in self.counts.items() if k.startswith("decisions_")},
            "gated": self.engine.stats["gated"] if hasattr(self, "engine") else 0,
            "rejected_nonfinite": self.engine.stats["rejected_nonfinite"] if hasattr(self, "engine") else 0,
            "bad_frames": self.counts["bad_frames"],
            "infer_errors": self.counts["infer_errors"],
            "latency_ms": {k: _percentiles(v) for k, v in self.timings.items()},
            "backend": self.classifier.backend.describe() if self.classifier else None,
            "thread_plan": self.thread_plan.to_dict() if self.thread_plan else None,
            "lesion_map": self.classifier.lesion_verdict.describe() if self.classifier else None,
        }


def format_summary(s: dict) -> str:
    lines = [f"{s['pairs_inferred']} pairs in {s['seconds']} s = {s['pairs_per_s']} pairs/s  "
             f"(backend {s['backend']})",
             f"paired {s['pairs']}, dropped stale {s['pairs_dropped_stale']}, unpaired {s['unpaired']}, "
             f"gated {s['gated']}, rejected {s['rejected_nonfinite']}, bad frames {s['bad_frames']}",
             f"decisions {s['decisions']}",
             f"sources {s['sources']}",
             *([f"thread plan {s['thread_plan']}"] if s.get("thread_plan") else []),
             *([s["lesion_map"]] if s.get("lesion_map") else []),
             "latency ms      p50      p95      p99"]
    for stage, p in s["latency_ms"].items():
        lines.append(f"  {stage:11s} {p['p50']:8.2f} {p['p95']:8.2f} {p['p99']:8.2f}")
    return "\n".join(lines)
