"""Deterministic synthetic dual-source colposcopy scenes (numpy + OpenCV only).

Each scene is a pair of frames of the same cervix at camera resolution:
- white light (BGR): pink cervix, dark os, redder transformation zone, vessels, specular
  glare; lesions appear acetowhite, denser and sharper-edged with grade. Inflammation whitens
  too, like LSIL does.
- fluorescence (BGR, blue/violet excitation): green autofluorescence over the cervix, lost
  over neoplasia in proportion to grade, but not over inflammation.

So white light alone confuses inflammation with LSIL, fluorescence alone confuses normal with
inflammation, and only the pair separates all four classes: the reason PFM has two branches.
No real patient data exists in this repository; the generator stands in for it everywhere
(training, calibration, evaluation, synthetic cameras).
"""
from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# the scenes this generator can render (a model's classes come from its registry or spec, not from here)
SCENES: tuple[str, ...] = ("normal", "inflammation", "lsil", "hsil")

# per class: white-light acetowhite density, its edge softness (fraction of cervix radius),
# and the fraction of green autofluorescence lost over the lesion
_LESION = {
    "normal": dict(density=(0.0, 0.0), edge=(0.05, 0.08), fl_loss=(0.0, 0.0)),
    "inflammation": dict(density=(0.22, 0.45), edge=(0.04, 0.09), fl_loss=(0.0, 0.05)),
    "lsil": dict(density=(0.22, 0.45), edge=(0.03, 0.08), fl_loss=(0.22, 0.40)),
    "hsil": dict(density=(0.50, 0.80), edge=(0.008, 0.025), fl_loss=(0.52, 0.78)),
}


@dataclass
class Scene:
    white_light: np.ndarray  # H x W x 3 uint8 BGR
    fluorescence: np.ndarray  # H x W x 3 uint8 BGR
    label: str
    lesion_mask: np.ndarray  # H x W bool: where the lesion is (or would be, for `normal`)
    cervix_mask: np.ndarray  # H x W bool

    @property
    def lesion_truth(self) -> np.ndarray:
        """The mask a lesion map should match: empty for `normal`, where nothing is drawn."""
        return self.lesion_mask if self.label != "normal" else np.zeros_like(self.lesion_mask)


