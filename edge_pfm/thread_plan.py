"""How many threads inference gets, and how many capture, pairing and preprocessing get.

The pipeline runs a reader thread per camera (each also preprocesses its frames as they arrive, so both
frames of a pair are preprocessed at once, on their own cores), one pairing thread and one inference thread. ONNX Runtime on the CPU wants
every core, and left alone it takes them all: capture and preprocessing then fight inference and the
pipeline loses to a naive loop. TensorRT needs almost no CPU: one host thread enqueues the GPU.

Plan (cores = os.cpu_count()):
- tensorrt: inference 1; OpenCV max(1, cores - 2) for preprocessing;
- onnxruntime: capture/pairing/preprocessing keep one core on <= 4 cores and two above; inference takes
  the rest; OpenCV 1 thread (each frame is preprocessed by its own thread already).
A flag (`--threads`) or the config (`[run] threads`) overrides the inference count.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadPlan:
    cores: int
    backend: str
    inference: int  # ONNX Runtime intra-op threads (TensorRT: the one host thread)
    opencv: int  # cv2.setNumThreads for preprocessing
    overridden: bool = False

    def describe(self) -> str:
        how = "set by --threads/config" if self.overridden else "default plan"
        return (f"threads: {self.cores} cores -> inference {self.inference} ({self.backend}), OpenCV {self.opencv}, "
                f"plus capture/pairing/preprocessing threads ({how})")

    def to_dict(self) -> dict:
        return {"cores": self.cores, "backend": self.backend, "inference": self.inference, "opencv": self.opencv,
                "overridden": self.overridden}


def plan_threads(backend: str, cores: int | None = None, inference: int | None = None) -> ThreadPlan:
    cores = max(1, cores or os.cpu_count() or 1)
    if backend == "tensorrt":
        return ThreadPlan(cores, backend, inference or 1, max(1, cores - 2), inference is not None)
    reserved = 1 if cores <= 4 else 2
    return ThreadPlan(cores, backend, inference or max(1, cores - reserved), 1, inference is not None)


def apply_opencv_threads(plan: ThreadPlan) -> None:
    import cv2

    cv2.setNumThreads(plan.opencv)
