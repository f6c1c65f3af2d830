"""Backend selection: `auto` takes TensorRT when it can run here, else ONNX Runtime; always says why."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_pfm._lazy import INSTALL_HINTS, is_importable
from edge_pfm.backends.base import Backend, BackendUnavailable
from edge_pfm.bundle import Bundle, BundleError
from edge_pfm.engine.trt_build import DEFAULT_CACHE_DIR
from edge_pfm.errors import InvalidArgument
from edge_pfm.precision_pick import UNMEASURED

BACKENDS = ("auto", "tensorrt", "onnxruntime")
_LOG = logging.getLogger(__name__)
PICKED = "auto: measured on this device"
TRT_MISSING = ("TensorRT is not installed here. On a Jetson it comes with JetPack: `sudo apt install "
               "nvidia-jetpack` (or just python3-libnvinfer) and `pip install pycuda` against JetPack's CUDA; "
               "create the venv with --system-site-packages so it sees JetPack's tensorrt. "
               "Elsewhere use --backend onnxruntime.")


@dataclass(frozen=True)
class Selection:
    backend: str
    precision: str
    reason: str
    precision_reason: str = "asked for"


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why) for TensorRT + pycuda + a CUDA device, without importing heavy modules needlessly."""
    if not is_importable("tensorrt"):
        return False, "tensorrt is not importable"
    if not is_importable("pycuda"):
        return False, f"pycuda is not importable ({INSTALL_HINTS['pycuda']})"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() < 1:
            return False, "no CUDA device"
    except Exception as exc:  # a driver/runtime mismatch surfaces here
        return False, f"CUDA is not usable ({exc})"
    return True, "tensorrt and pycuda are importable and a CUDA device is present"


def default_precision(bundle: Bundle, backend: str, cache_dir: str | Path | None = None,
                      threads: int | None = None) -> tuple[str, str]:
    """`auto` on `backend`: the pick measured on this device (edge_pfm.precision_pick), else FP32. -> (precision,
    why; a why that starts with PICKED when it is the measured pick)."""
    from edge_pfm.engine.trt_build import DEFAULT_CACHE_DIR
    from edge_pfm.precision_pick import cached_pick

    pick = cached_pick(bundle, backend, Path(cache_dir or DEFAULT_CACHE_DIR))
    if pick is not None:
        differs = f" (timed with {pick.threads} inference threads)" if threads and threads != pick.threads else ""
        return pick.pick, f"{PICKED}: {pick.reason}{differs}"
    return UNMEASURED, (f"auto: {UNMEASURED} until the fastest checked precision is measured here (edge-pfm build "
                        f"--bundle {bundle.root})")


