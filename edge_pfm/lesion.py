"""The lesion map: the model's coarse per-cell lesion probability, placed back on the camera frame.

The model sees the white-light frame's centre crop, resized to its input; its lesion_map output (h, w)
covers that input at a stride of 8 px. `LesionMap` keeps the small grid and the crop box in camera
pixels, so a map is cheap to keep, smooth and log; `dense()` gives the full-resolution (H, W) map when
something needs to draw it, and `summary()` the compact facts the decision log keeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_pfm.preprocess import PreprocessSpec

DEFAULT_THRESHOLD = 0.5


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
