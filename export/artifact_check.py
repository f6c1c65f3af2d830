"""The gate every ONNX artifact passes before it is written: onnx.checker's full check, then NVIDIA's own
ONNX parser and builder (TensorRT for RTX, `pip install tensorrt-rtx`, whose builder runs without a GPU)
through edge_pfm's engine-build code.

The build runs with DETAILED profiling verbosity, so the record says how many engine layers run in Int8,
Half and Float: proof that INT8 is real in the engine, not only that the file parses. Where TensorRT-RTX
cannot be installed (it has wheels for x86-64 Linux and Windows only) the build check is skipped with a
visible warning and the record says it was not checked.

What this cannot check: Jetson's TensorRT 10.3 itself, DLA, the implicit (calibration cache) INT8 path,
and running an engine. Those need the device.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from edge_pfm._lazy import MissingDependencyError
from edge_pfm.bundle import MODEL_ARTIFACTS
from export.onnx_graph import ExportError

CHECK_FLAVOUR = "tensorrt_rtx"
# which precision each bundle artifact is built as
ARTIFACT_PRECISION = {artifact: precision for precision, artifact in MODEL_ARTIFACTS.items()}


class ArtifactRejected(ExportError):
    """An ONNX artifact fails onnx.checker or TensorRT's parser/builder; the message names the node."""


def onnx_checker(path: str | Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ArtifactRejected(f"{path}: onnx.checker full check failed: {exc}") from exc


def tensorrt_build_check(path: str | Path, precision: str, max_batch: int = 8,
                         log=lambda m: None) -> dict:
    """Parse and build `path` with TensorRT-RTX through edge_pfm's build code -> the check record.
    Raises ArtifactRejected with the parser's node and message."""
    from edge_pfm.engine.plan import BuildRefused, TrtCapabilities, plan_build
    from edge_pfm.engine.trt_build import (
        EngineBuildError,
        build_engine_bytes,
        import_tensorrt,
        trt_version,
        trt_version_tuple,
    )

    try:
        trt = import_tensorrt(CHECK_FLAVOUR)
    except (MissingDependencyError, OSError) as exc:  # OSError: a wheel whose native libraries do not load
        reason = f"TensorRT-RTX is not usable here ({str(exc).splitlines()[0]})"
        warnings.warn(f"{path}: NOT CHECKED by TensorRT's parser and builder: {reason}", stacklevel=2)
        return {"checked": False, "reason": reason}
    caps = TrtCapabilities(trt_version_tuple(trt), 0, True, True, False, CHECK_FLAVOUR)
    try:
        plan = plan_build(caps, precision)
    except BuildRefused as exc:
        raise ArtifactRejected(f"{path}: {exc}") from exc
    try:
        result = build_engine_bytes(trt, path, plan, (1, 1, max_batch), log=log, detailed=True)
    except EngineBuildError as exc:
        raise ArtifactRejected(str(exc)) from exc
    census = result.census.to_dict() if result.census else {"layers": None, "by_datatype": {},
                                                              "compute_by_datatype": {}}
    return {"checked": True, "flavour": CHECK_FLAVOUR, "version": trt_version(trt), "precision": precision,
            "build_seconds": round(result.seconds, 2), "engine_bytes": len(result.engine),
            "warnings": result.warnings[:50], **census}


def check_artifact(path: str | Path, precision: str | None = None, max_batch: int = 8, log=lambda m: None) -> dict:
    """onnx.checker full check + TensorRT-RTX build of one ONNX file -> the record for the manifest."""
    path = Path(path)
    precision = precision or ARTIFACT_PRECISION.get(path.name, "fp32")
    onnx_checker(path)
    record = {"onnx_checker": "full check passed", "tensorrt": tensorrt_build_check(path, precision, max_batch, log)}
    return record


CENSUS_KEYS = ("checked", "reason", "flavour", "version", "precision", "layers", "by_datatype", "compute_by_datatype")


def build_census(record: dict) -> dict:
    """A build check without its timing, engine size and log: what a report compared byte for byte may keep."""
    return {"onnx_checker": record["onnx_checker"],
            "tensorrt": {k: record["tensorrt"][k] for k in CENSUS_KEYS if k in record["tensorrt"]}}


def summary_line(name: str, record: dict) -> str:
    t = record["tensorrt"]
    if not t.get("checked"):
        return f"{name}: onnx.checker passed; TensorRT build NOT CHECKED ({t.get('reason')})"
    dt = ", ".join(f"{k} {v}" for k, v in t["by_datatype"].items())
    conv = ", ".join(f"{k} {v}" for k, v in t["compute_by_datatype"].items())
    return (f"{name}: onnx.checker passed; {t['flavour']} {t['version']} built it in {t['build_seconds']:.1f}s, "
            f"{t['engine_bytes'] / 1e6:.1f} MB, {t['layers']} layers ({dt}); conv/matmul layers: {conv}")
