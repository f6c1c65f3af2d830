"""Calibration / evaluation data: paired frames -> feed dicts, through edge_pfm's own preprocessing.

`PairReader` is the tiny data-reader ABC of onnxruntime.quantization (get_next() -> feed dict or
None; also iterable), so the same object feeds onnxruntime's calibrators, polygraphy's
`--data-loader-script` and our accuracy evaluation.
"""
from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from edge_pfm.dataset import DatasetError, PairedDataset
from edge_pfm.preprocess import PreprocessSpec, preprocess
from edge_pfm.synthetic import SCENES, keep_freed_memory, render_pair
from export.progress import progress as progress_bar

# white BGR, fluorescence BGR, label[, lesion mask (H, W) bool: synthetic pairs carry it, empty for `normal`]
Pair = tuple
MIN_RECOMMENDED_SAMPLES = 300
PREFETCH_CHUNKS = 2  # synthetic chunks rendered ahead of the one in use


class DatasetPairs(Sequence):
    """Pairs of a dataset on disk, read when indexed: calibration and evaluation stream them in chunks, so memory
    does not grow with the dataset. With masks/, each pair carries its mask: its own, an empty one for a class
    outside `lesion_classes`, None (unknown) for a lesion class without one."""

    def __init__(self, ds: PairedDataset, indices: Sequence[int] | None = None, lesion_classes: tuple[str, ...] = ()):
        self.ds, self.lesion_classes = ds, tuple(lesion_classes)
        self.indices = list(range(len(ds))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return DatasetPairs(self.ds, self.indices[k], self.lesion_classes)
        i = self.indices[k]
        wl, fl, label = self.ds.load(i)
        if not self.ds.has_masks:
            return wl, fl, label
        mask = self.ds.load_mask(i)
        if mask is None and (label is None or self.ds.classes[label] not in self.lesion_classes):
            mask = np.zeros(wl.shape[:2], bool)
        return wl, fl, label, mask

    def describe(self, k: int) -> str:
        """Pair k by its files, for an error message."""
        s = self.ds.samples[self.indices[k]]
        return f"{s.name!r} ({s.white}, {s.fluorescence})"

    def subset(self, indices: Iterable[int]) -> DatasetPairs:
        return DatasetPairs(self.ds, [self.indices[k] for k in indices], self.lesion_classes)

    def chunks(self, size: int = 64) -> Iterator[list[Pair]]:
        for i in range(0, len(self), size):
            yield list(self[i:i + size])


def dataset_pairs(root: str | Path, classes: tuple[str, ...] | None = None,
                  lesion_classes: tuple[str, ...] = ()) -> tuple[DatasetPairs, PairedDataset]:
    """A dataset directory's pairs, read on demand (DatasetPairs), after one streamed pass that decodes every image
    and mask: one error lists all bad files before any work starts."""
    ds = PairedDataset(root, classes)
    bad: list[str] = []
    for i in progress_bar(range(len(ds)), desc=f"checking {root}", enabled=len(ds) >= 500):
        try:
            ds.load(i)
            ds.load_mask(i)
        except DatasetError as exc:
            bad.append(str(exc))
    if bad:
        raise DatasetError(f"{len(bad)} bad image file(s) in {root}:\n  " + "\n  ".join(bad))
    return DatasetPairs(ds, None, lesion_classes), ds


def synthetic_pair_chunks(n: int, seed: int, size: tuple[int, int] = (1280, 720), chunk: int = 64,
                          classes: tuple[str, ...] = SCENES) -> Iterator[list[Pair]]:
    """n synthetic pairs balanced over `classes` (a bundle's, in its logit order; each must be a scene the
    generator renders) at camera resolution, rendered on two processes `chunk` at a time, so a large held-out
    set never sits in memory whole (2000 pairs at 720p would be 11 GB)."""
    from concurrent.futures import ProcessPoolExecutor

    unknown = [c for c in classes if c not in SCENES]
    if unknown:
        raise DatasetError(f"synthetic pairs come in the scenes {SCENES}; the model's classes {list(classes)} include "
                           f"{unknown}: calibrate and evaluate on your own data (--data DIR, --eval DIR)")
    rng = np.random.default_rng(seed)
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=n)]
    labels = [classes[i % len(classes)] for i in range(n)]
    pool = ProcessPoolExecutor(2, initializer=keep_freed_memory)
    try:
        def submit(i: int):  # Executor.map submits its whole chunk at once
            part = slice(i, i + chunk)
            return pool.map(render_pair, labels[part], seeds[part], [size] * len(labels[part]), chunksize=8)

        # the next chunks render while the caller works on this one (they used to take turns: measured, the
        # workers sat idle during the held-out evaluation's inference, the main process during the rendering)
        ahead = deque(submit(i) for i in range(0, min(n, PREFETCH_CHUNKS * chunk), chunk))
        for i in range(PREFETCH_CHUNKS * chunk, n + PREFETCH_CHUNKS * chunk, chunk):
            scenes = list(ahead.popleft())
            if i < n:
                ahead.append(submit(i))
            yield [(s.white_light, s.fluorescence, classes.index(s.label), s.lesion_truth) for s in scenes]
    finally:  # a caller that stops early (a refused pair) does not wait for the chunks rendered ahead
        pool.shutdown(wait=True, cancel_futures=True)


