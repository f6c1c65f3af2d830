"""The two-line API:

    clf = edge_pfm.Classifier("bundle/")
    result = clf.classify(white_bgr, fluo_bgr)    # Result(label='hsil', confidence=0.93, lesion_map=..., ...)

With a bundle whose lesion map is shown (`clf.lesion_verdict`, edge_pfm.lesion.map_verdict: a measured head, at
the running precision) and a label among its map classes, result.lesion_map is a LesionMap placed on the
white-light frame (.dense() -> (H, W) probabilities, .summary() -> area, box, centroid, peak); else None.

Preprocessing is the bundle's (edge_pfm.preprocess); the backend is chosen as `edge-pfm info` says.
With the TensorRT backend, create and call the Classifier from one thread.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_pfm.backends import Backend, BackendError, open_backend
from edge_pfm.bundle import Bundle
from edge_pfm.decision import softmax
from edge_pfm.lesion import LesionMap, map_verdict
from edge_pfm.preprocess import preprocess
from edge_pfm.trust import Trust


@dataclass
class Result:
    label: str
    index: int
    confidence: float
    probs: dict[str, float]
    logits: np.ndarray
    lesion_map: LesionMap | None = None  # in camera-frame coordinates (the crop undone); None unless shown
    prob_vector: np.ndarray | None = None  # probs in class order (float64), for smoothing


class NonFiniteOutput(BackendError):
    """The engine returned NaN or Inf: the output is refused, never shown."""


class Classifier:
    def __init__(self, bundle: str | os.PathLike | Bundle, backend: str = "auto", precision: str | None = None,
                 threads: int | None = None, cache_dir: str | Path | None = None, trust: Trust | None = None):
        """`trust`: the keys and state directory a bundle path is loaded under (default: the device config's, as
        every command finds it; edge_pfm.trust.Trust)."""
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle, trust=trust)
        self.backend: Backend = open_backend(self.bundle, backend, precision, cache_dir=cache_dir, threads=threads)
        self.classes = self.bundle.classes
        self.specs = self.bundle.preprocessing
        identity = self.backend.identity()
        # which engine makes every decision: the artifacts it was built from and its own sha256
        self.engine_identity = {"built_from": identity["built_from"], "engine_sha256": identity["engine_sha256"]}
        self.model_sha256 = next(iter(identity["built_from"].values()), "")
        self.lesion_verdict = map_verdict(self.bundle, self.backend.precision)

    def preprocess(self, white_bgr: np.ndarray, fluo_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Two camera frames -> (1, C, H, W) float32 inputs, exactly as the manifest says."""
        w = np.empty((1, *self.specs["white_light"].input_shape), np.float32)
        f = np.empty((1, *self.specs["fluorescence"].input_shape), np.float32)
        preprocess(white_bgr, self.specs["white_light"], out=w[0])
        preprocess(fluo_bgr, self.specs["fluorescence"], out=f[0])
        return w, f

    def infer_outputs(self, white_light: np.ndarray, fluorescence: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed inputs (B, C, H, W) -> {"logits": (B, classes), ["lesion_map": (B, 1, h, w)]}.
        Non-finite output is refused (NonFiniteOutput)."""
        out = self.backend.infer_outputs(white_light, fluorescence)
        for name, x in out.items():
            if not np.all(np.isfinite(x)):
                raise NonFiniteOutput(f"{self.backend.describe()} returned non-finite {name} "
                                      f"{x.tolist() if x.size < 16 else ''}".rstrip())
        return out

    def infer(self, white_light: np.ndarray, fluorescence: np.ndarray) -> np.ndarray:
        """Preprocessed inputs (B, C, H, W) -> logits (B, classes). Non-finite output is refused."""
        return self.infer_outputs(white_light, fluorescence)["logits"]

    def classify_outputs(self, out: dict[str, np.ndarray], white_shape: tuple[int, ...],
                         every_map: bool = False) -> Result:
        """The backend's raw outputs for one pair -> its Result; the one place output is validated and the map
        placed. Non-finite logits are refused (NonFiniteOutput); a non-finite map is dropped (no map, the class
        stands). The map is placed on a white-light frame of `white_shape` when the bundle's map is shown and the
        label is a map class, or for every label with `every_map` (the runtime smooths maps over time and shows
        them only for map classes)."""
        logits = out["logits"][0]
        if not np.all(np.isfinite(logits)):
            raise NonFiniteOutput(f"{self.backend.describe()} returned non-finite logits {logits.tolist()}")
        probs = softmax(logits.astype(np.float64))
        i = int(np.argmax(probs))
        lesion = None
        if self.lesion_verdict.shown and (every_map or self.classes[i] in self.lesion_verdict.classes):
            raw = out["lesion_map"][0]
            if np.all(np.isfinite(raw)):
                lesion = LesionMap.from_output(raw, white_shape, self.specs["white_light"])
        return Result(self.classes[i], i, float(probs[i]), dict(zip(self.classes, map(float, probs))), logits, lesion,
                      probs)

    def classify_inputs(self, white_light: np.ndarray, fluorescence: np.ndarray, white_shape: tuple[int, ...],
                        every_map: bool = False) -> Result:
        """One preprocessed pair (1, C, H, W) -> its Result (classify_outputs)."""
        return self.classify_outputs(self.backend.infer_outputs(white_light, fluorescence), white_shape, every_map)

    def classify(self, white_bgr: np.ndarray, fluo_bgr: np.ndarray) -> Result:
        return self.classify_inputs(*self.preprocess(white_bgr, fluo_bgr), white_bgr.shape)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
