"""How good is the lesion map: Dice and IoU of the thresholded map against the true lesion mask, per class,
a pointing score (the map's peak lies in the lesion), and how closely a reduced-precision map follows FP32.

Every figure comes with its sample size and a 95 % interval: Wilson for proportions (evaluation.stats),
a normal interval on the per-pair mean for Dice and IoU.

Conventions (per pair, on the model's grid):
- prediction: cells with p >= threshold; truth: cells whose lesion share is >= 0.5;
- Dice/IoU of two empty sets is 1 (a `normal` pair with a clean map is right);
- pointing: the highest-probability cell's lesion share is >= 0.5 (pairs with a lesion only);
- pairs of the no-lesion class (`normal`) also give the mean predicted area (false alarm) and the share with a
  clean map.
"""
from __future__ import annotations

import numpy as np

from edge_pfm.roles import ClassRoles
from evaluation.stats import wilson


def lesion_target(mask: np.ndarray, spec, stride: int = 8) -> np.ndarray:
    """A frame's lesion mask (H, W) -> the lesion map's target (1, h, w): the crop the white-light
    preprocessing takes, then the lesion's share of each cell (INTER_AREA)."""
    import cv2

    h, w = spec.size[0] // stride, spec.size[1] // stride
    m = np.asarray(mask, np.float32)
    y0, y1, x0, x1 = spec.field_of_view(*m.shape)
    m = m[y0:y1, x0:x1]
    return cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA)[None]


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair Dice and IoU of boolean (N, ...) masks."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    inter = (a & b).sum(1)
    sa, sb, union = a.sum(1), b.sum(1), (a | b).sum(1)
    empty = union == 0
    dice = np.where(empty, 1.0, 2 * inter / np.maximum(sa + sb, 1))
    iou = np.where(empty, 1.0, inter / np.maximum(union, 1))
    return dice, iou


def mean_interval(x: np.ndarray) -> dict:
    """Mean with a 95 % normal interval (n >= 30 in practice), clipped to [0, 1]."""
    x = np.asarray(x, np.float64)
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    m = float(x.mean())
    half = 1.96 * float(x.std(ddof=1)) / np.sqrt(n) if n > 1 else float("nan")
    return {"mean": round(m, 4), "low": round(max(0.0, m - half), 4), "high": round(min(1.0, m + half), 4), "n": n}


def proportion(k: int, n: int) -> dict:
    low, high = wilson(k, n)
    return {"rate": round(k / n, 4) if n else float("nan"), "low": round(low, 4), "high": round(high, 4),
            "k": int(k), "n": int(n)}


def lesion_scores(maps: np.ndarray, targets: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
                  threshold: float = 0.5, map_classes: tuple[str, ...] | None = None,
                  roles: ClassRoles | None = None) -> dict:
    """maps: (N, 1, h, w) probabilities; targets: (N, 1, h, w) lesion share per cell; labels: (N,) class index.
    -> {class: {dice, iou, pointing | false_alarm_area, clean}, "lesion_classes": {...}}: the last over the pairs
    with a lesion of `map_classes` (default: the lesion role), the ones that show the map. The no-lesion class
    (roles, default ours by name) gets the false-alarm figures instead of pointing."""
    roles = roles or ClassRoles.default_for(classes)
    map_classes = roles.lesion if map_classes is None else tuple(map_classes)
    pred, truth = maps >= threshold, targets >= 0.5
    dice, iou = _overlap(pred, truth)
    flat_p, flat_t = maps.reshape(len(maps), -1), targets.reshape(len(targets), -1)
    pointed = flat_t[np.arange(len(maps)), flat_p.argmax(1)] >= 0.5
    has_lesion = truth.reshape(len(truth), -1).any(1)
    out: dict = {}
    for i, c in enumerate(classes):
        sel = labels == i
        row = {"dice": mean_interval(dice[sel]), "iou": mean_interval(iou[sel])}
        if c == roles.no_lesion:
            area = pred[sel].reshape(int(sel.sum()), -1).mean(1) if sel.any() else np.zeros(0)
            row["false_alarm_area"] = mean_interval(area)
            row["clean"] = proportion(int((area == 0).sum()), int(sel.sum()))
        else:
            s = sel & has_lesion
            row["pointing"] = proportion(int(pointed[s].sum()), int(s.sum()))
        out[c] = row
    sel = np.isin(labels, [classes.index(c) for c in map_classes]) & has_lesion
    out["lesion_classes"] = {"classes": list(map_classes),
                             "dice": mean_interval(dice[sel])["mean"], "dice_interval": mean_interval(dice[sel]),
                             "iou_interval": mean_interval(iou[sel]),
                             "pointing": proportion(int(pointed[sel].sum()), int(sel.sum()))["rate"],
                             "pointing_interval": proportion(int(pointed[sel].sum()), int(sel.sum()))}
    return out


def map_agreement(reference: np.ndarray, other: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
                  threshold: float = 0.5, map_classes: tuple[str, ...] | None = None) -> dict:
    """IoU of a reduced-precision map with the FP32 map (both thresholded), per pair: over all pairs and over
    the map classes; plus the largest probability difference."""
    map_classes = ClassRoles.default_for(classes).lesion if map_classes is None else tuple(map_classes)
    _, iou = _overlap(reference >= threshold, other >= threshold)
    sel = np.isin(labels, [classes.index(c) for c in map_classes])
    return {"iou_all": mean_interval(iou), "iou_lesion_classes": mean_interval(iou[sel]),
            "max_abs_diff": round(float(np.abs(reference - other).max()), 5)}
