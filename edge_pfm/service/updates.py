"""Bundle updates in a running `serve`: the inbox, the switch at a pair boundary, the health that commits or rolls
back. The steps are edge_pfm.store.update's, the same as `edge-pfm update` runs; this is who runs them, when.

    inbox   STORE/inbox/NAME (a bundle directory or NAME.tar) counts once NAME.complete is written beside it; it is
            staged, verified, checked and installed in this thread while serving goes on, then switched to
    switch  whenever `current` names another version (the inbox's update, `edge-pfm update`, `--rollback`): its
            classifier is loaded and checked here, then the Runner switches at its next pair boundary
    health  a pending version is committed after `health_pairs` pairs decided without an error; an inference error
            or a non-finite output before that rolls back to the version before it, which is switched back to
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from edge_pfm.errors import EdgePfmError
from edge_pfm.store import update as steps
from edge_pfm.store.store import COMPLETE_SUFFIX, BundleStore, StoreBusy

_LOG = logging.getLogger(__name__)
POLL_S = 1.0


class UpdateWatcher:
    def __init__(self, runner: Any, store: BundleStore, trust: Any, health_pairs: int, metrics: Any = None):
        self.runner, self.store, self.trust, self.health_pairs, self.metrics = runner, store, trust, health_pairs, metrics
        self.running_version: Path | None = store.link("current")
        self.judging: dict | None = None  # {"candidate", "pairs0", "errors0"} while a pending switch is judged
        self.done = threading.Event()
        self.events: list[dict[str, Any]] = []  # what happened, for tests and the metrics

    def start(self, pending: dict | None) -> threading.Thread:
        if pending is not None:  # a switch a crash left uncommitted: judge the running version from zero
            self._judge()
        t = threading.Thread(target=self._loop, name="updates", daemon=True)
        t.start()
        return t

    def _count(self, result: str, step: str = "") -> None:
        self.events.append({"result": result, "step": step, "t": time.monotonic()})
        if self.metrics is not None:
            self.metrics.update_event(result, step)

    def _loop(self) -> None:
        while not self.done.wait(POLL_S):
            for step in (self._inbox, self._follow_current, self._health):  # one failing never stops the others
                try:
                    step()
                except Exception:  # an update must never take serving down
                    _LOG.exception(f"the update watcher's {step.__name__.strip('_')} step failed; serving goes on")

    # -- the inbox ------------------------------------------------------------------------------------
    def _inbox(self) -> None:
        if not self.store.inbox.is_dir():
            return
        for marker in sorted(self.store.inbox.glob(f"*{COMPLETE_SUFFIX}")):
            source = marker.with_suffix("")
            try:
                if not source.exists():
                    raise steps.StoreError(f"{marker} names {source.name}, which is not in the inbox")
                installed = steps.prepare(self.store, source, self.trust, backend=self.runner.cfg.backend,
                                          running=self._running(), cache_dir=self.runner.cfg.cache_dir,
                                          threads=self.runner.cfg.threads)
                steps.switch(self.store, installed.path)
                self._count("installed")
            except StoreBusy:  # `edge-pfm update` holds the store, or a switch is judged: wait for the next poll
                return
            except Exception as exc:  # refused (EdgePfmError), or an error of its own: never tried again
                if not isinstance(exc, EdgePfmError):
                    _LOG.exception(f"update from the inbox failed: {source}")
                _LOG.error(f"update from the inbox refused: {exc}")
                self._count("refused", _step_of(exc))
            marker.unlink(missing_ok=True)  # done with, installed or refused (a refused copy is in failed/)
            if source.is_dir():
                shutil.rmtree(source, ignore_errors=True)
            else:
                source.unlink(missing_ok=True)

    def _running(self) -> tuple[str, str] | None:
        clf = self.runner.classifier
        if clf is None:
            return None
        return clf.backend.identity()["backend"], clf.backend.precision

    # -- the switch -----------------------------------------------------------------------------------
    def _follow_current(self) -> None:
        current = self.store.link("current")
        if current is None or current == self.running_version:
            return
        from edge_pfm.classifier import Classifier

        cfg = self.runner.cfg
        t0 = time.monotonic()
        try:
            bundle = steps.load_store_bundle(current, self.trust)
            running = self._running()
            precision, note = steps.precision_for(bundle, running)
            clf = Classifier(bundle, cfg.backend, precision, cfg.threads, cfg.cache_dir)
        except EdgePfmError as exc:  # the version cannot run here after all: back to the last good one
            _LOG.error(f"cannot load {current.name}: {exc}")
            self._count("rolled_back", "load")
            steps.rollback(self.store, f"it could not be loaded: {exc}")
            return
        checked = time.monotonic()
        applied = self.runner.request_switch(bundle, clf)
        while not applied.wait(0.5):
            if self.done.is_set() or self.runner.stop_event.is_set():
                return
        switch = self.runner.switches[-1]
        switch["check_to_switch_s"] = round(time.monotonic() - checked, 3)
        switch["load_s"] = round(checked - t0, 3)
        switch["precision_note"] = note
        self.running_version = current
        self._count("switched")
        _LOG.info(f"update: running {current.name} (loaded and checked in {switch['load_s']:.2f} s, switched "
                  f"{switch['check_to_switch_s'] * 1e3:.0f} ms later at a pair boundary; {note})")
        if self.metrics is not None:
            sig = bundle.signature
            b = clf.backend
            self.metrics.set_bundle(version=sig.bundle_version if sig else None,
                                    key_id=sig.key_id if sig and sig.verified else None, precision=b.precision,
                                    backend=b.identity()["backend"], model=bundle.manifest["model"].get("variant"))
        pend = self.store.pending()
        if pend is not None and pend["candidate"] == current.name:
            self._judge()
        else:
            self.judging = None  # a rollback or a version nobody judges: nothing pending to commit

    # -- health after the switch ------------------------------------------------------------------------
    def _judge(self) -> None:
        """Start judging the running version: its pairs and errors from now (its engine's rejections from 0)."""
        r = self.runner
        self.judging = {"pairs0": r.counts["pairs_inferred"], "errors0": r.counts["infer_errors"],
                        "engine": id(r.engine)}

    def _health(self) -> None:
        j = self.judging
        if j is None:
            return
        r = self.runner
        if id(r.engine) != j["engine"]:  # the engine is new since the switch: its rejections start at 0
            j["engine"], j["errors0"] = id(r.engine), r.counts["infer_errors"]
        errors = r.counts["infer_errors"] - j["errors0"] + (r.engine.stats["rejected_nonfinite"] if r.engine else 0)
        pairs = r.counts["pairs_inferred"] - j["pairs0"]
        if errors:
            self.judging = None
            why = (f"{errors} inference error(s) or non-finite output(s) in the first {pairs} pairs after the switch "
                   f"(last: {r.last_infer_error or 'a non-finite output'})")
            _LOG.error(f"update unhealthy: {why}; rolling back")
            steps.rollback(self.store, why)
            self._count("rolled_back", "health")
        elif pairs >= self.health_pairs:
            self.judging = None
            steps.commit(self.store, self.trust, cache_dir=self.runner.cfg.cache_dir)
            self._count("committed")


def _step_of(exc: Exception) -> str:
    text = str(exc)
    for key, step in (("signature", "verify"), ("signed", "verify"), ("older than", "verify"), ("sha256", "verify"),
                      ("reference", "check"), ("REFUSED", "check")):
        if key in text:
            return step
    return "stage"
