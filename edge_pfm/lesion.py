"""The lesion map: the model's coarse per-cell lesion probability, placed back on the camera frame.

The model sees the white-light frame's centre crop, resized to its input; its lesion_map output (h, w)
covers that input at a stride of 8 px. `LesionMap` keeps the small grid and the crop box in camera
pixels, so a map is cheap to keep, smooth and log; `dense()` gives the full-resolution (H, W) map when
something needs to draw it, and `summary()` the compact facts the decision log keeps.

A map is shown only when it has earned it (`map_verdict`): the bundle names the classes whose decisions show
it (the lesion classes: a biopsy target, never `normal` or `inflammation` by default), and carries a held-out
measurement of the running precision's map that clears the floors below. Anything else runs with the map off.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_pfm.preprocess import PreprocessSpec

DEFAULT_THRESHOLD = 0.5
# a map is shown only if measured on at least this many held-out pairs of those classes with a lesion, with
# the lower 95 % bounds of its Dice and of its pointing score (peak cell in the lesion) at least these
MAP_FLOORS = {"pairs": 50, "dice_low": 0.5, "pointing_low": 0.8}


def parse_map_classes(text: str) -> tuple[str, ...]:
    """--map-classes 'lsil,hsil' -> ('lsil', 'hsil'); '' -> no class."""
    return tuple(c.strip() for c in text.split(",") if c.strip())


def check_map_classes(names: tuple[str, ...], classes: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    unknown = [c for c in names if c not in classes]
    if unknown:
        raise ValueError(f"map classes {unknown} are not among the model's classes {list(classes)}")
    return tuple(names)


def map_measurement(lesion_classes: dict, source: str, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """evaluation.lesion_metrics' `lesion_classes` scores -> the manifest's record of one held-out measurement."""
    record = {"source": source, "classes": list(lesion_classes["classes"]), "threshold": threshold,
              "pairs": int(lesion_classes["dice_interval"]["n"]), "dice": lesion_classes["dice_interval"],
              "pointing": lesion_classes["pointing_interval"]}
    return json.loads(json.dumps(record))  # plain floats (no numpy scalars): checkpoints load with weights_only


@dataclass(frozen=True)
class MapVerdict:
    """Whether a bundle's lesion map is shown at one precision, and why (one line for `edge-pfm info`)."""

    shown: bool
    reason: str
    classes: tuple[str, ...] = ()  # the classes whose decisions show the map; () when it is off
    measurement: dict | None = None

    def describe(self) -> str:
        return f"lesion map: {'shown for ' + ', '.join(self.classes) if self.shown else 'off'}: {self.reason}"


def _legacy_measurement(bundle: Any, precision: str) -> dict | None:
    """Bundles calibrated before the manifest held measurements: calibration's held-out scores in accuracy.json."""
    if not bundle.has("accuracy.json"):
        return None
    report = json.loads((bundle.root / "accuracy.json").read_text())
    lesion = report.get("lesion_map") or {}
    scores = lesion.get("scores", {}).get(precision)
    if not scores:
        return None
    return map_measurement(scores["lesion_classes"], f"calibration held-out ({report['eval']['source']})",
                           lesion.get("threshold", DEFAULT_THRESHOLD))


def map_verdict(bundle: Any, precision: str) -> MapVerdict:
    """Is `bundle`'s (edge_pfm.bundle.Bundle) lesion map shown when its `precision` model runs?"""
    entry = bundle.lesion_map
    legacy = _legacy_measurement(bundle, precision) if entry is not None and "measurements" not in entry else None
    return judge_map(entry, bundle.roles.lesion, precision, legacy)


def judge_map(entry: dict | None, lesion_classes: tuple[str, ...], precision: str,
              fallback: dict | None = None) -> MapVerdict:
    """The verdict on a manifest's lesion_map entry (`lesion_classes`: the model's lesion role, the default
    shown_for; `fallback`: a measurement found outside the entry)."""
    if entry is None:
        return MapVerdict(False, "the model has no lesion-map head (it was trained without lesion masks)")
    shown_for = tuple(entry.get("shown_for", lesion_classes))
    if not shown_for:
        return MapVerdict(False, "no class is named to show it (manifest outputs.lesion_map.shown_for is empty); "
                                 "name them with python -m calibration --map-classes A,B")
    m = entry.get("measurements", {}).get(precision, fallback)
    if m is None:
        return MapVerdict(False, f"the bundle carries no held-out measurement of its {precision} map; measure it with "
                                 "python -m calibration on a held-out set with lesion masks")
    if sorted(m["classes"]) != sorted(shown_for):
        return MapVerdict(False, f"it was measured on {', '.join(m['classes']) or 'no class'} but would be shown for "
                                 f"{', '.join(shown_for)}; re-measure with python -m calibration --map-classes "
                                 f"{','.join(shown_for)}", measurement=m)
    d, p, f = m["dice"], m["pointing"], MAP_FLOORS
    figures = (f"{precision} map on {m['pairs']} held-out lesion pairs ({m['source']}): Dice {d['mean']:.3f} "
               f"[{d['low']:.3f}, {d['high']:.3f}], pointing {p['rate']:.1%} [{p['low']:.1%}, {p['high']:.1%}]")
    below = [what for what, bad in (
        (f"fewer than {f['pairs']} pairs", m["pairs"] < f["pairs"]),
        (f"Dice lower bound under {f['dice_low']}", not d["low"] >= f["dice_low"]),  # NaN fails too
        (f"pointing lower bound under {f['pointing_low']:.0%}", not p["low"] >= f["pointing_low"])) if bad]
    if below:
        return MapVerdict(False, f"below the floors ({'; '.join(below)}): {figures}", measurement=m)
    return MapVerdict(True, figures, shown_for, m)


