"""An update, step by step: stage -> verify -> check -> install -> switch, then commit or roll back.

    stage    copy the directory or .tar into staging/ and fsync (edge_pfm.store.stage)
    verify   the signature and the rollback floor, as every bundle load does (edge_pfm.trust)
    check    build (or take from the cache) the engine and check it against the bundle's references on this device,
             as `edge-pfm build` does; no precision is timed (a serving device's timings would be taken under load):
             the current pick's precision is kept when the new bundle allows it, and the log says so
    install  rename into versions/ (the store's one filesystem: atomic)
    switch   pending.json written, then `current` renamed onto the new version; serve switches at a pair boundary
    commit   after N healthy pairs: the old version becomes `previous`, the rollback floor rises to the new version
    rollback `current` back to the last good version; the failed one kept in failed/ with its report

A refusal at any step leaves `current` untouched; what was staged goes to failed/ with the reason.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_pfm.bundle import Bundle
from edge_pfm.errors import EdgePfmError
from edge_pfm.store.stage import stage
from edge_pfm.store.store import BundleStore, StoreBusy, StoreError

_LOG = logging.getLogger(__name__)
STEPS = ("stage", "verify", "check", "install", "switch")


@dataclass
class Installed:
    path: Path  # under versions/
    bundle_version: int | None
    precision: str
    precision_note: str
    check: str  # the engine check's verdict
    seconds: dict[str, float]  # per step


def step_hook(step: str) -> None:
    """Called as each step starts (a test's fault injector replaces it to kill the process at a step)."""


def load_store_bundle(path: Path, trust: Any) -> Bundle:
    """A version from the store: its signature verified again; the floor was held when it was installed."""
    return Bundle.load(path, trust=trust, hold_floor=False)


def precision_for(bundle: Bundle, running: tuple[str, str] | None) -> tuple[str | None, str]:
    """Keep the running (backend, precision)'s precision when the new bundle allows it; otherwise the default (the
    measured pick for this bundle if any, else FP32). No precision is timed during an update."""
    if running:
        from edge_pfm.precision_pick import allowed

        backend, current_precision = running
        ok, why = allowed(bundle, current_precision, backend)
        if ok:
            return current_precision, f"kept the running precision {current_precision} (allowed by the new bundle)"
        return None, f"the running precision {current_precision} is not allowed by the new bundle ({why}): the default"
    return None, "the default precision (nothing was running)"


def prepare(store: BundleStore, source: str | Path, trust: Any, *, backend: str = "auto",
            running: tuple[str, str] | None = None, cache_dir: str | None = None, threads: int | None = None,
            log: Callable[[str], None] = _LOG.info) -> Installed:
    """stage, verify, check and install `source` (under the store's lock). Raises the refusal, with the staged
    copy set aside in failed/ with its report; `current` is never touched here."""
    from edge_pfm.classifier import Classifier

    seconds: dict[str, float] = {}
    with store.locked():
        pend = store.pending()
        if pend is not None and pend["before"]:  # one update at a time while a last good version is at stake
            raise StoreBusy(f"{store.root}: {pend['candidate']} is still being judged by serve (pending.json); "
                            "install the next update once it is committed or rolled back")
        staged = store.new_staging()
        step = "stage"
        try:
            t = time.monotonic()
            step_hook(step)
            stage(source, staged)
            seconds[step] = time.monotonic() - t
            log(f"update: staged {source} ({seconds[step]:.1f} s)")
            step, t = "verify", time.monotonic()
            step_hook(step)
            bundle = Bundle.load(staged, trust=trust)  # signature and rollback floor
            seconds[step] = time.monotonic() - t
            log(f"update: {bundle.signature.describe() if bundle.signature else 'unsigned'}")
            step, t = "check", time.monotonic()
            step_hook(step)
            precision, note = precision_for(bundle, running)
            clf = Classifier(bundle, backend, precision, threads, cache_dir)
            verdict = clf.backend.check.describe() if getattr(clf.backend, "check", None) else "checked"
            chosen = clf.backend.precision
            clf.backend.close()
            seconds[step] = time.monotonic() - t
            log(f"update: engine checked on this device: {verdict}; precision {chosen}: {note}")
            step, t = "install", time.monotonic()
            step_hook(step)
            from edge_pfm.fileio import sha256_file

            path = store.install(staged, bundle.manifest.get("bundle_version"), sha256_file(staged / "manifest.json"))
            seconds[step] = time.monotonic() - t
        except EdgePfmError as exc:
            aside = store.set_aside(staged, {"source": str(source), "step": step, "refused": str(exc),
                                             "utc": _utc()})
            log(f"update refused at {step}: {exc} (kept in {aside})")
            raise
        except BaseException:
            import shutil

            shutil.rmtree(staged, ignore_errors=True)
            raise
    return Installed(path, bundle.manifest.get("bundle_version"), chosen, note, verdict, seconds)


def running_selection(store: BundleStore, trust: Any, backend: str, cache_dir: str | None) -> tuple[str, str] | None:
    """(backend, precision) that the current version runs with, as `run` would select them; None without one."""
    current = store.link("current")
    if current is None:
        return None
    from edge_pfm.backends.select import select_backend

    sel = select_backend(load_store_bundle(current, trust), backend, cache_dir=cache_dir)
    return sel.backend, sel.precision


def switch(store: BundleStore, installed: Path) -> Path | None:
    """Make `installed` current, pending its health (pending.json first: a crash between the two leaves a pending
    entry that does not name `current`, which recover_pending clears). -> the version it replaced."""
    with store.locked(wait=True):
        step_hook("switch")
        if not (installed / "manifest.json").is_file():
            raise StoreError(f"{installed} is not in the store any more (pruned meanwhile); run the update again")
        pend = store.pending()
        if pend is not None and pend["before"]:
            raise StoreBusy(f"{store.root}: another update is still being judged; try again once it is committed")
        before = store.link("current")
        if before is not None and before == installed.resolve():
            return before
        # replacing a first version nobody has judged yet: there is still no good version to fall back to
        store.set_pending(installed, None if pend is not None else before)
        store.set_link("current", installed)
        return before


def evict_unused_engines(store: BundleStore, cache_dir: str | None, log: Callable[[str], None]) -> None:
    """The engine cache keeps only engines built from artifacts of the versions the store keeps."""
    from edge_pfm.engine.cache import evict_engines
    from edge_pfm.engine.trt_build import DEFAULT_CACHE_DIR

    keep = {a["sha256"] for v in store.list()
            for a in json.loads((v.path / "manifest.json").read_text())["artifacts"].values()}
    for path in evict_engines(Path(cache_dir or DEFAULT_CACHE_DIR), keep):
        log(f"update: removed {path.name} from the engine cache (no kept bundle uses it)")


def commit(store: BundleStore, trust: Any, log: Callable[[str], None] = _LOG.info, cache_dir: str | None = None) -> None:
    """The pending version is healthy: the version it replaced becomes `previous`, the floor rises to it."""
    with store.locked(wait=True):
        step_hook("commit")
        pend = store.pending()
        current = store.link("current")
        if pend is None or current is None or current.name != pend["candidate"]:
            return  # rolled back or replaced meanwhile: nothing of this switch to commit
        version = store.version(current).bundle_version
        if version is not None and trust.required:  # first: a crash after it leaves pending, judged again
            from edge_pfm.trust.rollback import raise_floor

            if raise_floor(version, trust.writable_state_dir()):
                log(f"rollback floor raised to bundle version {version}")
        if pend["before"]:
            store.set_link("previous", store.versions / pend["before"])
        store.clear_pending()
        removed = store.prune()
        for name in removed:
            log(f"update: removed {name} from the store (keep {store.keep})")
        if removed:
            evict_unused_engines(store, cache_dir, log)
    log(f"update committed: {current.name} is current"
        + (f", {pend['before']} is previous" if pend["before"] else ""))


def rollback(store: BundleStore, why: str, log: Callable[[str], None] = _LOG.warning) -> Path:
    """Back to the last good version: the pending switch's `before`, else `previous` (`update --rollback`). The
    version rolled away from is set aside in failed/ with `why` when it was pending. -> the version now current."""
    with store.locked(wait=True):
        pend = store.pending()
        current = store.link("current")
        if pend is not None and pend["before"]:
            target = store.versions / pend["before"]
        else:
            target = store.link("previous")
        if target is None or not target.is_dir():
            raise StoreError(f"{store.root}: no earlier version to roll back to (no previous link)")
        store.set_link("current", target)
        if pend is not None:
            store.clear_pending()
            if current is not None and current != target:
                aside = store.set_aside(current, {"rolled_back": why, "utc": _utc()})
                log(f"update rolled back to {target.name}: {why} (the failed version is kept in {aside})")
        else:
            store.set_link("previous", None)  # previous is now current; nothing older is run
            log(f"rolled back to {target.name}: {why}")
        return target


MAX_JUDGED_STARTS = 2  # a candidate judged at this many starts without a verdict took the process down: roll back


def recover_pending(store: BundleStore, trust: Any = None, log: Callable[[str], None] = _LOG.info) -> dict | None:
    """On start, under the store's lock: clean staging/, and a pending entry a crash left behind. -> the pending
    switch still to judge (its candidate is `current`: serve runs it and commits or rolls back on its health), or
    None. A candidate that was being judged when the process died twice, or that cannot be loaded, is rolled back."""
    with store.locked(wait=True):
        for line in store.recover():
            log(f"update: {line}")
        pend = store.pending()
        if pend is None:
            return None
        current = store.link("current")
        if current is None or current.name != pend["candidate"]:
            store.clear_pending()  # the crash came before the link switched: the old version is still current
            log("update: an interrupted switch left current unchanged; its pending entry was cleared")
            return None
        starts = pend.get("judged_starts", 0) + 1
        why = None
        if starts > MAX_JUDGED_STARTS:
            why = f"the process ended {starts - 1} times while judging it (a crash, a hang or a power cut)"
        elif trust is not None:
            try:
                load_store_bundle(current, trust)
            except EdgePfmError as exc:
                why = f"it cannot be loaded: {exc}"
        if why is None:
            from edge_pfm.fileio import atomic_write_json

            atomic_write_json(store.pending_file, {**pend, "judged_starts": starts})
    if why is not None:
        rollback(store, why)
        return None
    log(f"update: {pend['candidate']} was switched to but not yet committed: judging its health again")
    return pend


def _utc() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
