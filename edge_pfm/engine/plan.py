"""Which engine builds are possible on this TensorRT, decided before any build starts.

Pure Python over a `TrtCapabilities` description, so the rules are tested here, where TensorRT
cannot be installed.
"""
from __future__ import annotations

from dataclasses import dataclass

from edge_pfm.errors import UnavailableError

PRECISIONS = ("fp32", "fp16", "int8")
INT8_SOURCES = ("qdq", "cache")


class BuildRefused(UnavailableError, ValueError):
    """The requested build cannot work on this TensorRT/device; the message says why and what to do instead."""


@dataclass(frozen=True)
class TrtCapabilities:
    version: tuple[int, ...]  # (10, 3, 0)
    num_dla_cores: int = 0
    has_fp16_onnx: bool = False  # the bundle carries an FP16-typed ONNX (needed for FP16 on TensorRT >= 11)
    has_int8_onnx: bool = True
    has_calibration_cache: bool = True
    flavour: str = "tensorrt"  # or "tensorrt_rtx" (TensorRT for RTX: versions 1.x, strongly typed)

    @property
    def strongly_typed_only(self) -> bool:  # TensorRT 11 removed the FP16/INT8 builder flags and calibrators
        return self.flavour == "tensorrt_rtx" or self.version[0] >= 11

    @property
    def name(self) -> str:
        label = "TensorRT-RTX" if self.flavour == "tensorrt_rtx" else "TensorRT"
        return f"{label} {'.'.join(map(str, self.version))}"


@dataclass(frozen=True)
class BuildPlan:
    precision: str
    int8_source: str  # "" unless int8
    onnx_artifact: str  # which bundle file is parsed
    builder_flags: tuple[str, ...]  # BuilderFlag names to set
    use_calibration_cache: bool
    dla_core: int  # -1 = GPU
    strongly_typed: bool


def plan_build(caps: TrtCapabilities, precision: str, int8_source: str | None = None, dla_core: int = -1) -> BuildPlan:
    if precision not in PRECISIONS:
        raise BuildRefused(f"precision must be one of {PRECISIONS}, got {precision!r}")
    v = caps.name
    if caps.flavour == "tensorrt" and caps.version < (8, 5):
        raise BuildRefused(f"{v} is too old: edge-pfm uses the name-based API of TensorRT >= 8.5 (JetPack >= 5.1)")
    if precision != "int8" and int8_source:
        raise BuildRefused("--int8-source only applies to --precision int8")
    if dla_core >= 0:
        if caps.num_dla_cores == 0:
            raise BuildRefused(f"--dla-core {dla_core}: this device has no DLA (Orin Nano has none; AGX Orin has 2). "
                               "Drop --dla-core to build for the GPU")
        if dla_core >= caps.num_dla_cores:
            raise BuildRefused(f"--dla-core {dla_core}: this device has {caps.num_dla_cores} DLA core(s) "
                               f"(0..{caps.num_dla_cores - 1})")
        if precision == "fp32":
            raise BuildRefused("DLA runs FP16 and INT8 only; use --precision fp16 or int8 with --dla-core")
    flags: list[str] = []
    if dla_core >= 0:
        flags.append("GPU_FALLBACK")
    if precision == "fp32":
        return BuildPlan("fp32", "", "model.onnx", tuple(flags), False, dla_core, caps.strongly_typed_only)
    if precision == "fp16":
        if caps.strongly_typed_only:
            if not caps.has_fp16_onnx:
                raise BuildRefused(
                    f"{v} is strongly typed: FP16 needs an FP16-typed ONNX, and this bundle has none. "
                    "Run calibration on the build machine (python -m calibration --bundle BUNDLE ...), which writes "
                    "model.fp16.onnx, or build --precision int8 (Q/DQ)")
            return BuildPlan("fp16", "", "model.fp16.onnx", tuple(flags), False, dla_core, True)
        return BuildPlan("fp16", "", "model.onnx", (*flags, "FP16"), False, dla_core, False)
    # int8
    source = int8_source or ("cache" if dla_core >= 0 and not caps.strongly_typed_only else "qdq")
    if source not in INT8_SOURCES:
        raise BuildRefused(f"--int8-source must be one of {INT8_SOURCES}, got {source!r}")
    if source == "cache":
        if caps.strongly_typed_only:
            raise BuildRefused(f"{v} has no implicit INT8 calibration (calibration caches; TensorRT 11 removed it); "
                               "use --int8-source qdq (model.int8.onnx)")
        if not caps.has_calibration_cache:
            raise BuildRefused("the bundle has no calibration.cache; run python -m calibration first")
        # FP16 fallback for layers without a scale; the cache only feeds a read-only calibrator
        return BuildPlan("int8", "cache", "model.onnx", (*flags, "INT8", "FP16"), True, dla_core, False)
    if not caps.has_int8_onnx:
        raise BuildRefused("the bundle has no model.int8.onnx; run python -m calibration first")
    if dla_core >= 0 and not caps.strongly_typed_only:
        raise BuildRefused(f"on {v} DLA INT8 needs the calibration cache (implicit INT8); "
                           "use --int8-source cache with --dla-core")
    if caps.strongly_typed_only:
        return BuildPlan("int8", "qdq", "model.int8.onnx", tuple(flags), False, dla_core, True)
    # explicit quantization: INT8 from the Q/DQ nodes, FP16 allowed for the float layers
    return BuildPlan("int8", "qdq", "model.int8.onnx", (*flags, "INT8", "FP16"), False, dla_core, False)
