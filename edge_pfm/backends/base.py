"""The backend contract: load, input/output specs, infer_outputs(white_light, fluorescence) -> every output by
name (logits, and lesion_map when the bundle has it), infer(...) -> logits, close."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from edge_pfm.bundle import MODEL_ARTIFACTS, Bundle, TensorSpec
from edge_pfm.errors import RuntimeFailure, UnavailableError


class BackendError(RuntimeFailure):
    """A backend cannot load or run; the message says why and what to do."""


class BackendUnavailable(BackendError, UnavailableError):
    """The backend asked for cannot run on this machine (not installed, no GPU, no such precision here)."""

    exit_code = UnavailableError.exit_code


class Backend(ABC):
    """One loaded model. Not thread-safe: one thread calls infer() (TensorRT: the owning thread)."""

    name: str = "?"

    def __init__(self, bundle: Bundle, precision: str):
        self.bundle = bundle
        self.precision = precision
        self.inputs: list[TensorSpec] = bundle.inputs
        self.outputs: list[TensorSpec] = bundle.outputs
        self._names = (bundle.input_names["white_light"], bundle.input_names["fluorescence"])
        self._chw = {s.name: tuple(s.shape[1:]) for s in bundle.inputs}
        self.max_batch = bundle.max_batch
        self.min_batch = 1  # a fixed-shape engine (DLA) runs only its one batch
        self.closed = False
        # set by open_backend: why this backend and precision, the thread plan, the first-use check's verdict
        self.selection_reason = ""
        self.precision_reason = ""
        self.thread_plan = None
        self.check = None

    def check_inputs(self, white_light: np.ndarray, fluorescence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validate shape and dtype against the manifest; -> C-contiguous float32 arrays."""
        if self.closed:
            raise BackendError(f"{self.name} backend is closed")
        out = []
        for name, x in zip(self._names, (white_light, fluorescence)):
            if not isinstance(x, np.ndarray) or x.ndim != 4 or tuple(x.shape[1:]) != self._chw[name]:
                shape = getattr(x, "shape", type(x).__name__)
                raise BackendError(f"input {name!r}: expected (batch, {', '.join(map(str, self._chw[name]))}) "
                                   f"float32, got {shape}; preprocess frames with edge_pfm.preprocess")
            if x.dtype != np.float32:
                raise BackendError(f"input {name!r}: expected float32, got {x.dtype}")
            out.append(np.ascontiguousarray(x))
        if out[0].shape[0] != out[1].shape[0] or out[0].shape[0] < 1:
            raise BackendError(f"both inputs need the same batch >= 1, got {out[0].shape[0]} and {out[1].shape[0]}")
        return out[0], out[1]

    @abstractmethod
    def infer_outputs(self, white_light: np.ndarray, fluorescence: np.ndarray) -> dict[str, np.ndarray]:
        """(B, C, H, W) float32 x2 -> {"logits": (B, num_classes), ["lesion_map": (B, 1, h, w)]} float32."""

    def infer(self, white_light: np.ndarray, fluorescence: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 x2 -> logits (B, num_classes) float32."""
        return self.infer_outputs(white_light, fluorescence)["logits"]

    def identity(self) -> dict:
        """What this engine is, for its check record and every decision-log line: the backend, the precision, each
        bundle artifact it was built from with its sha256, and the engine's own sha256 (a backend that runs the
        ONNX as it is: the ONNX's)."""
        artifact = MODEL_ARTIFACTS[self.precision]
        sha = self.bundle.sha256(artifact)
        return {"backend": self.name, "precision": self.precision, "built_from": {artifact: sha}, "engine_sha256": sha}

    def adopt_thread(self) -> None:
        """The calling thread makes the inferences from now on (a classifier loaded by one thread and handed to the
        inference thread: a bundle update). Backends without per-thread state have nothing to do."""
        return None

    def close(self) -> None:
        self.closed = True

    def describe(self) -> str:
        return f"{self.name} ({self.precision})"

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
