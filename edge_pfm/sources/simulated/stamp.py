"""Frame stamps: a frame's index and modality written into its pixels (top-left corner).

Used with lossless video (FFV1, PNG) so tests and the soak benchmark can check pairing frame by
frame: a mispaired or swapped pair is visible in the decision log. The stamp sits in the
corner that the centre crop of the preprocessing discards on 16:9 frames.
"""
from __future__ import annotations

import numpy as np

BITS = 24  # frame index
CELL = 6  # pixels per bit
MODALITY_CODES = {"white_light": 1, "fluorescence": 2}
_CODE_MODALITY = {v: k for k, v in MODALITY_CODES.items()}


def stamp(frame: np.ndarray, index: int, modality: str) -> np.ndarray:
    """Write index (24 bits) and modality (2 bits) as black/white cells into row 0..CELL of `frame` (in place)."""
    bits = [(index >> i) & 1 for i in range(BITS)] + [(MODALITY_CODES[modality] >> i) & 1 for i in range(2)]
    for k, bit in enumerate(bits):
        frame[:CELL, k * CELL:(k + 1) * CELL] = 255 if bit else 0
    return frame


def read_stamp(frame: np.ndarray, scale: float = 1.0) -> tuple[int, str | None]:
    """-> (index, modality or None if the stamp is unreadable). `scale`: the frame was resized by this factor since
    it was stamped (the live view's drawing): the cells are read at their scaled centres."""
    cells = frame[int(CELL / 2 * scale), [int((k * CELL + CELL / 2) * scale) for k in range(BITS + 2)]]
    bits = [int(np.mean(c) > 127) for c in cells]
    index = sum(b << i for i, b in enumerate(bits[:BITS]))
    return index, _CODE_MODALITY.get(bits[BITS] | (bits[BITS + 1] << 1))
