"""Build a TensorRT engine from a bundle's ONNX. Needs tensorrt (+ pycuda for the GPU identity) on the
device, or tensorrt_rtx (TensorRT for RTX), whose builder also runs on a machine without a GPU.

Name-based API only (TensorRT 8.5 -> 11, TensorRT-RTX 1.x): build_serialized_network,
set_memory_pool_limit, optimization profiles. Names that not every supported version binds
(EXPLICIT_BATCH, STRONGLY_TYPED, the FP16/INT8 builder flags, calibrators, IProgressMonitor) are reached
only behind version checks. TensorRT-RTX is strongly typed like TensorRT 11: precision comes from the ONNX.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edge_pfm._lazy import require
from edge_pfm.bundle import Bundle
from edge_pfm.engine.cache import EngineKey, cache_secret, check_engine, private_dir, write_engine
from edge_pfm.engine.layer_census import LayerCensus, census_from_log
from edge_pfm.engine.plan import BuildPlan, TrtCapabilities, plan_build
from edge_pfm.errors import RuntimeFailure

DEFAULT_WORKSPACE_MIB = 1024  # Orin Nano 8 GB shares memory with the CPU: stay well below it
_LOG = logging.getLogger(__name__)
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-pfm" / "engines"
FLAVOURS = ("tensorrt", "tensorrt_rtx")  # the module each flavour imports as
# TensorRT-RTX builds ahead of time, without a GPU, for its default set of compute capabilities
RTX_AOT_IDENTITY = ("any (TensorRT-RTX ahead-of-time build)", "rtx-default")


class EngineBuildError(RuntimeFailure):
    """TensorRT could not parse or build the model; the message carries its errors."""


@dataclass
class BuildResult:
    engine: bytes
    seconds: float
    warnings: list[str] = field(default_factory=list)
    census: LayerCensus | None = None  # layer datatypes (DETAILED profiling verbosity only)


def import_tensorrt(flavour: str = "tensorrt"):
    if flavour not in FLAVOURS:
        raise EngineBuildError(f"unknown TensorRT flavour {flavour!r}; choose one of {FLAVOURS}")
    what = "building or running TensorRT engines" if flavour == "tensorrt" else \
        "checking that TensorRT's parser and builder accept an ONNX (pip install tensorrt-rtx, x86-64 Linux/Windows)"
    return require(flavour, what)


def trt_flavour(trt) -> str:
    module_name: str = trt.__name__
    return module_name.split(".")[0]


def trt_version(trt) -> str:
    # __version__ is set by the tensorrt package's __init__.py, not by the compiled bindings that
    # trt_api_check.py reads, so it is looked up by name here
    return str(getattr(trt, "__version__"))  # noqa: B009


def trt_version_tuple(trt) -> tuple[int, ...]:
    return tuple(int(p) for p in trt_version(trt).split(".")[:3] if p.isdigit())


def gpu_identity(flavour: str = "tensorrt", device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') through pycuda; TensorRT-RTX builds for its portable
    compute-capability set whether or not a GPU is present, so its engines are keyed by that instead."""
    if flavour == "tensorrt_rtx":
        return RTX_AOT_IDENTITY
    cuda = require("pycuda.driver", "querying the GPU for the engine cache key")
    cuda.init()
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return dev.name(), f"{major}.{minor}"


def capabilities(trt, bundle: Bundle) -> TrtCapabilities:
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    return TrtCapabilities(trt_version_tuple(trt), int(builder.num_DLA_cores), bundle.has("model.fp16.onnx"),
                           bundle.has("model.int8.onnx"), bundle.has("calibration.cache"), trt_flavour(trt))


def _network_flags(trt, plan: BuildPlan) -> int:
    if trt_flavour(trt) != "tensorrt":
        return 0  # TensorRT-RTX: every network is strongly typed
    version = trt_version_tuple(trt)
    if version < (10,):
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan.strongly_typed and version < (11,):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # TensorRT 11: strongly typed is the only mode


class _Interrupt:
    """Ctrl-C during a parse or build. Python's default handler raises KeyboardInterrupt in whatever Python code
    TensorRT calls back into (the logger, the progress monitor), and TensorRT swallows exceptions raised there:
    the build went on and the interrupt was lost. While `deferred()` holds, the handler only records it; the
    progress monitor then cancels the build, and the interrupt is raised once TensorRT has returned."""

    def __init__(self):
        self.seen = False

    @contextlib.contextmanager
    def deferred(self):
        main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
        if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return
        previous = signal.signal(signal.SIGINT, lambda signum, frame: setattr(self, "seen", True))
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if self.seen:
            raise KeyboardInterrupt


def _make_logger(trt, log: Callable[[str], None], warnings: list[str], detailed: list[str]):
    class BuildLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                warnings.append(str(msg))
                log(f"  tensorrt: {msg}")
            elif msg.startswith(("Layers:\n", "Engine Layer Information:")):
                detailed.append(str(msg))  # the final engine's layers (DETAILED verbosity)

    return BuildLogger()


