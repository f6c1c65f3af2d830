"""Build a TensorRT engine from a bundle, on the device. Needs tensorrt (+ pycuda for the GPU identity).

Name-based API only (TensorRT 8.5 -> 11): build_serialized_network, set_memory_pool_limit,
optimization profiles. Names that not every supported version binds (EXPLICIT_BATCH, the FP16/INT8
builder flags, calibrators, IProgressMonitor) are reached only behind version checks.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from edge_pfm._lazy import require
from edge_pfm.bundle import Bundle
from edge_pfm.engine.cache import EngineKey, check_engine, write_engine
from edge_pfm.engine.plan import BuildPlan, TrtCapabilities, plan_build

DEFAULT_WORKSPACE_MIB = 1024  # Orin Nano 8 GB shares memory with the CPU: stay well below it
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-pfm" / "engines"


class EngineBuildError(RuntimeError):
    pass


def import_tensorrt():
    return require("tensorrt", "building or running TensorRT engines")


def trt_version(trt) -> str:
    # __version__ is set by the tensorrt package's __init__.py, not by the compiled bindings that
    # trt_api_check.py reads, so it is looked up by name here
    return str(getattr(trt, "__version__"))  # noqa: B009


def trt_version_tuple(trt) -> tuple[int, ...]:
    return tuple(int(p) for p in trt_version(trt).split(".")[:3] if p.isdigit())


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') through pycuda."""
    cuda = require("pycuda.driver", "querying the GPU for the engine cache key")
    cuda.init()
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return dev.name(), f"{major}.{minor}"


def capabilities(trt, bundle: Bundle) -> TrtCapabilities:
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    return TrtCapabilities(trt_version_tuple(trt), int(builder.num_DLA_cores), bundle.has("model.fp16.onnx"),
                           bundle.has("model.int8.onnx"), bundle.has("calibration.cache"))


def _make_logger(trt, log: Callable[[str], None], warnings: list[str]):
    class BuildLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                warnings.append(str(msg))
                log(f"  tensorrt: {msg}")

    return BuildLogger()


def _make_progress_monitor(trt, log: Callable[[str], None]):
    """IProgressMonitor exists from TensorRT 10.0; older versions report through log lines only."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            if parent_phase is None:
                log(f"  build phase: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Progress()


def _make_cache_calibrator(trt, cache_bytes: bytes):
    """A calibrator that only reads the bundle's calibration.cache: TensorRT never asks it for data."""

    class CacheOnlyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None  # no data: the cache must cover every tensor

        def read_calibration_cache(self):
            return cache_bytes

        def write_calibration_cache(self, cache):
            pass

    return CacheOnlyCalibrator()


def build_engine_bytes(trt, bundle: Bundle, plan: BuildPlan, profile: tuple[int, int, int], workspace_mib: int,
                       timing_cache: Path | None, log: Callable[[str], None]) -> tuple[bytes, list[str]]:
    warnings: list[str] = []
    logger = _make_logger(trt, log, warnings)
    builder = trt.Builder(logger)
    flags = 0
    if trt_version_tuple(trt) < (10,):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    elif plan.strongly_typed and trt_version_tuple(trt) < (11,):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle.root / plan.onnx_artifact
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            node = e.node_name() if hasattr(e, "node_name") else f"node #{e.node()}"
            errors.append(f"{node}: {e.desc()}")
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.use_calibration_cache:
        config.int8_calibrator = _make_cache_calibrator(trt, (bundle.root / "calibration.cache").read_bytes())
    if plan.dla_core >= 0:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    monitor = _make_progress_monitor(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor
    lo, opt, hi = profile
    prof = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        chw = tuple(t.shape)[1:]
        prof.set_shape(t.name, (lo, *chw), (opt, *chw), (hi, *chw))
    config.add_optimization_profile(prof)
    cache = None
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError("TensorRT failed to build the engine:\n  " + "\n  ".join(warnings[-20:]))
    log(f"  built in {time.perf_counter() - t0:.0f}s")
    if cache is not None:
        from edge_pfm.fileio import atomic_write_bytes

        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized), warnings


def ensure_engine(bundle: Bundle, precision: str, int8_source: str | None = None, dla_core: int = -1,
                  workspace_mib: int = DEFAULT_WORKSPACE_MIB, max_batch: int | None = None,
                  cache_dir: str | Path | None = None, build: bool = True,
                  log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> Path:
    """-> path of a valid engine for this bundle on this device, building it if needed (and allowed)."""
    trt = import_tensorrt()
    plan = plan_build(capabilities(trt, bundle), precision, int8_source, dla_core)
    gpu, cc = gpu_identity()
    hi = max_batch or bundle.max_batch
    profile = (1, 1, hi) if dla_core < 0 else (hi, hi, hi)  # DLA: static shapes only
    key = EngineKey(bundle.sha256(plan.onnx_artifact), plan.precision, plan.int8_source, trt_version(trt), gpu, cc,
                    plan.dla_core, profile)
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    path, why = check_engine(cache_dir, key)
    if path is not None:
        return path
    if not build:
        raise EngineBuildError(f"no usable engine in {cache_dir}: {why}; run `edge-pfm build --bundle {bundle.root} "
                               f"--precision {precision}` (or drop --no-build)")
    log(f"building TensorRT {trt_version(trt)} {plan.precision} engine for {gpu} (sm {cc}): {why}")
    t0 = time.perf_counter()
    engine, warnings = build_engine_bytes(trt, bundle, plan, profile, workspace_mib,
                                          cache_dir / f"timing.trt{trt_version(trt)}.{cc}.cache", log)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return write_engine(cache_dir, key, engine, time.perf_counter() - t0, warnings)
