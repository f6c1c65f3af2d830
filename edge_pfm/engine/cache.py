"""Engine cache: key, file names, atomic writes, and the checks that refuse a stale or foreign engine.

An engine is only valid for the exact ONNX, precision, TensorRT version, GPU and profile it was
built for. The key holds all of them; the sidecar JSON repeats the key fields and the engine's
sha256, so a mismatch is caught before TensorRT deserialises anything.

Whoever can write the cache could plant an engine (an executable artifact) or alter a verdict, so every record the
cache trusts (sidecars here, check verdicts in edge_pfm.engine.checks, precision picks in edge_pfm.precision_pick)
carries a seal: the device's HMAC (edge_pfm.trust.device_secret) over the whole record. A record whose seal does not
match is treated as absent: its engine is rebuilt, its verdict checked again, its pick measured again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_pfm.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from edge_pfm.trust.device_secret import DeviceSecret

if TYPE_CHECKING:
    from edge_pfm.bundle import Bundle

# v1 keys lacked calibration.cache's sha256, v2 sidecars were unsealed: both read as absent and are rebuilt
SIDECAR_SCHEMA = "edge-pfm/engine/v3"
SEAL = "seal"  # the record field that holds its HMAC
_LOG = logging.getLogger(__name__)


def cache_secret(bundle: Bundle) -> DeviceSecret:
    """The secret that seals the cache's records: in the state directory of the trust `bundle` was loaded under."""
    return DeviceSecret.in_state_dir(bundle.trust.writable_state_dir())


def sealed(record: dict, secret: DeviceSecret) -> dict:
    """`record` with its seal: the device's HMAC over every other field (a previous seal is replaced)."""
    body = {k: v for k, v in record.items() if k != SEAL}
    return {**body, SEAL: secret.seal(body)}


def seal_problem(record: dict, secret: DeviceSecret, path: Path) -> str | None:
    """None when this device sealed `record` as it is; else why it is not trusted, naming the file."""
    if secret.holds({k: v for k, v in record.items() if k != SEAL}, record.get(SEAL)):
        return None
    return f"{path}: seal does not match (written without this device's secret, or altered since)"


def private_dir(root: str | Path, *sub: str) -> Path:
    """`root` (and `root`/sub/...) created owner-only (0700): the cache holds executables and what vouches for
    them. -> the deepest directory."""
    path = Path(root)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for part in sub:
        path = path / part
        path.mkdir(mode=0o700, exist_ok=True)
    return path


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    precision: str  # fp32 | fp16 | int8
    int8_source: str  # "" | qdq | cache
    trt_version: str  # e.g. 10.3.0
    gpu_name: str
    compute_capability: str  # e.g. 8.7
    dla_core: int  # -1 = GPU
    profile: tuple[int, int, int]  # batch min, opt, max
    trt_flavour: str = "tensorrt"  # or tensorrt_rtx: an RTX engine is never taken for a TensorRT one
    calibration_cache_sha256: str = ""  # implicit INT8 (DLA) reads its scales from calibration.cache: part of the key

    def built_from(self, onnx_artifact: str) -> dict[str, str]:
        """Every bundle artifact the engine was built from -> its sha256."""
        out = {onnx_artifact: self.onnx_sha256}
        if self.calibration_cache_sha256:
            out["calibration.cache"] = self.calibration_cache_sha256
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def file_stem(self) -> str:
        device = f"dla{self.dla_core}" if self.dla_core >= 0 else "gpu"
        src = f"-{self.int8_source}" if self.int8_source else ""
        flavour = "rtx" if self.trt_flavour == "tensorrt_rtx" else "trt"
        return f"pfm.{self.precision}{src}.{flavour}{self.trt_version}.sm{self.compute_capability.replace('.', '')}.{device}." \
               f"{self.digest()}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["profile"] = list(self.profile)
        return d


def engine_paths(cache_dir: str | Path, key: EngineKey) -> tuple[Path, Path]:
    stem = Path(cache_dir) / key.file_stem()
    return stem.with_suffix(".engine"), stem.with_suffix(".json")


def write_engine(cache_dir: str | Path, key: EngineKey, engine: bytes, build_s: float, secret: DeviceSecret,
                 warnings: list[str] | None = None, built_from: dict[str, str] | None = None) -> Path:
    """Engine first, sealed sidecar last: a crash in between leaves an engine without sidecar, which is rebuilt."""
    engine_path, sidecar_path = engine_paths(private_dir(cache_dir), key)
    atomic_write_bytes(engine_path, engine)
    atomic_write_json(sidecar_path, sealed({
        "schema": SIDECAR_SCHEMA, "key": key.to_dict(), "engine_sha256": hashlib.sha256(engine).hexdigest(),
        "engine_bytes": len(engine), "build_seconds": round(build_s, 2), "built_from": dict(built_from or {}),
        "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "trt_warnings": list(warnings or [])[:200],
    }, secret))
    return engine_path


