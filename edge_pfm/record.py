"""Append-only JSONL decision log: one line per decision, flushed as it is written, so a crash loses at
most the line being written. A reader skips (and counts) a partial last line."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from edge_pfm.errors import RuntimeFailure


class LogWriteError(RuntimeFailure):
    """The decision log cannot be written (a full disk, a read-only or vanished folder)."""


class DecisionLog:
    def __init__(self, path: str | os.PathLike, fsync_every: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.fsync_every = fsync_every
        self.lines = 0

    def _failed(self, exc: OSError) -> LogWriteError:
        return LogWriteError(f"cannot write the decision log {self.path}: {exc.strerror or exc}; free space on its "
                             "filesystem or point --log elsewhere")

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._f.flush()
            self.lines += 1
            if self.fsync_every and self.lines % self.fsync_every == 0:
                os.fsync(self._f.fileno())
        except OSError as exc:
            raise self._failed(exc) from exc

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as exc:
            raise self._failed(exc) from exc
        finally:
            with contextlib.suppress(OSError):  # a buffer that cannot be flushed is dropped, the file closed
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
