"""The paired dataset layout that the trainer, calibration and evaluation all read (torch-free: the device will
write it too).

    DATASET/
      classes.txt           one class name per line, in logit order (required when there are labels)
      labels.csv            header `sample,label[,group][,split]`; label is a class name ("" if unlabelled);
                            group: patient or visit id (never split across sets; all rows or none);
                            split: train | val | test, used as given (all rows or none)
      white/<sample>.png    white-light frame (any size, BGR/grey; .png/.jpg/.bmp/.tif)
      fluorescence/<sample>.png
      masks/<sample>.png    optional lesion mask: 8-bit, 0 = background, > 0 = lesion, the white-light frame's
                            size; lossless only (.png/.bmp/.tif: a JPEG's ringing makes lesion pixels up)

A sample is a pair only if both frames exist. Every path is checked when the dataset is opened, and one error
lists every problem: unpaired files, masks without a sample, JPEG or wrongly sized masks, unknown labels, labels
without classes.txt, a partly empty group or split column. (A class missing from a given split is refused by
export.splits, which makes the three sets.) An image that cannot be decoded is named when it is read.
"""
from __future__ import annotations

import csv
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_pfm.errors import EdgePfmError

WHITE_DIR = "white"
FLUO_DIR = "fluorescence"
MASK_DIR = "masks"
LABELS_FILE = "labels.csv"
CLASSES_FILE = "classes.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


class DatasetError(EdgePfmError, ValueError):
    """A dataset directory does not follow the paired layout; the message lists the files."""


def _listing(paths: list[str], limit: int = 10) -> str:
    more = f" ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from a PNG or BMP header without decoding it; None for other formats."""
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        w, h = struct.unpack(">II", head[16:24])
        return h, w
    if head[:2] == b"BM" and len(head) >= 26:
        w, h = struct.unpack("<ii", head[18:26])
        return abs(h), w
    return None


