"""A fixed-size window of the latest latency samples, preallocated: memory is the same in the first minute
and the tenth hour (a deque of Python floats grows for as long as it takes to fill, ~11 minutes at 30 fps,
and looks like a leak in a soak)."""
from __future__ import annotations

import numpy as np


class LatencyWindow:
    def __init__(self, capacity: int):
        self._buf = np.zeros(capacity, np.float64)
        self._next = 0
        self._count = 0

    def append(self, value: float) -> None:
        self._buf[self._next] = value
        self._next = (self._next + 1) % len(self._buf)
        self._count = min(self._count + 1, len(self._buf))

    def __len__(self) -> int:
        return self._count

    def values(self) -> np.ndarray:
        """The samples in the window, oldest first (a copy)."""
        if self._count < len(self._buf):
            return self._buf[: self._count].copy()
        return np.concatenate((self._buf[self._next:], self._buf[: self._next]))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        v = self.values()
        return v if dtype is None else v.astype(dtype)