def check_engine(cache_dir: str | Path, key: EngineKey, secret: DeviceSecret) -> tuple[Path | None, str]:
    """-> (engine path, "ok") if a valid engine for `key`, sealed by `secret`, is cached, else (None, why not)."""
    engine_path, sidecar_path = engine_paths(cache_dir, key)
    if not engine_path.is_file():
        return None, f"no cached engine {engine_path.name}"
    if not sidecar_path.is_file():
        return None, f"{engine_path.name} has no sidecar {sidecar_path.name} (interrupted build?)"
    try:
        side = json.loads(sidecar_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"sidecar {sidecar_path} is unreadable ({exc})"
    if not isinstance(side, dict) or side.get("schema") != SIDECAR_SCHEMA:
        return None, f"sidecar {sidecar_path} has an unknown schema"
    want = key.to_dict()
    got = side.get("key", {})
    diffs = [f"{k}: engine {got.get(k)!r} != needed {v!r}" for k, v in want.items() if got.get(k) != v]
    if diffs:
        return None, f"{engine_path.name} was built for something else ({'; '.join(diffs)})"
    problem = seal_problem(side, secret, sidecar_path)
    if problem:  # a planted engine with a sidecar to match: never deserialised, rebuilt
        return None, problem
    digest = sha256_file(engine_path)
    if digest != side.get("engine_sha256"):
        return None, f"{engine_path.name} is corrupt (sha256 {digest[:12]} != sidecar {str(side.get('engine_sha256'))[:12]})"
    return engine_path, "ok"


def sealed_engine_sha256(engine_path: str | Path, secret: DeviceSecret) -> str | None:
    """The sha256 that the engine's sealed sidecar vouches for, or None if there is no sidecar of ours under this
    device's seal. The backend compares the bytes it deserialises with it: a file swapped after check_engine runs
    nothing."""
    sidecar_path = Path(engine_path).with_suffix(".json")
    try:
        side = json.loads(sidecar_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(side, dict) or side.get("schema") != SIDECAR_SCHEMA or seal_problem(side, secret, sidecar_path):
        return None
    return side.get("engine_sha256")


class SidecarRecord:
    """An engine's check verdict, kept in its sidecar (edge_pfm.engine.checks.CheckRecord), for the engine bytes that
    were checked (`engine_sha256`): if another process rebuilt the engine meanwhile, this verdict is neither read nor
    written for it, and its files are not deleted. Discarding deletes the engine too: a refused engine is never
    taken from the cache. The verdict is read and written only under the sidecar's seal (`secret`); without a
    secret the record only describes the engine (sidecar())."""

    def __init__(self, engine_path: Path, engine_sha256: str, secret: DeviceSecret | None = None,
                 log: Callable[[str], None] = _LOG.warning):
        self.engine_path, self.sidecar_path = Path(engine_path), Path(engine_path).with_suffix(".json")
        self.engine_sha256, self.secret, self.log = engine_sha256, secret, log

    def sidecar(self) -> dict:
        """The sidecar of these engine bytes, its seal not verified (to describe the engine, not to trust it)."""
        try:
            side = json.loads(self.sidecar_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        ours = isinstance(side, dict) and side.get("schema") == SIDECAR_SCHEMA
        return side if ours and side.get("engine_sha256") == self.engine_sha256 else {}

    def _sealed_sidecar(self) -> dict:
        side = self.sidecar()
        if not side or self.secret is None:
            return {}
        problem = seal_problem(side, self.secret, self.sidecar_path)
        if problem:
            self.log(f"{problem}: its verdict is not trusted")
            return {}
        return side

    def load(self) -> dict | None:
        return self._sealed_sidecar().get("check")

    def save(self, check: dict) -> None:
        side = self._sealed_sidecar()
        # else the engine on disk is no longer the one checked (its own first use will check it), or its sidecar
        # is not ours: sealing it now would vouch for what someone else wrote
        if side and self.secret is not None:
            atomic_write_json(self.sidecar_path, sealed({**side, "check": check}, self.secret))

    def discard(self) -> None:
        if self.sidecar():  # sidecar first: an engine without one is rebuilt, never used
            self.sidecar_path.unlink(missing_ok=True)
            self.engine_path.unlink(missing_ok=True)


def find_any_engine(cache_dir: str | Path, secret: DeviceSecret | None) -> list[dict[str, Any]]:
    """Sidecars in a cache directory (for `edge-pfm info`), each with "sealed": whether `secret` sealed it (None:
    no secret to tell; an unsealed engine is rebuilt before any use)."""
    out = []
    for p in sorted(Path(cache_dir).glob("*.json")):
        try:
            side = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(side, dict) and side.get("schema") == SIDECAR_SCHEMA:
            ok = None if secret is None else seal_problem(side, secret, p) is None
            out.append({"file": p.with_suffix(".engine").name, **side.get("key", {}), "sealed": ok,
                        "check": (side.get("check") or {}).get("passed") if ok else None})
    return out


def evict_engines(cache_dir: str | Path, keep_sha256: set[str]) -> list[Path]:
    """Remove the engines (and their sidecars) built from no artifact in `keep_sha256` (the sha256s of every
    artifact of the bundles the device keeps): the bundle store's cap also holds for the engine cache. -> removed."""
    removed = []
    for sidecar in sorted(Path(cache_dir).glob("pfm.*.json")):
        try:
            record = json.loads(sidecar.read_text())
            built_from = set(record.get("built_from", {}).values()) or {record["key"]["onnx_sha256"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge: a damaged sidecar is rebuilt by the next check anyway
        if built_from & keep_sha256:
            continue
        for path in (sidecar.with_suffix(".engine"), sidecar):
            if path.exists():
                path.unlink()
                removed.append(path)
    return removed