def png_kind(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG header (colour type 0 = greyscale); None for other formats."""
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 26:
        return head[24], head[25]
    return None


def frame_size(path: Path) -> tuple[int, int]:
    size = image_size(path)
    if size is None:
        import cv2

        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise DatasetError(f"unreadable image {path}: not an image OpenCV can decode; replace or remove it")
        size = img.shape[:2]
    return size


@dataclass(frozen=True)
class Sample:
    name: str
    white: Path
    fluorescence: Path
    label: int | None
    mask: Path | None = None
    group: str | None = None
    split: str | None = None


class PairedDataset:
    """Index of a paired dataset directory, checked up front; images are read on demand."""

    def __init__(self, root: str | Path, classes: tuple[str, ...] | None = None, check_mask_sizes: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset directory {self.root} does not exist")
        white, fluo, masks = self.root / WHITE_DIR, self.root / FLUO_DIR, self.root / MASK_DIR
        missing = [str(d) for d in (white, fluo) if not d.is_dir()]
        if missing:
            raise DatasetError(
                f"{self.root} is not a paired dataset: missing {_listing(missing)}. Expected "
                f"{WHITE_DIR}/ and {FLUO_DIR}/ with one image per sample and a {LABELS_FILE} (see edge_pfm.dataset)"
            )
        classes_path, labels_path = self.root / CLASSES_FILE, self.root / LABELS_FILE
        if classes is None and classes_path.is_file():
            classes = tuple(c.strip() for c in classes_path.read_text().splitlines() if c.strip())
        self.classes = tuple(classes) if classes else None
        problems: list[str] = []

        def index(d: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> dict[str, Path]:
            return {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in suffixes} if d.is_dir() else {}

        w_files, f_files = index(white), index(fluo)
        unpaired = [str(w_files[s]) for s in sorted(set(w_files) - set(f_files))]
        unpaired += [str(f_files[s]) for s in sorted(set(f_files) - set(w_files))]
        if unpaired:
            problems.append(f"{len(unpaired)} unpaired file(s) (each sample needs a {WHITE_DIR}/ and a {FLUO_DIR}/ "
                            f"image with the same name): {_listing(unpaired)}")
        m_files = index(masks, IMAGE_SUFFIXES)
        jpeg = [str(p) for p in m_files.values() if p.suffix.lower() not in MASK_SUFFIXES]
        if jpeg:
            problems.append(f"{len(jpeg)} lossy mask(s) (JPEG ringing invents lesion pixels; save masks as PNG): "
                            f"{_listing(jpeg)}")
        orphans = [str(m_files[s]) for s in sorted(set(m_files) - (set(w_files) & set(f_files)))]
        if orphans:
            problems.append(f"{len(orphans)} mask(s) without a sample pair: {_listing(orphans)}")
        rows, columns = self._read_labels(labels_path, problems)
        labelled = {s: r["label"] for s, r in rows.items() if r["label"]}
        if labelled and self.classes is None:
            problems.append(f"{labels_path} has labels but there is no {classes_path}: write the class names there, "
                            "one per line, in the model's logit order")
        elif labelled:
            unknown = sorted(s for s, label in labelled.items() if label not in self.classes)
            if unknown:
                problems.append(f"{len(unknown)} label(s) in {labels_path} not in {CLASSES_FILE} "
                                f"{list(self.classes)}: " + _listing([f"{s}={labelled[s]!r}" for s in unknown]))
        without_images = sorted(set(rows) - set(w_files) - set(f_files))  # (unpaired ones are reported above)
        if without_images:
            problems.append(f"{len(without_images)} sample(s) in {labels_path} have no images: "
                            f"{_listing(without_images)}")
        for column in ("group", "split"):
            if column in columns:
                empty = sorted(s for s, r in rows.items() if not r.get(column))
                if empty:
                    problems.append(f"{labels_path}: the {column} column is empty for {len(empty)} of {len(rows)} "
                                    f"sample(s) (fill it for all or drop the column): {_listing(empty)}")
        if "split" in columns:
            bad = sorted(s for s, r in rows.items() if r.get("split") and r["split"] not in SPLITS)
            if bad:
                problems.append(f"{labels_path}: split must be one of {list(SPLITS)}: "
                                + _listing([f"{s}={rows[s]['split']!r}" for s in bad]))
        names = sorted(set(w_files) & set(f_files))
        if check_mask_sizes:
            for s in names:
                if s in m_files and m_files[s].suffix.lower() in MASK_SUFFIXES:
                    try:
                        ms, ws = frame_size(m_files[s]), frame_size(w_files[s])
                    except DatasetError as exc:
                        problems.append(str(exc))
                        continue
                    kind = png_kind(m_files[s])
                    if kind is not None and kind != (8, 0):
                        problems.append(f"{m_files[s]}: a mask is an 8-bit greyscale PNG (0 = background, > 0 = "
                                        f"lesion), this one has bit depth {kind[0]}, colour type {kind[1]}; convert it")
                    if ms != ws:
                        problems.append(f"{m_files[s]} is {ms[1]}x{ms[0]}, its white-light frame {w_files[s]} is "
                                        f"{ws[1]}x{ws[0]}: a mask has the white-light frame's size")
        if problems:
            raise DatasetError(f"{self.root} does not follow the paired layout (edge_pfm.dataset):\n  - "
                               + "\n  - ".join(problems))
        index_of = {c: i for i, c in enumerate(self.classes or ())}
        self.samples = [
            Sample(s, w_files[s], f_files[s], index_of[labelled[s]] if s in labelled else None, m_files.get(s),
                   rows.get(s, {}).get("group") or None, rows.get(s, {}).get("split") or None)
            for s in names
        ]
        if not self.samples:
            raise DatasetError(f"{self.root} holds no image pairs")

    @staticmethod
    def _read_labels(path: Path, problems: list[str]) -> tuple[dict[str, dict], set[str]]:
        if not path.is_file():
            return {}, set()
        rows: dict[str, dict] = {}
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: the BOM a spreadsheet writes
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            if not {"sample", "label"} <= columns:
                problems.append(f"{path} needs the header 'sample,label' (optional: group, split), got "
                                f"{sorted(columns)}")
                return {}, columns
            for row in reader:
                name = (row["sample"] or "").strip()
                if name in rows:
                    problems.append(f"{path}: sample {name!r} is listed twice")
                rows[name] = {k: (row.get(k) or "").strip() for k in ("label", "group", "split")}
        return rows, columns

    @property
    def has_masks(self) -> bool:
        return any(s.mask is not None for s in self.samples)

    @property
    def has_splits(self) -> bool:
        return all(s.split is not None for s in self.samples)

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

    def load_mask(self, i: int) -> np.ndarray | None:
        """Sample i's lesion mask, (H, W) bool, or None when it has none."""
        import cv2

        p = self.samples[i].mask
        if p is None:
            return None
        m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if m is None:
            raise DatasetError(f"unreadable mask {p}: not an image OpenCV can decode; replace or remove it")
        if m.dtype != np.uint8 or m.ndim != 2:
            raise DatasetError(f"{p}: a mask is 8-bit single-channel (0 = background, > 0 = lesion), got dtype "
                               f"{m.dtype} shape {m.shape}; convert it")
        return m > 0

    def pair_hash(self, i: int) -> str:
        """sha256 of sample i's two frames' bytes: the same pair under two names hashes the same."""
        s = self.samples[i]
        h = hashlib.sha256()
        for p in (s.white, s.fluorescence):
            h.update(hashlib.sha256(p.read_bytes()).digest())
        return h.hexdigest()

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
