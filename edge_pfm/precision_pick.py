"""`--precision auto`: the fastest precision that is allowed, checked and measured on this device, picked once at
build time (`edge-pfm build --precision auto`) and cached; `run`, `Classifier` and `bench` read the cached pick.

- Allowed: FP32 always; INT8 and FP16 only where calibration's gate passed for them (an INT8 written with
  --allow-degraded never is), and only on a backend that runs them (ONNX Runtime here runs no FP16).
- Checked: each candidate engine passes its first-use check (edge_pfm.engine.checks) before it is timed.
- Measured: batch-1 inference on a reference pair, the median of TIMING_WINDOWS windows' medians.
- Picked: candidates from the most accurate (fp32, fp16, int8); a less accurate one wins only if it is at least
  MIN_GAIN faster than the pick so far, else the more accurate is kept.
Without a cached pick, `auto` means FP32, and says how to measure. A cached pick counts only under its seal
(edge_pfm.engine.cache.sealed): one that does not match is absent.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_pfm.bundle import MODEL_ARTIFACTS, Bundle
from edge_pfm.engine.cache import cache_secret, private_dir, seal_problem, sealed
from edge_pfm.errors import EdgePfmError, RuntimeFailure
from edge_pfm.fileio import atomic_write_json

_LOG = logging.getLogger(__name__)
ACCURACY_ORDER = ("fp32", "fp16", "int8")  # most accurate first
MIN_GAIN = 0.10
TIMING_WINDOWS, WINDOW_S, WARMUP_S = 5, 0.4, 0.3
PICK_SCHEMA = "edge-pfm/precision-pick/v2"  # v1 picks were unsealed: they read as absent
UNMEASURED = "fp32"  # what auto runs before anything was measured: the most accurate


def allowed(bundle: Bundle, precision: str, backend: str) -> tuple[bool, str]:
    """May `auto` pick `precision` for `bundle` on `backend`? -> (allowed, why)."""
    if precision == "fp32":
        return True, "the exported model"
    if precision == "fp16" and backend != "tensorrt":
        return False, "ONNX Runtime CPU runs no FP16 here"
    if not bundle.has(MODEL_ARTIFACTS[precision]):
        return False, f"the bundle has no {precision} model (python -m calibration --bundle {bundle.root})"
    acc = bundle.manifest.get("accuracy", {})
    if precision == "int8":
        if acc.get("gate_passed") is not True:
            return False, "calibration's gate refused it (written with --allow-degraded)"
        return True, "calibration's gate passed"
    gates = acc.get("gates", {})
    if precision not in gates:
        return False, "calibrated before FP16 had a gate: re-calibrate to allow it"
    return (True, "calibration's gate passed") if gates[precision] else (False, "calibration's gate refused it")


@dataclass
class Candidate:
    precision: str
    allowed: bool
    why: str
    ms: float | None = None  # median of the windows' medians
    windows_ms: list[float] = field(default_factory=list)
    check: str = ""  # the first-use check, in words

    def describe(self) -> str:
        if not self.allowed:
            return f"{self.precision}: not a candidate ({self.why})"
        if self.ms is None:
            return f"{self.precision}: {self.why}"
        spread = f"{min(self.windows_ms):.2f}-{max(self.windows_ms):.2f}"
        return f"{self.precision}: {self.ms:.2f} ms (windows {spread} ms); {self.check}"


@dataclass
class PrecisionPick:
    backend: str
    device: str
    pick: str
    candidates: list[Candidate]
    reason: str
    measured_utc: str = ""
    threads: int | None = None  # ONNX Runtime's inference threads while timing (TensorRT: 1 host thread)

    def describe(self) -> list[str]:
        return ([f"precision auto -> {self.pick} ({self.reason}; measured {self.measured_utc} on {self.device})"]
                + [f"    {c.describe()}" for c in self.candidates])

    def to_dict(self) -> dict:
        return {**asdict(self), "candidates": [asdict(c) for c in self.candidates]}

    @classmethod
    def from_dict(cls, d: dict) -> PrecisionPick:
        return cls(d["backend"], d["device"], d["pick"], [Candidate(**c) for c in d["candidates"]], d["reason"],
                   d.get("measured_utc", ""), d.get("threads"))


def choose(candidates: list[Candidate], min_gain: float = MIN_GAIN) -> tuple[str, str]:
    """-> (pick, why) among measured candidates, most accurate first (module docstring)."""
    order = sorted((c for c in candidates if c.allowed and c.ms is not None), key=lambda c: ACCURACY_ORDER.index(c.precision))
    if not order:
        refused = "; ".join(f"{c.precision}: {c.why}" for c in candidates if c.allowed)
        raise RuntimeFailure(f"no precision passed its check here, so none can run ({refused}); send the edge-pfm "
                             "selftest report")
    best, notes = order[0], []
    for c in order[1:]:
        gain = 1 - c.ms / best.ms
        than = f"{c.precision} {c.ms:.2f} ms against {best.precision} {best.ms:.2f} ms"
        if gain >= min_gain:
            notes.append(f"{than}: {gain:.0%} faster")
            best = c
        else:
            how = f"only {gain:.0%} faster" if gain > 0 else f"{-gain:.0%} slower"
            notes.append(f"{than}: {how}, not >= {min_gain:.0%} faster, so the more accurate {best.precision} is kept")
    return best.precision, "; ".join(notes) or f"{best.precision} is the only candidate"


def time_backend(backend: Any, white: np.ndarray, fluo: np.ndarray, windows: int = TIMING_WINDOWS,
                 window_s: float = WINDOW_S, warmup_s: float = WARMUP_S) -> list[float]:
    """Batch-1 inference, `windows` windows of `window_s`: -> each window's median, in ms."""
    t_end = time.perf_counter() + warmup_s
    while time.perf_counter() < t_end:
        backend.infer_outputs(white, fluo)
    out = []
    for _ in range(windows):
        times, t_end = [], time.perf_counter() + window_s
        while time.perf_counter() < t_end or len(times) < 3:
            t = time.perf_counter()
            backend.infer_outputs(white, fluo)
            times.append((time.perf_counter() - t) * 1000)
        out.append(statistics.median(times))
    return out


