"""TensorRT backend with pycuda: page-locked host buffers and device buffers allocated once, one stream,
async copies, set_input_shape + set_tensor_address + execute_async_v3.

pycuda contexts are per thread: the backend retains the device's primary context and pushes/pops
it around every call, and only the thread that created the backend may call infer() (create it in
the inference thread). One execution context per backend.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np

from edge_pfm._lazy import require
from edge_pfm.backends.base import Backend, BackendError
from edge_pfm.bundle import Bundle
from edge_pfm.engine.trt_build import trt_version


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, bundle: Bundle, engine_path: str | Path, precision: str, sealed_sha256: str | None,
                 device: int = 0):
        """`sealed_sha256`: what the engine's sealed sidecar vouches for (engine.cache.sealed_engine_sha256); other
        bytes, or none vouched for, are never deserialised (TensorRT engines are executable)."""
        super().__init__(bundle, precision)
        trt = require("tensorrt", "the tensorrt backend")
        cuda = require("pycuda.driver", "the tensorrt backend (device buffers)")
        self._trt, self._cuda = trt, cuda
        cuda.init()
        self._ctx = cuda.Device(device).retain_primary_context()
        self._owner = threading.get_ident()
        self.engine_path = Path(engine_path)
        self._ctx.push()
        try:
            self._load(Path(engine_path), sealed_sha256)
        finally:
            self._ctx.pop()

    def _load(self, engine_path: Path, sealed_sha256: str | None) -> None:
        trt, cuda = self._trt, self._cuda
        blob = engine_path.read_bytes()
        self.engine_sha256 = hashlib.sha256(blob).hexdigest()  # the bytes that run, for the check and the log
        if sealed_sha256 is None or self.engine_sha256 != sealed_sha256:
            raise BackendError(f"{engine_path} is not the engine this device sealed (sha256 {self.engine_sha256[:12]}"
                               f" != {str(sealed_sha256)[:12]}): it changed after its seal was checked; not loaded. "
                               "Run again: an engine that does not match its seal is rebuilt")
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise BackendError(f"TensorRT {trt_version(trt)} could not deserialise {engine_path}: built by another "
                               "TensorRT version or for another GPU; delete it and run `edge-pfm build`")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want_in, want_out = {s.name for s in self.inputs}, [s.name for s in self.outputs]
        if set(inputs) != want_in or outputs != want_out:
            raise BackendError(f"{engine_path}: engine I/O {inputs} -> {outputs} does not match the manifest "
                               f"{sorted(want_in)} -> {want_out}; rebuild it from this bundle")
        for n in names:
            if engine.get_tensor_dtype(n) != trt.float32:  # trt.float32 is DataType.FLOAT
                raise BackendError(f"{engine_path}: tensor {n!r} is {engine.get_tensor_dtype(n)}, expected float32")
            if n in inputs and tuple(engine.get_tensor_shape(n))[1:] != self._chw[n]:
                raise BackendError(f"{engine_path}: input {n!r} has shape {tuple(engine.get_tensor_shape(n))}, "
                                   f"the manifest says (batch, {self._chw[n]})")
        profile = engine.get_tensor_profile_shape(inputs[0], 0)  # (min, opt, max) shapes
        self.min_batch, self.max_batch = int(profile[0][0]), int(profile[2][0])
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = cuda.Stream()
        self._host, self._device = {}, {}
        out_shapes = {o.name: (self.max_batch, *o.shape[1:]) for o in self.outputs}
        for n in names:
            shape = (self.max_batch, *self._chw[n]) if n in inputs else out_shapes[n]
            self._host[n] = cuda.pagelocked_empty(shape, np.float32)
            self._device[n] = cuda.mem_alloc(self._host[n].nbytes)
            self._context.set_tensor_address(n, int(self._device[n]))
        self._inputs, self._outputs = inputs, outputs

    def infer_outputs(self, white_light: np.ndarray, fluorescence: np.ndarray) -> dict[str, np.ndarray]:
        w, f = self.check_inputs(white_light, fluorescence)
        if threading.get_ident() != self._owner:
            raise BackendError("the tensorrt backend must be called from the thread that created it "
                               "(pycuda contexts are per thread)")
        b = w.shape[0]
        if b > self.max_batch:
            raise BackendError(f"batch {b} exceeds the engine's profile (max {self.max_batch}); rebuild with --max-batch")
        cuda = self._cuda
        self._ctx.push()
        try:
            for name, x in zip(self._names, (w, f)):
                np.copyto(self._host[name][:b], x)
                cuda.memcpy_htod_async(self._device[name], self._host[name][:b], self._stream)
                self._context.set_input_shape(name, x.shape)
            if not self._context.execute_async_v3(self._stream.handle):
                raise BackendError("TensorRT execute_async_v3 failed")
            for name in self._outputs:
                cuda.memcpy_dtoh_async(self._host[name][:b], self._device[name], self._stream)
            self._stream.synchronize()
            return {name: self._host[name][:b].copy() for name in self._outputs}
        finally:
            self._ctx.pop()

    def identity(self) -> dict:
        from edge_pfm.engine.cache import SidecarRecord

        side = SidecarRecord(self.engine_path, self.engine_sha256).sidecar()
        key = side.get("key", {})
        return {"backend": self.name, "precision": self.precision, "built_from": side.get("built_from", {}),
                "engine_sha256": self.engine_sha256, "version": trt_version(self._trt),
                "flavour": str(self._trt.__name__).split(".")[0],
                "device": f"{key.get('gpu_name')} sm{key.get('compute_capability')}"
                          + (f" DLA{key['dla_core']}" if key.get("dla_core", -1) >= 0 else ""),
                "engine": self.engine_path.name}

    def describe(self) -> str:
        return f"tensorrt {trt_version(self._trt)} {self.precision}"

    def adopt_thread(self) -> None:
        """Inferences come from the calling thread from now on: each call pushes the retained primary context, so
        only the owner check changes (a classifier loaded by serve's update thread, run by the inference thread)."""
        self._owner = threading.get_ident()

    def close(self) -> None:
        if not self.closed:
            self._ctx.push()
            try:
                for mem in self._device.values():
                    mem.free()
                self._context = self._engine = None
            finally:
                self._ctx.pop()
                self._ctx.detach()
        super().close()