def synthetic_pairs(n: int, seed: int, size: tuple[int, int] = (1280, 720),
                    classes: tuple[str, ...] = SCENES) -> list[Pair]:
    """n balanced synthetic pairs at camera resolution (the same pairs synthetic_pair_chunks yields)."""
    return [pair for chunk in synthetic_pair_chunks(n, seed, size, classes=classes) for pair in chunk]


def warn_if_few(n: int) -> None:
    if n < MIN_RECOMMENDED_SAMPLES:
        warnings.warn(
            f"only {n} calibration samples: activation ranges from fewer than ~{MIN_RECOMMENDED_SAMPLES} pairs "
            "miss rare bright/dark frames and INT8 accuracy suffers on the device; use more pairs that cover "
            "every class, camera setting and illumination", stacklevel=2)


def pair_feed(pair: Pair, specs: dict[str, PreprocessSpec], input_names: dict[str, str]) -> dict[str, np.ndarray]:
    """{input name: (1, C, H, W) float32} through edge_pfm's own preprocessing."""
    wl, fl = pair[0], pair[1]
    return {input_names["white_light"]: preprocess(wl, specs["white_light"])[None],
            input_names["fluorescence"]: preprocess(fl, specs["fluorescence"])[None]}


class PairReader:
    """Feed dicts {input_name: (1, C, H, W) float32} for each pair, preprocessed by edge_pfm.preprocess."""

    def __init__(self, pairs: Iterable[Pair], specs: dict[str, PreprocessSpec], input_names: dict[str, str],
                 progress: str | None = None, total: int | None = None):
        self.pairs = pairs if isinstance(pairs, Sequence) else list(pairs)  # a DatasetPairs stays lazy
        self.specs = specs
        self.input_names = input_names
        self.progress = progress
        self.total = total or len(self.pairs)
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self.served = 0
        self.bar = None  # shared with the chunks() sub-readers

    def describe(self, k: int) -> str:
        """Pair k of this reader, by its files where it has them (a dataset's), else by its index."""
        return self.pairs.describe(k) if hasattr(self.pairs, "describe") else f"#{k} (an in-memory pair)"

    def feed(self, pair: Pair) -> dict[str, np.ndarray]:
        return pair_feed(pair, self.specs, self.input_names)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.progress and self.bar is None:
            self.bar = progress_bar(total=self.total, desc=self.progress)
        for pair in self.pairs:
            self.served += 1
            if self.bar is not None:
                self.bar.update(1)
                if self.served == self.total:
                    self.bar.close()
            yield self.feed(pair)

    # onnxruntime.quantization.CalibrationDataReader protocol
    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = iter(self)
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None
        self.served = 0

    def chunks(self, size: int) -> Iterator[PairReader]:
        """Sub-readers of `size` pairs sharing this reader's progress line."""
        for i in range(0, len(self.pairs), size):
            if self.progress and self.bar is None:
                self.bar = progress_bar(total=self.total, desc=self.progress)
            sub = PairReader(self.pairs[i:i + size], self.specs, self.input_names)
            sub.progress, sub.total, sub.served, sub.bar = self.progress, self.total, i, self.bar
            yield sub
