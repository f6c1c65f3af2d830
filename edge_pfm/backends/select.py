"""Backend selection: `auto` takes TensorRT when it can run here, else ONNX Runtime; always says why."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_pfm._lazy import INSTALL_HINTS, is_importable
from edge_pfm.backends.base import Backend, BackendUnavailable
from edge_pfm.bundle import Bundle, BundleError
from edge_pfm.errors import InvalidArgument

BACKENDS = ("auto", "tensorrt", "onnxruntime")
TRT_MISSING = ("TensorRT is not installed here. On a Jetson it comes with JetPack: `sudo apt install "
               "nvidia-jetpack` (or just python3-libnvinfer) and `pip install pycuda` against JetPack's CUDA; "
               "create the venv with --system-site-packages so it sees JetPack's tensorrt. "
               "Elsewhere use --backend onnxruntime.")


@dataclass(frozen=True)
class Selection:
    backend: str
    precision: str
    reason: str


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


def default_precision(bundle: Bundle) -> str:
    return "int8" if bundle.has("model.int8.onnx") else "fp32"


def select_backend(bundle: Bundle, backend: str = "auto", precision: str | None = None,
                   trt_status: tuple[bool, str] | None = None) -> Selection:
    if backend not in BACKENDS:
        raise InvalidArgument(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    precision = precision or default_precision(bundle)
    trt_ok, trt_why = trt_status if trt_status is not None else (
        tensorrt_status() if backend != "onnxruntime" else (False, "not asked for"))
    if backend == "tensorrt" and not trt_ok:
        raise BackendUnavailable(f"--backend tensorrt: {trt_why}. {TRT_MISSING}")
    if backend == "tensorrt" or (backend == "auto" and trt_ok):
        return Selection("tensorrt", precision, f"TensorRT: {trt_why}")
    if precision == "fp16":
        raise BackendUnavailable("fp16 runs on TensorRT (FP16 engine); ONNX Runtime here runs fp32 or int8 (Q/DQ)")
    if precision == "int8" and not bundle.has("model.int8.onnx"):
        raise BundleError(f"{bundle.root} has no INT8 model; run python -m calibration --bundle {bundle.root} ...")
    why = "asked for" if backend == "onnxruntime" else f"TensorRT unavailable: {trt_why}"
    return Selection("onnxruntime", precision, f"ONNX Runtime CPU ({why})")


def open_backend(bundle: Bundle | str | Path, backend: str = "auto", precision: str | None = None,
                 cache_dir: str | Path | None = None, build: bool = True, threads: int | None = None) -> Backend:
    """Select and load a backend. TensorRT engines are built (or taken from the cache) on first use."""
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    sel = select_backend(bundle, backend, precision)
    from edge_pfm.thread_plan import plan_threads

    plan = plan_threads(sel.backend, inference=threads)
    if sel.backend == "tensorrt":
        from edge_pfm.backends.tensorrt_backend import TensorRTBackend
        from edge_pfm.engine.trt_build import ensure_engine

        engine = ensure_engine(bundle, sel.precision, cache_dir=cache_dir, build=build)
        b: Backend = TensorRTBackend(bundle, engine, sel.precision)
    else:
        from edge_pfm.backends.onnxruntime_backend import OnnxRuntimeBackend

        b = OnnxRuntimeBackend(bundle, sel.precision, threads=plan.inference)
    b.selection_reason = sel.reason
    b.thread_plan = plan
    return b
