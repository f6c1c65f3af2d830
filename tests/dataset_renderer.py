"""A small renderer of paired colposcopy-like images with lesion masks and patients, for the tests only: it is not
edge_pfm.synthetic, so the dataset path is tested on images our own generator did not draw. Each patient has a
few visits of one class; lesions are bright (white light: acetowhite) and dark (fluorescence: lost
autofluorescence) ellipses, and the mask is their outline."""
from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("normal", "inflammation", "lsil", "hsil")
SIZES = ((640, 360), (1280, 720))


def render(label: str, rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (white BGR, fluorescence BGR, mask uint8 0/255) of one visit."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy, r = w / 2 + rng.uniform(-0.05, 0.05) * w, h / 2 + rng.uniform(-0.05, 0.05) * h, 0.42 * h
    cervix = ((xx - cx) ** 2 + (yy - cy) ** 2) < r ** 2
    white = np.zeros((h, w, 3), np.float32)
    white[:] = (40, 40, 70)
    white[cervix] = (120 + rng.uniform(-10, 10), 110, 200)  # BGR pink tissue
    fluo = np.zeros((h, w, 3), np.float32)
    fluo[cervix] = (60, 170 + rng.uniform(-10, 10), 60)  # green autofluorescence
    mask = np.zeros((h, w), np.uint8)
    if label == "inflammation":  # red speckle, no lesion
        for _ in range(40):
            x, y = rng.uniform(cx - r * 0.7, cx + r * 0.7), rng.uniform(cy - r * 0.7, cy + r * 0.7)
            cv2.circle(white, (int(x), int(y)), int(0.02 * h), (40, 40, 230), -1)
    if label in ("lsil", "hsil"):
        scale = 0.12 if label == "lsil" else 0.22
        ax, ay = scale * h * rng.uniform(0.8, 1.2), scale * h * rng.uniform(0.6, 1.0)
        x, y = cx + rng.uniform(-0.3, 0.3) * r, cy + rng.uniform(-0.3, 0.3) * r
        cv2.ellipse(mask, (int(x), int(y)), (int(ax), int(ay)), float(rng.uniform(0, 180)), 0, 360, 255, -1)
        lesion = mask > 0
        white[lesion] = (230, 230, 235) if label == "hsil" else (190, 180, 215)
        fluo[lesion] = (40, 60, 40) if label == "hsil" else (55, 120, 55)
    noise = rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    white = np.clip(cv2.GaussianBlur(white, (0, 0), 2) + noise, 0, 255).astype(np.uint8)
    fluo = np.clip(cv2.GaussianBlur(fluo, (0, 0), 2) + noise, 0, 255).astype(np.uint8)
    return white, fluo, mask


def write_patients(root: str | Path, patients: int, visits: int = 3, seed: int = 0, split_column: dict | None = None,
                   masks: bool = True) -> Path:
    """A paired dataset with masks/ and a group column: `patients` patients of `visits` visits each, classes
    cycled over patients. split_column, if given, maps a patient index to train/val/test."""
    root = Path(root)
    for d in ("white", "fluorescence", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        label = CLASSES[p % len(CLASSES)]
        size = SIZES[p % 2]
        for v in range(visits):
            name = f"p{p:03d}_v{v}"
            white, fluo, mask = render(label, rng, size)
            cv2.imwrite(str(root / "white" / f"{name}.png"), white)
            cv2.imwrite(str(root / "fluorescence" / f"{name}.png"), fluo)
            if masks and mask.any():
                cv2.imwrite(str(root / "masks" / f"{name}.png"), mask)
            row = {"sample": name, "label": label, "group": f"patient{p:03d}"}
            if split_column is not None:
                row["split"] = split_column[p]
            rows.append(row)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root
