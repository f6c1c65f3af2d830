"""TensorRT's calibration cache text format: write (build machine) and read (device, tests).

    TRT-<version>-EntropyCalibration2
    <tensor name>: <8 hex digits>

The hex is the IEEE-754 float32 bit pattern of the scale, big-endian, where scale = amax / 127
(TensorRT's dynamic range is scale * 127). <version> is TensorRT's integer version: 8.6.1 -> 8601
(major*1000 + minor*100 + patch) before 10, 10.3.0 -> 100300 (major*10000 + minor*100 + patch) from 10.
onnxruntime's own `calibration.cache` is a different format: never ship it to TensorRT.
"""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

from edge_pfm.errors import EdgePfmError

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
_HEADER = re.compile(r"^TRT-(\d+)-(\w+)$")
_ENTRY = re.compile(r"^(.+): ([0-9a-fA-F]{8})$")


class CalibrationCacheError(EdgePfmError, ValueError):
    """A calibration cache is malformed; the message names the line."""


def trt_version_int(version: str) -> int:
    """'8.6.1' -> 8601, '10.3.0' -> 100300, '10.16.1.11' -> 101601."""
    parts = version.strip().split(".")
    if not parts or not all(p.isdigit() for p in parts) or len(parts) < 2:
        raise ValueError(f"TensorRT version must look like 10.3 or 8.6.1, got {version!r}")
    major, minor = int(parts[0]), int(parts[1])
    patch = int(parts[2]) if len(parts) > 2 else 0
    if major < 8:
        raise ValueError(f"TensorRT {version} is too old: the name-based API needs >= 8.5")
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def scale_hex(amax: float) -> str:
    """Big-endian float32 bits of amax/127, as TensorRT writes them."""
    return struct.pack(">f", float(amax) / 127.0).hex()


def hex_to_amax(text: str) -> float:
    return struct.unpack(">f", bytes.fromhex(text))[0] * 127.0


@dataclass
class CalibrationCache:
    trt_version: int
    algorithm: str
    amax: dict[str, float]  # tensor name -> symmetric range (max |x|)

    def to_text(self) -> str:
        lines = [f"TRT-{self.trt_version}-{self.algorithm}"]
        for name, a in self.amax.items():
            if not math.isfinite(a) or a < 0:
                raise CalibrationCacheError(f"tensor {name!r}: range {a} is not a finite non-negative number")
            lines.append(f"{name}: {scale_hex(max(a, 1e-12))}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str, source: str = "<cache>") -> CalibrationCache:
        lines = [ln.rstrip("\r") for ln in text.split("\n") if ln.strip()]
        if not lines:
            raise CalibrationCacheError(f"{source}: empty calibration cache")
        m = _HEADER.match(lines[0].strip())
        if not m:
            raise CalibrationCacheError(
                f"{source}: line 1 {lines[0][:60]!r} is not a TensorRT cache header 'TRT-<version>-<algorithm>' "
                "(onnxruntime's calibration.cache is a different format)"
            )
        version, algorithm = int(m.group(1)), m.group(2)
        if algorithm not in ALGORITHMS:
            raise CalibrationCacheError(f"{source}: unknown calibration algorithm {algorithm!r}")
        amax: dict[str, float] = {}
        for i, line in enumerate(lines[1:], start=2):
            e = _ENTRY.match(line)
            if not e:
                raise CalibrationCacheError(f"{source}: line {i} {line[:60]!r} is not '<tensor>: <8 hex digits>'")
            name = e.group(1)
            if name in amax:
                raise CalibrationCacheError(f"{source}: line {i}: tensor {name!r} appears twice")
            value = hex_to_amax(e.group(2))
            if not math.isfinite(value) or value < 0:
                raise CalibrationCacheError(f"{source}: line {i}: tensor {name!r} has scale {value / 127} (not finite, >= 0)")
            amax[name] = value
        return cls(version, algorithm, amax)

    @classmethod
    def read(cls, path) -> CalibrationCache:
        from pathlib import Path

        p = Path(path)
        try:
            text = p.read_text(encoding="ascii")
        except UnicodeDecodeError as exc:
            raise CalibrationCacheError(f"{p}: not a text calibration cache ({exc})") from exc
        return cls.from_text(text, str(p))
