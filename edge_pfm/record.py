"""Append-only JSONL decision log: one line per decision, flushed as it is written, so a crash loses at
most the line being written. A reader skips (and counts) a partial last line."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class DecisionLog:
    def __init__(self, path: str | os.PathLike, fsync_every: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.fsync_every = fsync_every
        self.lines = 0

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()
        self.lines += 1
        if self.fsync_every and self.lines % self.fsync_every == 0:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


def read_log(path: str | os.PathLike) -> tuple[list[dict], int]:
    """-> (records, number of unparseable lines: at most one partial trailing line after a crash)."""
    records, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return records, bad