def device_identity(backend: str) -> str:
    """The device a pick holds for: the GPU and TensorRT, or the CPU and ONNX Runtime. (ONNX Runtime's thread count
    is recorded with the pick, not keyed: a pick found under another --threads is still the best evidence there is.)"""
    if backend == "tensorrt":
        from edge_pfm.engine.trt_build import gpu_identity, import_tensorrt, trt_version

        gpu, cc = gpu_identity()
        return f"{gpu} sm{cc}, TensorRT {trt_version(import_tensorrt())}"
    from edge_pfm._lazy import require

    ort = require("onnxruntime", "the onnxruntime backend")
    return f"{platform.machine()} {_cpu_model()} x{os.cpu_count()}, onnxruntime {ort.__version__}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _pick_identity(bundle: Bundle, backend: str, device: str) -> str:
    """What a pick holds for (the bundle's artifacts and accuracy, the backend, the device), as a sha256."""
    ident = {"artifacts": {k: v["sha256"] for k, v in bundle.manifest["artifacts"].items()},
             "accuracy": bundle.manifest.get("accuracy", {}), "backend": backend, "device": device}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _pick_path(bundle: Bundle, backend: str, device: str, cache_dir: Path) -> Path:
    return cache_dir / "picks" / f"{backend}.{_pick_identity(bundle, backend, device)[:16]}.json"


def cached_pick(bundle: Bundle, backend: str, cache_dir: Path,
                log: Callable[[str], None] = _LOG.warning) -> PrecisionPick | None:
    """The pick measured for this bundle, backend and device and sealed by this device, or None (`log` says when a
    seal does not match)."""
    try:
        device = device_identity(backend)
        path = _pick_path(bundle, backend, device, cache_dir)
        rec = json.loads(path.read_text())
        if rec.get("schema") != PICK_SCHEMA or rec.get("identity") != _pick_identity(bundle, backend, device):
            return None
        problem = seal_problem(rec, cache_secret(bundle), path)
        if problem:
            log(f"{problem}: the pick is not trusted; auto runs {UNMEASURED} until measured again (edge-pfm build)")
            return None
        return PrecisionPick.from_dict(rec["pick"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EdgePfmError):  # none, damaged, or no backend
        return None


def save_pick(bundle: Bundle, pick: PrecisionPick, cache_dir: Path) -> Path:
    """Cache `pick` for its bundle, backend and device, sealed by this device (picks/ owner-only)."""
    private_dir(cache_dir, "picks")
    record = {"schema": PICK_SCHEMA, "identity": _pick_identity(bundle, pick.backend, pick.device),
              "pick": pick.to_dict()}
    return atomic_write_json(_pick_path(bundle, pick.backend, pick.device, cache_dir),
                             sealed(record, cache_secret(bundle)))


def forget_pick(bundle: Bundle, backend: str, cache_dir: Path) -> None:
    """Drop the cached pick (its precision was refused at first use: it no longer holds)."""
    _pick_path(bundle, backend, device_identity(backend), cache_dir).unlink(missing_ok=True)


def measure_pick(bundle: Bundle, backend: str, cache_dir: Path, threads: int | None,
                 opener: Callable[..., Any], log: Callable[[str], None] = _LOG.info,
                 windows: int = TIMING_WINDOWS, window_s: float = WINDOW_S) -> PrecisionPick:
    """Check and time every allowed precision on `backend` (opened by `opener(bundle, backend, precision)`, which
    checks each engine before its first use; `threads`: the inference threads it opens them with, recorded), pick
    (module docstring) and cache the pick."""
    from edge_pfm.engine.checks import EngineRefused
    from edge_pfm.preprocess import normalise
    from edge_pfm.references import References

    refs = References(bundle)
    specs = bundle.preprocessing
    white = normalise(refs.pixels["white_light"][:1], specs["white_light"])
    fluo = normalise(refs.pixels["fluorescence"][:1], specs["fluorescence"])
    candidates = []
    for precision in ACCURACY_ORDER:
        ok, why = allowed(bundle, precision, backend)
        c = Candidate(precision, ok, why)
        candidates.append(c)
        if not ok:
            log(f"  {c.describe()}")
            continue
        try:
            b = opener(bundle, backend, precision)
        except EngineRefused as exc:
            c.why = f"refused by its check: {exc}"
            log(f"  {precision}: {c.why}")
            continue
        except EdgePfmError as exc:  # the engine could not be built or loaded here: not a candidate after all
            c.why = f"could not be built or loaded: {exc}"
            log(f"  {precision}: {c.why}")
            continue
        try:
            c.check = b.check.describe() if getattr(b, "check", None) else "checked"
            c.windows_ms = [round(x, 4) for x in time_backend(b, white, fluo, windows, window_s)]
            c.ms = round(statistics.median(c.windows_ms), 4)
        finally:
            b.close()
        log(f"  {c.describe()}")
    pick, why = choose(candidates)
    device = device_identity(backend)
    result = PrecisionPick(backend, device, pick, candidates, why, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           threads)
    save_pick(bundle, result, cache_dir)
    return result
