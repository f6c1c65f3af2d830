"""Reusable frame buffers for one camera: no multi-megabyte allocation per frame.

A 1080p BGR frame is 6 MB. Allocated fresh per frame, in two reader threads, the process heap churns
(glibc arenas, mmap/munmap, page faults) and RSS swings by tens of MB over a day. A pool hands a
buffer out again only when nothing else holds it: its reference count says so. A frame still kept by
the pairer, a queued pair, an observer or the video writer (or any view of it) is never overwritten.
When every pooled buffer is held, the pool grows up to `limit`; past that it allocates plainly and
counts a miss, so a consumer that hoards frames costs memory, never correctness.
"""
from __future__ import annotations

import collections
import sys

import numpy as np


class FramePool:
    def __init__(self, limit: int = 12):
        self.limit = limit
        self.buffers: list[np.ndarray] = []
        self.stats = collections.Counter()  # reused, allocated, misses, reshaped
        self.buffers.append(np.empty(0, np.uint8))  # a probe that only the pool references
        self._free_refs = self._refs(0)  # references a buffer has when only the pool holds it
        self.buffers.clear()

    def _refs(self, i: int) -> int:
        return sys.getrefcount(self.buffers[i])

    def take(self, shape: tuple[int, ...], dtype: np.dtype = np.uint8) -> np.ndarray:
        """A buffer of `shape`/`dtype` that no one else references (contents undefined)."""
        shape, dtype = tuple(shape), np.dtype(dtype)
        for i in range(len(self.buffers)):
            if self._refs(i) == self._free_refs:
                if self.buffers[i].shape == shape and self.buffers[i].dtype == dtype:
                    self.stats["reused"] += 1
                else:  # the camera changed mode
                    self.buffers[i] = np.empty(shape, dtype)
                    self.stats["reshaped"] += 1
                return self.buffers[i]
        buf = np.empty(shape, dtype)
        if len(self.buffers) < self.limit:
            self.buffers.append(buf)
            self.stats["allocated"] += 1
        else:
            self.stats["misses"] += 1
        return buf

    def copy_of(self, image: np.ndarray) -> np.ndarray:
        buf = self.take(image.shape, image.dtype)
        np.copyto(buf, image)
        return buf
