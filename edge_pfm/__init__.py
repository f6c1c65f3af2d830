"""edge-pfm: real-time dual-source (white-light + fluorescence) colposcopy classification.

    import edge_pfm
    clf = edge_pfm.Classifier("bundle/")
    result = clf.classify(white_bgr, fluo_bgr)

Importing this package is cheap: numpy only. OpenCV, ONNX Runtime, TensorRT and pycuda are
imported when the code that needs them runs.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access (PEP 562)
_LAZY = {
    "Bundle": "edge_pfm.bundle",
    "BundleError": "edge_pfm.bundle",
    "PreprocessSpec": "edge_pfm.preprocess",
    "preprocess": "edge_pfm.preprocess",
    "Classifier": "edge_pfm.classifier",
    "PairedDataset": "edge_pfm.dataset",
    "EdgePfmError": "edge_pfm.errors",
    "ExitCode": "edge_pfm.errors",
}

def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_pfm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["__version__", *sorted(_LAZY)]
