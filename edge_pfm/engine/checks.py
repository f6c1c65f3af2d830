"""Every engine is checked against its precision's reference before its first use (edge_pfm.references).

A check runs once per engine: its verdict is recorded with it (a TensorRT engine's sidecar; for ONNX Runtime,
which runs the bundle's ONNX as it is, a record keyed by the model, the runtime's version and its providers), and
later opens read the record while its seal (edge_pfm.engine.cache.sealed) matches. An engine that fails is refused
with its figures and is not kept: its files are deleted, so the next start checks a fresh build rather than
trusting a bad one.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edge_pfm.backends.base import Backend, BackendError
from edge_pfm.bundle import Bundle
from edge_pfm.engine.cache import private_dir, seal_problem, sealed
from edge_pfm.fileio import atomic_write_json
from edge_pfm.references import EngineCheck, References, check_backend
from edge_pfm.trust.device_secret import DeviceSecret

_LOG = logging.getLogger(__name__)
RECORD_SCHEMA = "edge-pfm/check/v2"  # v1 records were unsealed: they read as absent and are checked again


class EngineRefused(BackendError):
    """An engine does not reproduce its precision's reference within tolerance: it is not used and not kept."""


class CheckRecord(Protocol):
    """Where one engine's verdict lives."""

    def load(self) -> dict | None: ...

    def save(self, check: dict) -> None: ...

    def discard(self) -> None: ...


class JsonRecord:
    """A verdict in a JSON file of its own (ONNX Runtime sessions: nothing is built, so nothing else to hold it),
    sealed by `secret` over its identity and verdict; `log` says when a seal does not match."""

    def __init__(self, path: Path, identity: dict, secret: DeviceSecret, log: Callable[[str], None] = _LOG.warning):
        self.path, self.identity, self.secret, self.log = path, identity, secret, log

    def load(self) -> dict | None:
        try:
            rec = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not (isinstance(rec, dict) and rec.get("schema") == RECORD_SCHEMA and rec.get("identity") == self.identity):
            return None
        problem = seal_problem(rec, self.secret, self.path)
        if problem:
            self.log(f"{problem}: checking again")
            return None
        return rec.get("check")

    def save(self, check: dict) -> None:
        private_dir(self.path.parent.parent, self.path.parent.name)  # the cache and its checks/, owner-only
        atomic_write_json(self.path, sealed({"schema": RECORD_SCHEMA, "identity": self.identity, "check": check},
                                            self.secret))

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def onnxruntime_record(backend: Any, cache_dir: Path, secret: DeviceSecret,
                       log: Callable[[str], None] = _LOG.warning) -> JsonRecord:
    identity = backend.identity()
    return JsonRecord(cache_dir / "checks" / f"ort.{backend.precision}.{identity_digest(identity)}.json", identity,
                      secret, log)


def ensure_checked(backend: Backend, bundle: Bundle, record: CheckRecord,
                   log: Callable[[str], None] = _LOG.info, recheck: bool = False) -> EngineCheck:
    """-> the engine's passing verdict (from its record, or checked now and recorded; `recheck`: checked now in any
    case); raises EngineRefused with the figures when it fails (its record and files discarded), BundleError when the
    bundle has no reference for its precision."""
    refs = References(bundle)
    refs.require(backend.precision)
    cached = None if recheck else _valid(record.load(), refs, backend)
    if cached is not None:
        return cached
    log(f"checking {backend.describe()} against the bundle's {backend.precision} reference "
        f"({refs.entry.get('pairs')} pairs) before first use")
    check = check_backend(backend, refs)
    if not check.passed:
        record.discard()
        raise EngineRefused(f"{backend.describe()} from {bundle.root} is refused: {check.describe()}. The engine was "
                            "not kept. Rebuild it (edge-pfm build); if it is refused again, the model, the bundle or "
                            "this device's TensorRT computes something other than what calibration measured: send "
                            "the edge-pfm selftest report")
    record.save(check.to_dict())
    log(f"  {check.describe()} ({check.seconds:.1f}s)")
    return check


def _valid(cached: dict | None, refs: References, backend: Backend) -> EngineCheck | None:
    """A recorded verdict that still holds: passed, on this engine, against today's reference and tolerance."""
    if not cached:
        return None
    try:
        check = EngineCheck.from_dict(cached)
    except (KeyError, TypeError, ValueError):  # a record from another version, or damaged: check again
        return None
    p = backend.precision
    holds = (check.passed and check.precision == p and check.references_sha256 == refs.sha256(p)
             and check.tolerance == refs.tolerance(p)
             and check.engine_sha256 == backend.identity().get("engine_sha256"))
    return check if holds else None
