"""Quality gates per modality: blur (variance of the Laplacian), exposure (clipped fraction), glare
(specular fraction). A gated frame does not update the decision. Thresholds come from config."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class GateThresholds:
    # variance of the Laplacian of the smoothed central region at 128..256 px: calibrate per camera and modality
    # (record `edge-pfm run` logs on sharp and defocused scenes; the log carries the measured values)
    blur_min: float = 2.45
    clipped_max: float = 0.15  # fraction of central pixels at >= 250 (over-exposure)
    dark_mean_min: float = 12.0  # mean grey level of the central region (under-exposure / lens cap)
    glare_max: float = 0.04  # fraction of central pixels that are specular (bright and unsaturated)


@dataclass(frozen=True)
class GateConfig:
    enabled: bool = True
    white_light: GateThresholds = field(default_factory=GateThresholds)
    fluorescence: GateThresholds = field(default_factory=lambda: GateThresholds(blur_min=1.6, glare_max=1.0))

    @classmethod
    def from_dict(cls, d: dict) -> GateConfig:
        def thr(m: str, base: GateThresholds) -> GateThresholds:
            return GateThresholds(**{**base.__dict__, **d.get(m, {})})

        defaults = cls()
        unknown = set(d) - {"enabled", "white_light", "fluorescence"}
        if unknown:
            raise ValueError(f"unknown [gates] keys {sorted(unknown)}")
        return cls(d.get("enabled", True), thr("white_light", defaults.white_light),
                   thr("fluorescence", defaults.fluorescence))


def measure(frame: np.ndarray) -> dict[str, float]:
    """Blur, clipping, darkness and glare of the central 3/4 of the image (where the cervix is).

    The runtime passes the box-averaged crop that preprocessing resized from (see
    edge_pfm.preprocess.preprocess_keep_intermediate): blur values depend on that resolution,
    so calibrate thresholds per camera and model input size.
    """
    import cv2

    h, w = frame.shape[:2]
    small = frame[h // 8:h - h // 8, w // 8:w - w // 8]
    grey = small if small.ndim == 2 else cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    # smooth pixel noise first: on noisy (fluorescence) frames it swamps the Laplacian's response to focus
    lap = cv2.Laplacian(cv2.GaussianBlur(grey, (0, 0), 1.5), cv2.CV_32F)
    out = {"blur": float(lap.var()), "clipped": float((grey >= 250).mean()), "mean": float(grey.mean())}
    if small.ndim == 3:
        hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
        out["glare"] = float(((hsv[..., 2] >= 235) & (hsv[..., 1] <= 40)).mean())
    else:
        out["glare"] = float((grey >= 250).mean())
    return out


def assess(frame: np.ndarray, thresholds: GateThresholds) -> tuple[list[str], dict[str, float]]:
    """-> (flags, metrics); no flags means the frame may update the decision."""
    m = measure(frame)
    flags = []
    if m["blur"] < thresholds.blur_min:
        flags.append("blur")
    if m["clipped"] > thresholds.clipped_max:
        flags.append("overexposed")
    if m["mean"] < thresholds.dark_mean_min:
        flags.append("underexposed")
    if m["glare"] > thresholds.glare_max:
        flags.append("glare")
    return flags, m
