"""Pairs streamed from disk for training: a torch Dataset over the torch-free reader (edge_pfm.dataset), feeding a
DataLoader, so memory stays flat however large the dataset is.

- Each item is read, preprocessed by edge_pfm.preprocess (what the device runs), and given its lesion-map target
  (the mask's share of each map cell; empty for a class outside the lesion role; NaN, unknown, for a lesion
  sample without a mask).
- An optional cache (`cache_dir`) keeps the preprocessed tensors, keyed by the files' content and the
  preprocessing spec; augmentation runs after it.
- Augmentation is paired: one geometric transform (flips) for both modalities and the mask, photometric changes
  (gain, offset) per modality. Its randomness comes from (seed, epoch, sample), never from the worker that
  loads it, so a run reproduces at any worker count.
- A PairPool serves every split of a run from one set of DataLoader workers, started once and kept.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from edge_pfm.dataset import PairedDataset
from edge_pfm.fileio import atomic_write_bytes
from edge_pfm.preprocess import PreprocessSpec, preprocess


def _cache_salt() -> str:
    """What else the cached tensors depend on: this code's version and OpenCV's (resize and decode)."""
    import cv2

    import edge_pfm

    return f"v1:{edge_pfm.__version__}:{cv2.__version__}:{np.__version__}"


CACHE_SALT = _cache_salt()


def default_workers() -> int:
    """DataLoader workers: one core stays with the training step."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class PairSamples(torch.utils.data.Dataset):
    """Samples `indices` of `ds` -> (white (C,H,W), fluorescence (C,H,W), label, lesion target (1,h,w) or (0,))."""

    def __init__(self, ds: PairedDataset, indices: Sequence[int], specs: dict[str, PreprocessSpec],
                 lesion_classes: tuple[str, ...] = (), augment: bool = False, seed: int = 0,
                 cache_dir: str | Path | None = None):
        self.ds, self.indices, self.specs = ds, list(indices), specs
        self.lesion_classes, self.augment, self.seed = tuple(lesion_classes), augment, seed
        self.with_masks = ds.has_masks
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.epoch = 0
        self._spec_key = json.dumps({m: s.to_dict() for m, s in sorted(specs.items())}, sort_keys=True)

    def set_epoch(self, epoch: int) -> None:
        """Augmentation differs per epoch (DataLoader workers are made afresh each epoch and see this)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return np.array([self.ds.samples[i].label for i in self.indices], np.int64)

    def _compute(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from evaluation.lesion_metrics import lesion_target

        wl, fl, label = self.ds.load(i)
        w, f = preprocess(wl, self.specs["white_light"]), preprocess(fl, self.specs["fluorescence"])
        target = np.zeros((0,), np.float32)
        if self.with_masks:
            mask = self.ds.load_mask(i)
            target = lesion_target(mask if mask is not None else np.zeros(wl.shape[:2], bool), self.specs["white_light"])
            if mask is None and label is not None and self.ds.classes[label] in self.lesion_classes:
                target = np.full_like(target, np.nan)  # a lesion without an outline: unknown, not empty
        return w, f, target.astype(np.float32)

    def _cache_path(self, i: int) -> Path:
        s = self.ds.samples[i]
        h = hashlib.sha256(self.ds.pair_hash(i).encode() + self._spec_key.encode() + CACHE_SALT.encode())
        h.update(repr((self.with_masks, s.label, self.lesion_classes)).encode())
        if s.mask is not None:
            h.update(hashlib.sha256(s.mask.read_bytes()).digest())
        return self.cache_dir / f"{h.hexdigest()}.npz"

    def preprocessed(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.cache_dir is None:
            return self._compute(i)
        path = self._cache_path(i)
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    return z["white"], z["fluo"], z["target"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                pass  # a torn or foreign file: recompute and replace it
        w, f, t = self._compute(i)
        import io

        buf = io.BytesIO()
        np.savez(buf, white=w, fluo=f, target=t)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
        return w, f, t

    def __getitem__(self, k: int):
        return self.item(k, self.epoch, self.augment)

    def item(self, k: int, epoch: int, augment: bool) -> tuple[torch.Tensor, ...]:
        """Sample k (a position in `indices`), augmented as in `epoch` when `augment`."""
        i = self.indices[k]
        w, f, t = self.preprocessed(i)
        if augment:
            rng = np.random.default_rng([self.seed, epoch, i])
            for axis in (2, 1):  # horizontal, vertical: the same for both modalities and the mask
                if rng.random() < 0.5:
                    w, f = np.flip(w, axis), np.flip(f, axis)
                    t = np.flip(t, axis) if t.size else t
            gain, offset = rng.uniform(0.9, 1.1, 2), rng.uniform(-0.1, 0.1, 2)  # per modality
            w, f = w * np.float32(gain[0]) + np.float32(offset[0]), f * np.float32(gain[1]) + np.float32(offset[1])
        label = self.ds.samples[i].label
        return (torch.from_numpy(np.ascontiguousarray(w, np.float32)), torch.from_numpy(np.ascontiguousarray(f, np.float32)),
                torch.tensor(label, dtype=torch.int64), torch.from_numpy(np.ascontiguousarray(t, np.float32)))


class _Keyed(torch.utils.data.Dataset):
    """Every split of a run behind one Dataset: an item is (split, epoch, position, augment)."""

    def __init__(self, splits: dict[str, PairSamples]):
        self.splits = splits

    def __getitem__(self, key: tuple[str, int, int, bool]):
        split, epoch, k, augment = key
        return self.splits[split].item(k, epoch, augment)


class _Planned(torch.utils.data.Sampler):
    """A batch sampler that yields the batches it was last given (it runs in the main process)."""

    def __init__(self):
        self.batches: list[list[tuple]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PairPool:
    """DataLoader workers for every split of one run (train, val, test), started at the first batch and kept until
    close(). A worker forked later, from a trainer that has grown to gigabytes, keeps every page the trainer rewrites
    after the fork (copy on write): forking fresh workers for each evaluation made the run's memory grow with the
    evaluation's length (measured: +730 MB PSS over the process tree from 200 to 2000 pairs of 640x360). One
    iteration at a time. workers=0 reads in this process."""

    def __init__(self, splits: dict[str, PairSamples], workers: int | None = None):
        self.splits = dict(splits)
        self.workers = default_workers() if workers is None else workers
        self._plan = _Planned()
        self._loader: torch.utils.data.DataLoader | None = None

    def batches(self, split: str, order: Sequence[int], batch_size: int, epoch: int = 0,
                augment: bool = False) -> Iterator[tuple]:
        """Batches (white, fluorescence, label, target) of `split`'s samples at positions `order`, in that order."""
        keys = [(split, epoch, int(k), augment) for k in order]
        batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
        if not self.workers:
            data = _Keyed(self.splits)
            for b in batches:
                yield torch.utils.data.default_collate([data[k] for k in b])
            return
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(_Keyed(self.splits), batch_sampler=self._plan,
                                                       num_workers=self.workers, persistent_workers=True,
                                                       worker_init_fn=_quiet_worker)
        self._plan.batches = batches
        yield from self._loader

    def close(self) -> None:
        """Stop the workers (they also stop with this process)."""
        self._loader = None


def pair_loader(samples: PairSamples, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                workers: int | None = None, sampler: torch.utils.data.Sampler | None = None,
                drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over `samples` for one epoch: a seeded order (or `sampler`, e.g. a DistributedSampler)."""
    samples.set_epoch(epoch)
    workers = default_workers() if workers is None else workers
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if sampler is None and shuffle:
        sampler = torch.utils.data.RandomSampler(samples, generator=gen)
    return torch.utils.data.DataLoader(samples, batch_size=batch_size, sampler=sampler, shuffle=False,
                                       num_workers=workers, drop_last=drop_last,
                                       worker_init_fn=_quiet_worker, persistent_workers=False)


def _quiet_worker(_: int) -> None:
    torch.set_num_threads(1)  # a loader worker decodes and resizes; the training step owns the cores
    # Not cv2.setNumThreads: OpenCV's pthreads pool is not fork-safe, and in a worker forked after the parent ran
    # an OpenCV parallel loop (a resize, a PNG write) it waits forever for the parent's threads (opencv-python
    # 4.14, measured: tests/test_streamed_data.py); the worker's own OpenCV calls run.
