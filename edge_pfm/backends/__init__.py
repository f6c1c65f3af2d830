"""Inference backends behind one interface: ONNX Runtime (CPU/CUDA) and TensorRT (pycuda).

    backend = open_backend(bundle, "auto", precision="int8")
    logits = backend.infer(white_light, fluorescence)   # (B, C, H, W) float32 each -> (B, classes)
"""
from edge_pfm.backends.base import Backend, BackendError
from edge_pfm.backends.select import Selection, open_backend, select_backend

__all__ = ["Backend", "BackendError", "Selection", "open_backend", "select_backend"]
