"""The decision log: JSONL, one decision a line, each file (and each run) opening with a run header that says
which engine made the lines after it; rotated by size or age under a total-size cap (edge_pfm.outputs).

Each line goes to the file in one write and is flushed as it is written, so a crash loses at most the line being
written. A write that fails (a full disk, a file-size limit, an I/O error, a removed USB stick) is cut back to the
last whole line, the file is closed, and LogWriteError names the file and the cause: every line written before it
stays and parses. A reader reads the rotated set in order (`read_log`) and can say which engine made any line
(`trace`, `python -m edge_pfm.decision_log LOG [LINE]`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from edge_pfm.errors import InvalidArgument, RuntimeFailure, run_command
from edge_pfm.outputs import LOG_RETENTION, Retention, enforce_cap, files_in_order, next_segment, rotatable

HEADER = "run_header"


class LogWriteError(RuntimeFailure):
    """The decision log cannot be written (a full disk, a read-only or vanished folder)."""


class DecisionLog:
    def __init__(self, path: str | os.PathLike, header: dict | None = None, retention: Retention = LOG_RETENTION,
                 fsync_every: int = 0):
        self.path = Path(path)
        self.header = dict(header or {})
        self.retention = retention if rotatable(self.path) else Retention(None, None, None)
        self.fsync_every = fsync_every
        self.lines = 0  # decision lines written by this log, over every file
        self.removed: list[Path] = []  # segments the cap removed
        self._fd: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open(first=True)
        except OSError as exc:
            raise self._failed(exc) from exc

    # -- files ------------------------------------------------------------------------------------------
    def _open(self, first: bool = False) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._good = os.fstat(self._fd).st_size  # offset just past the last whole line
        if first and self._good and rotatable(self.path):
            self._cut_partial_tail()
        self._bytes, self._opened = self._good, time.monotonic()
        self._file_lines = 0
        self._emit({"type": HEADER, **self.header, "file": self.path.name, "opened_utc": _utc()})

    def _cut_partial_tail(self) -> None:
        """A crash mid-line in an earlier run left a partial last line: cut it, so the file ends on a whole line."""
        with open(self.path, "rb") as f:
            f.seek(max(0, self._good - 65536))
            tail = f.read()
        keep = self._good - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        if keep != self._good:
            os.ftruncate(self._fd, keep)
            self._good = keep

    def _rotate(self) -> None:
        """Close this file as the next segment and start a new one (with its header); then enforce the cap."""
        self._close_fd()
        os.replace(self.path, next_segment(self.path))
        self._open()
        self.removed += enforce_cap(self.path, self.retention.cap_bytes, f"decision log {self.path}",
                                    self.retention.rotate_bytes or 0)

    def _due(self, size: int) -> bool:
        r = self.retention
        return bool(self._file_lines) and (
            (r.rotate_bytes is not None and self._bytes + size > r.rotate_bytes)
            or (r.rotate_seconds is not None and time.monotonic() - self._opened > r.rotate_seconds))

    # -- writing ----------------------------------------------------------------------------------------
    def _emit(self, record: dict[str, Any], data: bytes | None = None) -> None:
        data = data if data is not None else _line(record)
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                if n == 0:
                    raise OSError(errno.EIO, "the write made no progress")
                view = view[n:]
        except OSError:
            with contextlib.suppress(OSError):  # take the partial line back: the file ends on a whole line
                os.ftruncate(self._fd, self._good)
            raise
        self._good += len(data)
        self._bytes = self._good
        if record.get("type") != HEADER:
            self._file_lines += 1

    def new_run(self, header: dict[str, Any]) -> None:
        """A new run header in the same file (a bundle switched mid-run): the lines after it are its engine's; a
        rotation repeats the newest header."""
        self.header = dict(header)
        try:
            if self._fd is None:
                raise OSError(errno.EBADF, "the log is closed after an earlier failure")
            self._emit({"type": HEADER, **self.header, "file": self.path.name, "opened_utc": _utc()})
        except OSError as exc:
            self._close_fd(quiet=True)
            raise self._failed(exc) from exc

    def write(self, record: dict[str, Any]) -> None:
        try:
            if self._fd is None:
                raise OSError(errno.EBADF, "the log is closed after an earlier failure")
            data = _line(record)  # serialised once: its size decides the rotation, then it is written
            if self._due(len(data)):
                self._rotate()
            self._emit(record, data)
            self.lines += 1
            if self.fsync_every and self.lines % self.fsync_every == 0:
                os.fsync(self._fd)
        except OSError as exc:
            self._close_fd(quiet=True)
            raise self._failed(exc) from exc

    def _failed(self, exc: OSError) -> LogWriteError:
        return LogWriteError(f"cannot write the decision log {self.path}: {exc.strerror or exc}; free space on its "
                             "filesystem or point --log elsewhere (every line written before is kept)")

    def _close_fd(self, quiet: bool = False) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if not quiet:
                os.fsync(fd)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        try:
            self._close_fd()
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EROFS):  # a device or pipe cannot be fsync'd: nothing lost
                raise self._failed(exc) from exc


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_log(path: str | os.PathLike, headers: bool = False) -> tuple[list[dict], int]:
    """Every decision of the log at `path`, over its rotated files in order. -> (records, number of unparseable
    lines: at most one partial trailing line after a crash). `headers`: keep the run headers among them."""
    records, bad = [], 0
    files = files_in_order(path) if rotatable(Path(path)) else [Path(path)]
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if headers or r.get("type") != HEADER:
                    records.append(r)
    return records, bad


def trace(path: str | os.PathLike, line: int | None = None) -> dict:
    """Which engine made decision number `line` (1-based over the rotated set; None: the last), from the run header
    before it. -> {"decision": n, "file": ..., "header": {...}, "record": {...}}."""
    records, _ = read_log(path, headers=True)
    header, n = None, 0
    for r in records:
        if r.get("type") == HEADER:
            header = r
            continue
        n += 1
        if line is not None and n == line:
            return {"decision": n, "file": header.get("file") if header else None, "header": header, "record": r}
        last = (n, header, r)
    if line is None and n:
        n, header, r = last
        return {"decision": n, "file": header.get("file") if header else None, "header": header, "record": r}
    raise IndexError(f"{path} holds {n} decisions; there is no decision {line}")


def describe_trace(t: dict) -> str:
    h, r = t["header"] or {}, t["record"]
    engine = h.get("engine", {})
    return "\n".join([
        f"decision {t['decision']} ({r.get('wall')}, {r.get('state')} {r.get('shown_class')}) in {t['file']}",
        f"  run {h.get('run_id')}  edge-pfm {h.get('edge_pfm')}  config {h.get('config_sha256', '')[:16]}",
        f"  bundle {h.get('bundle')} manifest {h.get('bundle_sha256', '')[:16]}"
        + (f", {h['signature']['note']}" if h.get("signature") else ""),
        f"  engine {engine.get('backend')} {engine.get('version')} ({engine.get('flavour')}) {h.get('precision')}: "
        f"sha256 {engine.get('engine_sha256', '')[:16]}, built from "
        + ", ".join(f"{a} {s[:16]}" for a, s in engine.get("built_from", {}).items()),
        f"  the line's own engine sha256 {r.get('engine', {}).get('engine_sha256', '')[:16]} "
        f"({'matches' if r.get('engine', {}).get('engine_sha256') == engine.get('engine_sha256') else 'DIFFERS from'} "
        "the header)"])


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m edge_pfm.decision_log",
                                 description="which engine made a decision-log line")
    ap.add_argument("log", help="the decision log (--log of edge-pfm run); its rotated files are read too")
    ap.add_argument("line", nargs="?", type=int, help="decision number, 1-based (default: the last)")
    args = ap.parse_args(argv)

    def body() -> None:
        if not Path(args.log).is_file():
            raise InvalidArgument(f"{args.log}: no such decision log (give the --log path of edge-pfm run)")
        try:
            print(describe_trace(trace(args.log, args.line)))
        except IndexError as exc:
            raise InvalidArgument(str(exc)) from None

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