@dataclass(frozen=True)
class LesionMap:
    probs: np.ndarray  # (h, w) float32 in [0, 1], the model's grid
    box: tuple[int, int, int, int]  # (y0, y1, x0, x1): the grid's extent in camera-frame pixels
    frame_shape: tuple[int, int]  # (H, W) of the camera frame
    threshold: float = DEFAULT_THRESHOLD

    @classmethod
    def from_output(cls, grid: np.ndarray, frame_shape: tuple[int, ...], spec: PreprocessSpec,
                    threshold: float = DEFAULT_THRESHOLD) -> LesionMap:
        """The model's (1, h, w) or (h, w) output for one pair, placed on a frame of `frame_shape`
        (through the same crop the preprocessing took)."""
        h, w = int(frame_shape[0]), int(frame_shape[1])
        box = spec.field_of_view(h, w)
        grid = np.asarray(grid, np.float32).reshape(grid.shape[-2:])
        return cls(grid, box, (h, w), threshold)

    def with_probs(self, probs: np.ndarray) -> LesionMap:
        return LesionMap(np.asarray(probs, np.float32), self.box, self.frame_shape, self.threshold)

    def scaled(self, factor: float) -> LesionMap:
        """The same map on the frame resized by `factor` (for drawing on a display-sized canvas)."""
        y0, y1, x0, x1 = self.box
        box = (round(y0 * factor), round(y1 * factor), round(x0 * factor), round(x1 * factor))
        shape = (round(self.frame_shape[0] * factor), round(self.frame_shape[1] * factor))
        return LesionMap(self.probs, box, shape, self.threshold)

    def dense(self) -> np.ndarray:
        """(H, W) float32 probabilities in camera-frame coordinates; 0 outside the crop (never seen)."""
        import cv2

        y0, y1, x0, x1 = self.box
        out = np.zeros(self.frame_shape, np.float32)
        out[y0:y1, x0:x1] = cv2.resize(self.probs, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        return out

    def cell_to_frame(self, row: float, col: float) -> tuple[float, float]:
        """Grid coordinates (cell centres at i + 0.5) -> camera-frame (x, y) pixels."""
        y0, y1, x0, x1 = self.box
        gh, gw = self.probs.shape
        return x0 + col * (x1 - x0) / gw, y0 + row * (y1 - y0) / gh

    def summary(self) -> dict:
        """What the log keeps per decision: area fraction of the seen field above threshold, bounding box
        [x0, y0, x1, y1] and probability-weighted centroid [x, y] of those cells in camera pixels, and the
        peak probability with its position. Box and centroid are None when no cell passes the threshold."""
        p = self.probs
        hot = p >= self.threshold
        peak_idx = np.unravel_index(int(np.argmax(p)), p.shape)
        px, py = self.cell_to_frame(peak_idx[0] + 0.5, peak_idx[1] + 0.5)
        out = {"area_fraction": round(float(hot.mean()), 4), "peak": round(float(p[peak_idx]), 4),
               "peak_xy": [round(px, 1), round(py, 1)], "bbox": None, "centroid": None,
               "threshold": self.threshold, "grid": list(p.shape)}
        if hot.any():
            rows, cols = np.nonzero(hot)
            bx0, by0 = self.cell_to_frame(rows.min(), cols.min())
            bx1, by1 = self.cell_to_frame(rows.max() + 1, cols.max() + 1)
            weights = p[rows, cols]
            cx, cy = self.cell_to_frame(float(np.average(rows + 0.5, weights=weights)),
                                        float(np.average(cols + 0.5, weights=weights)))
            out["bbox"] = [round(bx0, 1), round(by0, 1), round(bx1, 1), round(by1, 1)]
            out["centroid"] = [round(cx, 1), round(cy, 1)]
        return out


def draw_lesion_map(canvas: np.ndarray, lesion: LesionMap) -> np.ndarray:
    """Draw the map on a BGR canvas showing the white-light frame (at any size: the map is scaled to it): a
    translucent heat tint where p >= threshold, and its contour. In place; -> canvas."""
    import cv2

    dense = lesion.scaled(canvas.shape[0] / lesion.frame_shape[0]).dense()[: canvas.shape[0], : canvas.shape[1]]
    hot = (dense >= lesion.threshold).astype(np.uint8)
    if not hot.any():
        return canvas
    heat = cv2.applyColorMap(np.clip(dense * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    blend = cv2.addWeighted(canvas, 0.55, heat, 0.45, 0)
    np.copyto(canvas, blend, where=hot[..., None].astype(bool))
    contours, _ = cv2.findContours(hot, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, (0, 255, 255), 2)
    return canvas
