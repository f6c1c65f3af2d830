"""ONNX Runtime backend: CPU everywhere; CUDA / TensorRT execution providers where installed."""
from __future__ import annotations

import numpy as np

from edge_pfm._lazy import require
from edge_pfm.backends.base import Backend, BackendUnavailable
from edge_pfm.bundle import Bundle, BundleError

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, precision: str = "fp32", providers: tuple[str, ...] | None = None,
                 threads: int | None = None):
        super().__init__(bundle, precision)
        ort = require("onnxruntime", "the onnxruntime backend")
        path = bundle.model_path(precision)
        available = ort.get_available_providers()
        providers = tuple(providers or DEFAULT_PROVIDERS)
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendUnavailable(f"onnxruntime providers {missing} are not available here (available: {available}); "
                               "install onnxruntime-gpu for CUDA, or use CPUExecutionProvider")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            # idle pool threads spin-wait by default, burning the cores capture and preprocessing need
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.threads = threads
        opts.log_severity_level = 3
        model = bundle.read_artifact(path.name)  # the verified bytes, not a file that may have changed since
        try:
            self.session = ort.InferenceSession(model, opts, providers=list(providers))
        except Exception as exc:  # ORT raises its own exception types for a corrupt or foreign model
            raise BundleError(f"onnxruntime could not load {path}: {exc}; re-export the bundle") from exc
        got_in = {i.name for i in self.session.get_inputs()}
        got_out = [o.name for o in self.session.get_outputs()]
        want_in = {s.name for s in self.inputs}
        if got_in != want_in or got_out != [s.name for s in self.outputs]:
            raise BundleError(f"{path}: model I/O {sorted(got_in)} -> {got_out} does not match the manifest "
                               f"{sorted(want_in)} -> {[s.name for s in self.outputs]}")
        self.providers = self.session.get_providers()
        self.version = str(ort.__version__)
        self._out = [s.name for s in self.outputs]

    def infer_outputs(self, white_light: np.ndarray, fluorescence: np.ndarray) -> dict[str, np.ndarray]:
        w, f = self.check_inputs(white_light, fluorescence)
        return dict(zip(self._out, self.session.run(self._out, {self._names[0]: w, self._names[1]: f})))

    def identity(self) -> dict:
        return {**super().identity(), "version": self.version, "flavour": "onnxruntime",
                "providers": list(self.providers)}

    def describe(self) -> str:
        return f"onnxruntime {self.precision} [{', '.join(self.providers)}]"

    def close(self) -> None:
        self.session = None
        super().close()