def select_backend(bundle: Bundle, backend: str = "auto", precision: str | None = None,
                   trt_status: tuple[bool, str] | None = None, cache_dir: str | Path | None = None,
                   threads: int | None = None) -> Selection:
    if backend not in BACKENDS:
        raise InvalidArgument(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if precision not in (None, "auto", "fp32", "fp16", "int8"):
        raise InvalidArgument(f"unknown precision {precision!r}; choose auto, fp32, fp16 or int8")
    trt_ok, trt_why = trt_status if trt_status is not None else (
        tensorrt_status() if backend != "onnxruntime" else (False, "not asked for"))
    if backend == "tensorrt" and not trt_ok:
        raise BackendUnavailable(f"--backend tensorrt: {trt_why}. {TRT_MISSING}")
    chosen = "tensorrt" if backend == "tensorrt" or (backend == "auto" and trt_ok) else "onnxruntime"
    why_precision = "asked for"
    if precision in (None, "auto"):
        precision, why_precision = default_precision(bundle, chosen, cache_dir, threads)
    if chosen == "tensorrt":
        return Selection("tensorrt", precision, f"TensorRT: {trt_why}", why_precision)
    if precision == "fp16":
        raise BackendUnavailable("fp16 runs on TensorRT (FP16 engine); ONNX Runtime here runs fp32 or int8 (Q/DQ)")
    if precision == "int8" and not bundle.has("model.int8.onnx"):
        raise BundleError(f"{bundle.root} has no INT8 model; run python -m calibration --bundle {bundle.root} ...")
    why = "asked for" if backend == "onnxruntime" else f"TensorRT unavailable: {trt_why}"
    return Selection("onnxruntime", precision, f"ONNX Runtime CPU ({why})", why_precision)


def open_backend(bundle: Bundle | str | Path, backend: str = "auto", precision: str | None = None,
                 cache_dir: str | Path | None = None, build: bool = True, threads: int | None = None,
                 log: Callable[[str], None] | None = None, recheck: bool = False, int8_source: str | None = None,
                 dla_core: int = -1, workspace_mib: int | None = None, max_batch: int | None = None) -> Backend:
    """Select and load a backend, checked against the bundle's reference of its precision before first use
    (edge_pfm.engine.checks: an engine that fails raises EngineRefused). TensorRT engines are built (or taken from
    the cache) on first use; int8_source, dla_core, workspace_mib and max_batch shape that build. When the measured
    pick (precision auto) is refused, the pick is dropped and FP32 runs instead, checked the same way."""
    from edge_pfm.engine.checks import EngineRefused

    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    sel = select_backend(bundle, backend, precision, cache_dir=cache_dir, threads=threads)
    trt = {"int8_source": int8_source, "dla_core": dla_core, "workspace_mib": workspace_mib, "max_batch": max_batch}
    try:
        b = _open_checked(bundle, sel, cache_dir, build, threads, log or _LOG.info, recheck, trt)
    except EngineRefused as exc:
        if not sel.precision_reason.startswith(PICKED) or sel.precision == UNMEASURED:
            raise
        from edge_pfm.precision_pick import forget_pick

        forget_pick(bundle, sel.backend, cache_dir)
        _LOG.warning(f"the measured pick {sel.precision} was refused by its check ({exc}); the pick is dropped and "
                     f"{UNMEASURED} runs: measure again with edge-pfm build --bundle {bundle.root}")
        sel = Selection(sel.backend, UNMEASURED, sel.reason, f"auto: {UNMEASURED}, the measured pick "
                        f"{sel.precision} was refused by its check")
        b = _open_checked(bundle, sel, cache_dir, build, threads, log or _LOG.info, recheck, trt)
    return b


def _open_checked(bundle: Bundle, sel: Selection, cache_dir: Path, build: bool, threads: int | None,
                  log: Callable[[str], None], recheck: bool, trt: dict) -> Backend:
    from edge_pfm.engine.cache import cache_secret
    from edge_pfm.engine.checks import ensure_checked, onnxruntime_record
    from edge_pfm.references import References
    from edge_pfm.thread_plan import plan_threads

    References(bundle).require(sel.precision)  # before anything is built: an engine nothing can check is useless
    secret = cache_secret(bundle)  # seals the verdict; also before any build: a state dir it cannot use is an error
    if sel.backend == "onnxruntime" and sel.precision == "int8" and bundle.manifest.get("accuracy", {}).get(
            "gate_passed") is False:
        _LOG.warning(f"running the INT8 model that calibration's gate refused ({bundle.root} was calibrated with "
                     "--allow-degraded): asked for with --precision int8")
    plan = plan_threads(sel.backend, inference=threads)
    if sel.backend == "tensorrt":
        from edge_pfm.backends.tensorrt_backend import TensorRTBackend
        from edge_pfm.engine.cache import SidecarRecord, sealed_engine_sha256
        from edge_pfm.engine.trt_build import DEFAULT_WORKSPACE_MIB, ensure_engine

        engine = ensure_engine(bundle, sel.precision, trt["int8_source"], trt["dla_core"],
                               trt["workspace_mib"] or DEFAULT_WORKSPACE_MIB, trt["max_batch"], cache_dir, build, log)
        b: Backend = TensorRTBackend(bundle, engine, sel.precision, sealed_engine_sha256(engine, secret))
        record = SidecarRecord(engine, b.identity()["engine_sha256"], secret, log)
    else:
        from edge_pfm.backends.onnxruntime_backend import OnnxRuntimeBackend

        b = OnnxRuntimeBackend(bundle, sel.precision, threads=plan.inference)
        record = onnxruntime_record(b, cache_dir, secret, log)
    try:
        b.check = ensure_checked(b, bundle, record, log, recheck)
    except BaseException:
        b.close()
        raise
    b.selection_reason = sel.reason
    b.precision_reason = sel.precision_reason
    b.thread_plan = plan
    return b