def _low_freq_noise(rng: np.random.Generator, h: int, w: int, cells: int = 12) -> np.ndarray:
    import cv2

    small = rng.random((max(2, h * cells // max(h, w)), cells)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _soft(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Blur a {0,1} mask with a large sigma cheaply (at quarter resolution)."""
    import cv2

    h, w = mask.shape
    f = 4 if min(h, w) >= 64 else 1
    small = cv2.resize(mask, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    s = max(0.3, sigma_px / f)
    small = cv2.GaussianBlur(small, (0, 0), s)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _support(weight: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding box of a weight's nonzero pixels (None if there are none)."""
    rows, cols = np.flatnonzero(weight.any(axis=1)), np.flatnonzero(weight.any(axis=0))
    if not len(rows):
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _blend(planes: list[np.ndarray], weight: np.ndarray, colour: tuple[float, ...], cover: float = 1.0,
           box: tuple[slice, slice] | None = None) -> None:
    """planes[c] = planes[c] * (1 - cover * weight) + colour[c] * weight, in place, computed only inside the
    weight's bounding box `box` (glare spots and the os cover a few per cent of the frame; where the weight is 0
    the formula gives the plane back exactly)."""
    box = _support(weight) if box is None else box
    if box is None:
        return
    wt = weight[box]
    keep = 1 - cover * wt
    for plane, value in zip(planes, np.asarray(colour, np.float32)):
        plane[box] = plane[box] * keep + value * wt


def keep_freed_memory() -> None:
    """Tune this process's allocator for rendering (a render worker's pool initializer). A render makes ~100
    frame-sized temporaries; glibc serves each from fresh pages (mmap, or heap the last free gave back to the
    kernel), and their page faults cost more than the arithmetic: measured at 640x360 on 2 cores, 36-45 ms per
    pair by default, 22-28 ms with freed memory kept for reuse. The same pixels either way. glibc only; a no-op
    elsewhere."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, 32 << 20)  # frames up to 32 MiB from the heap (glibc's maximum)
    libc.mallopt(m_trim_threshold, 256 << 20)  # and the heap not trimmed below 256 MiB free


# the smooth scene is rendered at most this wide and upscaled; noise is added at full resolution
_WORK_WIDTH = 640


def render_pair(
    label: str,
    seed: int,
    size: tuple[int, int] = (1280, 720),
    *,
    blur_sigma: float | None = None,
    exposure: float | None = None,
    glare: float | None = None,
) -> Scene:
    """Render one white-light + fluorescence pair of class `label`, deterministic in `seed`.

    size is (width, height). blur_sigma (pixels at full size), exposure (gain, 1 = nominal) and
    glare (fraction of the cervix covered by specular spots) override the random defaults, to
    make frames that quality gates must reject.
    """
    import cv2

    if label not in _LESION:
        raise ValueError(f"cannot render a {label!r} scene; the synthetic generator renders {SCENES}")
    rng = np.random.default_rng(seed)
    full_w, full_h = int(size[0]), int(size[1])
    f = max(1.0, full_w / _WORK_WIDTH)
    w, h = round(full_w / f), round(full_h / f)
    p = _LESION[label]

    # geometry
    r = h * rng.uniform(0.30, 0.40)
    cx = w / 2 + rng.uniform(-0.06, 0.06) * w
    cy = h / 2 + rng.uniform(-0.06, 0.06) * h
    ax = (int(r * rng.uniform(1.0, 1.2)), int(r))
    angle = rng.uniform(-20, 20)
    centre = (int(cx), int(cy))
    cervix = np.zeros((h, w), np.float32)
    cv2.ellipse(cervix, centre, ax, angle, 0, 360, 1.0, -1, cv2.LINE_AA)
    tz = np.zeros_like(cervix)
    tz_r = r * rng.uniform(0.35, 0.55)
    cv2.ellipse(tz, centre, (int(tz_r * 1.2), int(tz_r)), angle, 0, 360, 1.0, -1, cv2.LINE_AA)
    os_mask = np.zeros_like(cervix)
    cv2.ellipse(os_mask, centre, (max(2, int(0.14 * r)), max(1, int(0.05 * r))), angle, 0, 360, 1.0, -1,
                cv2.LINE_AA)

    # lesion: 1-3 blobs around the os, inside the transformation zone region
    lesion = np.zeros_like(cervix)
    for _ in range(int(rng.integers(1, 4))):
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0.15, 0.45) * r
        c = (int(cx + d * np.cos(a)), int(cy + d * np.sin(a)))
        axes = (max(2, int(rng.uniform(0.12, 0.28) * r)), max(2, int(rng.uniform(0.08, 0.2) * r)))
        cv2.ellipse(lesion, c, axes, rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
    lesion *= cervix * (1 - os_mask)

    density = rng.uniform(*p["density"])
    wl_soft = _soft(lesion, rng.uniform(*p["edge"]) * r)
    fl_soft = _soft(lesion, 0.04 * r)
    fl_loss = rng.uniform(*p["fl_loss"])
    texture = _low_freq_noise(rng, h, w)
    vignette = _soft(cervix, 0.25 * r)

    # white light (float BGR in [0, 1]), one plane per channel: numpy broadcasts an H x W x 1 factor over a
    # last axis of 3 an element triple at a time, several times slower than whole planes
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    fall = 1 - 0.5 * (((xx - cx) / w) ** 2 + ((yy - cy) / h) ** 2) * 4
    pink = np.array([0.55, 0.55, 0.86], np.float32) * rng.uniform(0.9, 1.05, 3).astype(np.float32)
    red = np.array([0.38, 0.36, 0.78], np.float32)
    wall = np.array([0.18, 0.14, 0.32], np.float32)
    tex = 0.88 + 0.24 * texture
    shade, outside, tex_in = 0.6 + 0.4 * fall, 1 - vignette, tex * vignette
    tz_soft = _soft(tz, 0.08 * r)
    tz_keep, tex_tz = 1 - 0.6 * tz_soft, tex * 0.6 * tz_soft
    wl = [(wall[c] * shade * outside + pink[c] * tex_in) * tz_keep + red[c] * tex_tz for c in range(3)]
    # vessels: thin dark-red curves
    vessels = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(6, 14))):
        pts = [(cx + rng.uniform(-1, 1) * r, cy + rng.uniform(-1, 1) * r)]
        for _ in range(4):
            pts.append((pts[-1][0] + rng.uniform(-0.2, 0.2) * r, pts[-1][1] + rng.uniform(-0.2, 0.2) * r))
        cv2.polylines(vessels, [np.int32(pts)], False, 1.0, max(1, int(h / 360)), cv2.LINE_AA)
    vessels *= cervix
    dark = 0.25 * vessels
    # acetowhite lesion, then the os
    white = np.array([0.93, 0.93, 0.96], np.float32)
    dm = density * wl_soft
    box = _support(dm + dark)  # outside it the formula below gives each plane back exactly
    if box is not None:
        dm_box, dark_box = dm[box], dark[box]
        dm_keep = 1 - dm_box
        for c, k in enumerate(np.array([1.0, 1.0, 0.3], np.float32)):
            wl[c][box] = (wl[c][box] - dark_box * k) * dm_keep + white[c] * dm_box
    os_soft = _soft(os_mask, 0.02 * r)
    _blend(wl, os_soft, (0.12, 0.08, 0.25))

    # fluorescence: green autofluorescence, blue excitation leak
    green = 0.55 * (0.85 + 0.3 * texture) * vignette * (1 - 0.5 * os_soft)
    green *= 1 - fl_loss * fl_soft
    green -= 0.12 * vessels
    fl = [0.10 + 0.05 * vignette,  # B: excitation leak
          0.03 + green,
          0.05 + 0.06 * vignette * texture]  # R: weak porphyrin-like signal

    # specular glare (white light mostly)
    glare_frac = rng.uniform(0.001, 0.006) if glare is None else glare
    spot_area = np.pi * r * r * glare_frac
    glare_mask = np.zeros_like(cervix)
    n_spots = int(rng.integers(3, 9))
    for _ in range(n_spots):
        a = rng.uniform(0, 2 * np.pi)
        d = rng.uniform(0, 0.8) * r
        rad = max(1, int(np.sqrt(spot_area / n_spots / np.pi)))
        c = (int(cx + d * np.cos(a)), int(cy + d * np.sin(a)))
        cv2.ellipse(glare_mask, c, (int(rad * 1.5), rad), rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
    glare_box = _support(glare_mask)
    _blend(wl, glare_mask, (1.05,) * 3, box=glare_box)
    _blend(fl, glare_mask, (0.6,) * 3, cover=0.5, box=glare_box)

    # exposure, blur, noise
    gain = rng.uniform(0.85, 1.12) if exposure is None else exposure
    wl = [plane * gain for plane in wl]
    gain = rng.uniform(0.75, 1.3) if exposure is None else exposure
    fl = [plane * gain for plane in fl]
    sigma = rng.uniform(0.0, 1.2) * full_h / 720 if blur_sigma is None else blur_sigma
    if sigma / f > 0.3:
        wl, fl = ([cv2.GaussianBlur(plane, (0, 0), sigma / f) for plane in planes] for planes in (wl, fl))
    masks = [lesion > 0.5, cervix > 0.5]
    if (w, h) != (full_w, full_h):
        wl, fl = ([cv2.resize(plane, (full_w, full_h), interpolation=cv2.INTER_LINEAR) for plane in planes]
                  for planes in (wl, fl))
        masks = [cv2.resize(m.astype(np.uint8), (full_w, full_h), interpolation=cv2.INTER_NEAREST) > 0 for m in masks]
    # luminance noise (one plane shared by the channels): a third of the cost of colour noise
    noise = rng.standard_normal((full_h, full_w), dtype=np.float32)
    wl_u8, fl_u8 = (
        cv2.merge([cv2.convertScaleAbs(np.maximum(plane + scaled, 0), alpha=255.0) for plane in planes])
        for planes, scaled in ((wl, noise * np.float32(rng.uniform(0.008, 0.025))),
                               (fl, noise[::-1] * np.float32(rng.uniform(0.015, 0.04)))))
    return Scene(wl_u8, fl_u8, label, masks[0], masks[1])


def scenes(n: int, seed: int = 0, size: tuple[int, int] = (1280, 720),
           classes: tuple[str, ...] = SCENES) -> Iterator[Scene]:
    """n scenes, classes balanced and shuffled, deterministic in seed."""
    for label, scene_seed in _scene_plan(n, seed, classes):
        yield render_pair(label, scene_seed, size)


def _scene_plan(n: int, seed: int, classes: tuple[str, ...]) -> list[tuple[str, int]]:
    """(label, render seed) of each of scenes()'s n scenes, in order, without rendering any."""
    rng = np.random.default_rng(seed)
    labels = [classes[i % len(classes)] for i in range(n)]
    order = rng.permutation(n)
    seeds = rng.integers(0, 2**31 - 1, size=n)
    return [(labels[i], int(seeds[i])) for i in order]


def split_column(labels: list[str], fractions: tuple[float, float, float]) -> list[str]:
    """train / val / test for each of `labels`, stratified: of each class's pairs, in order, the first go to
    train, then val, then test, by `fractions` (rounded; at least one val and one test pair per class, which
    export.splits requires). The scenes are already shuffled, so taking them in order is a random split."""
    from edge_pfm.dataset import SPLITS

    if len(fractions) != 3 or any(not 0 <= x <= 1 for x in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions (train, val, test) must be three numbers in [0, 1] summing to 1, "
                         f"got {fractions}")
    out, seen = [], {}
    totals = {c: labels.count(c) for c in set(labels)}
    for label in labels:
        k, total = seen.get(label, 0), totals[label]
        n_val = max(1, round(total * fractions[1]))
        n_test = max(1, round(total * fractions[2]))
        if total - n_val - n_test < 1:
            raise ValueError(f"{total} pair(s) of class {label!r} cannot fill train, val and test; write more pairs")
        out.append(SPLITS[0] if k < total - n_val - n_test else SPLITS[1] if k < total - n_test else SPLITS[2])
        seen[label] = k + 1
    return out


def write_dataset(out_dir: str | Path, n: int, seed: int = 0, size: tuple[int, int] = (1280, 720),
                  classes: tuple[str, ...] = SCENES, progress: bool = False,
                  split: tuple[float, float, float] | None = None) -> Path:
    """Write n synthetic pairs in the paired dataset layout (see edge_pfm.dataset). With `split` (the train,
    val and test fractions, e.g. (0.7, 0.15, 0.15)), labels.csv gets a split column, stratified by class
    (split_column), as a team that keeps its own test set writes it; without, no split column."""
    import cv2

    from edge_pfm.dataset import CLASSES_FILE, FLUO_DIR, LABELS_FILE, WHITE_DIR

    # before any image is rendered: a bad fraction costs nothing
    splits = split_column([label for label, _ in _scene_plan(n, seed, classes)], split) if split else None
    out = Path(out_dir)
    (out / WHITE_DIR).mkdir(parents=True, exist_ok=True)
    (out / FLUO_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(scenes(n, seed, size, classes)):
        name = f"s{i:05d}"
        for sub, img in ((WHITE_DIR, scene.white_light), (FLUO_DIR, scene.fluorescence)):
            if not cv2.imwrite(str(out / sub / f"{name}.png"), img):
                raise OSError(f"could not write {out / sub / name}.png")
        rows.append((name, scene.label))
        if progress and (i + 1) % max(1, n // 10) == 0:
            logging.getLogger(__name__).info("wrote %d/%d synthetic pairs to %s", i + 1, n, out)
    with open(out / LABELS_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        if splits is None:
            writer.writerow(["sample", "label"])
            writer.writerows(rows)
        else:
            writer.writerow(["sample", "label", "split"])
            writer.writerows((*row, k) for row, k in zip(rows, splits))
    (out / CLASSES_FILE).write_text("\n".join(classes) + "\n")
    return out
