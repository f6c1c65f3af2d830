"""The paired dataset layout that the trainer, calibration and evaluation all read.

    DATASET/
      classes.txt           one class name per line, in logit order
      labels.csv            header `sample,label`; label is a class name ("" if unlabelled)
      white/<sample>.png    white-light frame (any size, BGR/grey; .png/.jpg/.bmp/.tif)
      fluorescence/<sample>.png

A sample is a pair only if both files exist; anything else is an error that lists the files.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_pfm.errors import EdgePfmError

WHITE_DIR = "white"
FLUO_DIR = "fluorescence"
LABELS_FILE = "labels.csv"
CLASSES_FILE = "classes.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(EdgePfmError, ValueError):
    """A dataset directory does not follow the paired layout; the message lists the files."""


def _listing(paths: list[str], limit: int = 10) -> str:
    more = f" ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


@dataclass(frozen=True)
class Sample:
    name: str
    white: Path
    fluorescence: Path
    label: int | None


class PairedDataset:
    """Index of a paired dataset directory; images are read on demand."""

    def __init__(self, root: str | Path, classes: tuple[str, ...] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset directory {self.root} does not exist")
        white, fluo = self.root / WHITE_DIR, self.root / FLUO_DIR
        missing = [str(d) for d in (white, fluo) if not d.is_dir()]
        if missing:
            raise DatasetError(
                f"{self.root} is not a paired dataset: missing {_listing(missing)}. Expected "
                f"{WHITE_DIR}/ and {FLUO_DIR}/ with one image per sample and a {LABELS_FILE} (see edge_pfm.dataset)"
            )
        if classes is None and (self.root / CLASSES_FILE).is_file():
            classes = tuple(c.strip() for c in (self.root / CLASSES_FILE).read_text().splitlines() if c.strip())
        self.classes = tuple(classes) if classes else None

        def index(d: Path) -> dict[str, Path]:
            return {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}

        w_files, f_files = index(white), index(fluo)
        unpaired = [str(w_files[s]) for s in sorted(set(w_files) - set(f_files))]
        unpaired += [str(f_files[s]) for s in sorted(set(f_files) - set(w_files))]
        if unpaired:
            raise DatasetError(
                f"{len(unpaired)} unpaired file(s) in {self.root} (each sample needs a {WHITE_DIR}/ and a "
                f"{FLUO_DIR}/ image with the same name): {_listing(unpaired)}"
            )
        labels: dict[str, str] = {}
        labels_path = self.root / LABELS_FILE
        if labels_path.is_file():
            with open(labels_path, newline="") as f:
                for row in csv.DictReader(f):
                    if "sample" not in row or "label" not in row:
                        raise DatasetError(f"{labels_path} needs the header 'sample,label'")
                    labels[row["sample"]] = (row["label"] or "").strip()
        unknown = sorted({v for v in labels.values() if v} - set(self.classes or ()))
        if labels and unknown and self.classes is not None:
            raise DatasetError(f"{labels_path}: labels {unknown} are not in {CLASSES_FILE} {list(self.classes)}")
        if labels and self.classes is None:
            self.classes = tuple(sorted({v for v in labels.values() if v}))
        self.samples = [
            Sample(s, w_files[s], f_files[s],
                   self.classes.index(labels[s]) if labels.get(s) and self.classes else None)
            for s in sorted(w_files)
        ]
        if not self.samples:
            raise DatasetError(f"{self.root} holds no image pairs")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labelled(self) -> bool:
        return all(s.label is not None for s in self.samples)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, int | None]:
        """(white BGR uint8, fluorescence BGR uint8, label index or None) of sample i."""
        import cv2

        s = self.samples[i]
        frames = []
        for p in (s.white, s.fluorescence):
            img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise DatasetError(f"unreadable image {p}: not an image OpenCV can decode; replace or remove it")
            if img.dtype != np.uint8 or (img.ndim == 3 and img.shape[2] not in (1, 3)):
                raise DatasetError(
                    f"{p}: expected 8-bit grey or BGR, got dtype {img.dtype} shape {img.shape}; convert it"
                )
            frames.append(img)
        return frames[0], frames[1], s.label

    def validate_images(self) -> None:
        """Decode every image once; raise one DatasetError listing all the bad files."""
        bad = []
        for i in range(len(self)):
            try:
                self.load(i)
            except DatasetError as exc:
                bad.append(str(exc))
        if bad:
            raise DatasetError(f"{len(bad)} bad image file(s) in {self.root}:\n  " + "\n  ".join(bad))

    def content_hash(self) -> str:
        """sha256 over the sample names, labels and file bytes: identifies the data exactly."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(f"{s.name}:{s.label}\n".encode())
            for p in (s.white, s.fluorescence):
                h.update(p.read_bytes())
        return h.hexdigest()
