"""Optional heavy dependencies, imported on first use with a message that says what to install."""
from __future__ import annotations

import importlib
from types import ModuleType

from edge_pfm.errors import UnavailableError

# module -> what to install to get it
INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime  (or onnxruntime-gpu; on Jetson the wheel from jetson-ai-lab / "
    "elinux.org for your JetPack)",
    "tensorrt": "on a Jetson it ships with JetPack: sudo apt install python3-libnvinfer; on x86: "
    "pip install tensorrt (NVIDIA's index)",
    "pycuda": "pip install pycuda  (needs the CUDA toolkit: nvcc on PATH and cuda.h; on a Jetson it comes "
    "with JetPack under /usr/local/cuda)",
    "torch": "pip install -e '.[export]' (build machine only; the device runtime never needs torch)",
    "onnx": "pip install -e '.[export]' (build machine only)",
    "polygraphy": "pip install polygraphy (build machine only)",
    "tensorrt_rtx": "pip install tensorrt-rtx==1.7.1.116 (x86-64 Linux or Windows; it is in the '.[export]' extra)",
    "onnxconverter_common": "pip install -e '.[export]' (build machine only: onnxconverter-common)",
}


class MissingDependencyError(UnavailableError, ImportError):
    """An optional dependency is not installed; the message says what to install."""


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming `purpose` and the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = INSTALL_HINTS.get(module.split(".")[0], f"pip install {module}")
        raise MissingDependencyError(
            f"{purpose} needs '{module}', which is not importable ({exc}). Install it: {hint}"
        ) from exc


def is_importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