def _make_progress_monitor(trt, log: Callable[[str], None], interrupt: _Interrupt):
    """IProgressMonitor exists from TensorRT 10.0; older versions report through log lines only."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                log(f"  build phase: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return not interrupt.seen  # False cancels the build: Ctrl-C was pressed

        def phase_finish(self, phase_name):
            pass

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


def _parser_errors(parser) -> list[str]:
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = e.node_name() if hasattr(e, "node_name") else ""
        node = node or f"node #{e.node()}"
        op = e.node_operator() if hasattr(e, "node_operator") else ""
        errors.append(f"{node}{f' ({op})' if op else ''}: {e.desc()}")
    return errors


def build_engine_bytes(trt, onnx_path: str | Path, plan: BuildPlan, profile: tuple[int, int, int],
                       workspace_mib: int = DEFAULT_WORKSPACE_MIB, timing_cache: Path | None = None,
                       log: Callable[[str], None] = lambda m: None, detailed: bool = False,
                       cache_bytes: bytes | None = None, onnx_bytes: bytes | None = None) -> BuildResult:
    """Parse `onnx_path` (or `onnx_bytes`, already verified, named by `onnx_path`) with TensorRT's ONNX parser and
    build a serialized engine; raises EngineBuildError naming the parser's node and message. `detailed` logs the
    engine's layers to take their datatypes."""
    warnings: list[str] = []
    listings: list[str] = []
    interrupt = _Interrupt()
    logger = _make_logger(trt, log, warnings, listings)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    onnx_path = Path(onnx_path)
    with interrupt.deferred():
        if onnx_bytes is None:
            parsed = parser.parse_from_file(str(onnx_path))
        else:  # the bytes that were verified, not a file that can change in between
            parsed = parser.parse(onnx_bytes, str(onnx_path))
    if not parsed:
        errors = _parser_errors(parser) or warnings[-5:]
        raise EngineBuildError(f"{trt_flavour(trt)} {trt_version(trt)}'s ONNX parser rejected {onnx_path}:\n  "
                               + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if detailed:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.use_calibration_cache:
        if cache_bytes is None:
            raise EngineBuildError("this plan needs the bundle's calibration.cache")
        config.int8_calibrator = _make_cache_calibrator(trt, cache_bytes)
    if plan.dla_core >= 0:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
    monitor = _make_progress_monitor(trt, log, interrupt)
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
    if timing_cache is not None:  # a no-op in TensorRT-RTX (it times nothing), kept for TensorRT
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    t0 = time.perf_counter()
    with interrupt.deferred():
        serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise EngineBuildError(f"{trt_flavour(trt)} {trt_version(trt)} failed to build {onnx_path}:\n  "
                               + "\n  ".join(warnings[-20:]))
    log(f"  built in {seconds:.1f}s")
    if cache is not None:
        from edge_pfm.fileio import atomic_write_bytes

        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return BuildResult(bytes(serialized), seconds, warnings, census_from_log(listings))


def engine_key(bundle: Bundle, plan: BuildPlan, version: str, gpu: str, cc: str, profile: tuple[int, int, int],
               flavour: str = "tensorrt") -> EngineKey:
    """The cache key: every artifact the plan builds from (calibration.cache too, for implicit INT8), the precision,
    TensorRT, the GPU and the profile."""
    cache_sha = bundle.sha256("calibration.cache") if plan.use_calibration_cache else ""
    return EngineKey(bundle.sha256(plan.onnx_artifact), plan.precision, plan.int8_source, version, gpu, cc,
                     plan.dla_core, profile, flavour, cache_sha)


def ensure_engine(bundle: Bundle, precision: str, int8_source: str | None = None, dla_core: int = -1,
                  workspace_mib: int = DEFAULT_WORKSPACE_MIB, max_batch: int | None = None,
                  cache_dir: str | Path | None = None, build: bool = True,
                  log: Callable[[str], None] = _LOG.info,
                  flavour: str = "tensorrt") -> Path:
    """-> path of a valid engine for this bundle on this device, building it if needed (and allowed). A cached
    engine counts only under its sidecar's seal (the secret of the bundle's trust state directory): one that does
    not match is rebuilt, and the log says why."""
    trt = import_tensorrt(flavour)
    plan = plan_build(capabilities(trt, bundle), precision, int8_source, dla_core)
    gpu, cc = gpu_identity(flavour)
    hi = max_batch or bundle.max_batch
    profile = (1, 1, hi) if dla_core < 0 else (hi, hi, hi)  # DLA: static shapes only
    key = engine_key(bundle, plan, trt_version(trt), gpu, cc, profile, flavour)
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    secret = cache_secret(bundle)
    path, why = check_engine(cache_dir, key, secret)
    if path is not None:
        return path
    if not build:
        raise EngineBuildError(f"no usable engine in {cache_dir}: {why}; run `edge-pfm build --bundle {bundle.root} "
                               f"--precision {precision}` (or drop --no-build)")
    log(f"building {flavour} {trt_version(trt)} {plan.precision} engine for {gpu} (sm {cc}): {why}")
    private_dir(cache_dir)
    t0 = time.perf_counter()
    cache_bytes = bundle.read_artifact("calibration.cache") if plan.use_calibration_cache else None
    result = build_engine_bytes(trt, bundle.root / plan.onnx_artifact, plan, profile, workspace_mib,
                                cache_dir / f"timing.{flavour}{trt_version(trt)}.{cc}.cache", log,
                                cache_bytes=cache_bytes, onnx_bytes=bundle.read_artifact(plan.onnx_artifact))
    return write_engine(cache_dir, key, result.engine, time.perf_counter() - t0, secret, result.warnings,
                        key.built_from(plan.onnx_artifact))
