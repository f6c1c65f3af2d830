"""ONNX Runtime CPU sessions for calibration's evaluations."""
from __future__ import annotations

from pathlib import Path


def cpu_session(model, spin: bool = True):
    """An onnxruntime.InferenceSession on the CPU for a model path or an onnx.ModelProto. `spin=False` when other
    processes share the cores (the renderers of the next synthetic pairs): ORT's idle pool threads spin-wait by
    default, taking the cores those need. Measured on 2 cores: alone, spinning is ~20 % faster; beside the
    renderers, 640 held-out pairs took 12 s without it and 15-19 s with it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(Path(model))
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
