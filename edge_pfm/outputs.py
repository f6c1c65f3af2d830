"""What a clinic day writes, kept within the disk: retention (rotate by size or age, a total-size cap that removes
the oldest files first), the rotated set's names and order, and the preflight that refuses to start when an
output's filesystem has less free space than the run needs.

A rotated output is its path (the file being written) and, beside it, its finished segments `<stem>.<n><suffix>`
(n = 1, 2, ... in the order written). Reading the segments by n, then the path, gives every line once, in order.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from edge_pfm.errors import RuntimeFailure

_LOG = logging.getLogger(__name__)
MIB = 1 << 20
# measured: the demo's 601 decisions took 628 KB (about 1 KB each, with gate metrics and the lesion summary)
LOG_BYTES_PER_DECISION = 1100
# measured: 9.8 MB for the demo's 20 s of 15 fps side-by-side 1280x720 MJPG is 0.02 bytes a pixel; real sensor noise
# compresses worse, so the preflight plans for 8x that
VIDEO_BYTES_PER_PIXEL = 0.17
PREFLIGHT_HORIZON_S = 3600.0  # without --seconds, the preflight asks for an hour of each output (within its cap)
MIN_FREE_BYTES = 16 * MIB  # and this much left over for the rest of the system


class DiskPreflightError(RuntimeFailure):
    """An output's filesystem has less free space than the run needs; the message gives the numbers."""


@dataclass(frozen=True)
class Retention:
    """How one output rotates and how much of it is kept."""

    rotate_bytes: int | None = 64 * MIB  # start a new file past this size
    rotate_seconds: float | None = None  # ... or past this age
    cap_bytes: int | None = 2048 * MIB  # all files of the output together; the oldest go first

    @classmethod
    def from_config(cls, section: dict, prefix: str, default: Retention) -> Retention:
        """[outputs] log_rotate_mb, log_rotate_minutes, log_cap_mb (and video_...): 0 turns one off."""
        def mb(key: str, fallback: int | None) -> int | None:
            v = section.get(f"{prefix}_{key}_mb")
            return fallback if v is None else (int(float(v) * MIB) or None)

        minutes = section.get(f"{prefix}_rotate_minutes")
        seconds = default.rotate_seconds if minutes is None else (float(minutes) * 60 or None)
        return cls(mb("rotate", default.rotate_bytes), seconds, mb("cap", default.cap_bytes))


LOG_RETENTION = Retention(rotate_bytes=64 * MIB, cap_bytes=2048 * MIB)  # about 19 hours of decisions at 30 fps
VIDEO_RETENTION = Retention(rotate_bytes=1024 * MIB, rotate_seconds=3600, cap_bytes=20 * 1024 * MIB)


def rotatable(path: Path) -> bool:
    """Only a regular file (or one not yet made) rotates: a device such as /dev/null is written as it is."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True


def segments(path: str | os.PathLike) -> list[Path]:
    """The finished segments of the output at `path`, oldest first."""
    path = Path(path)
    pattern = re.compile(re.escape(path.stem) + r"\.(\d+)" + re.escape(path.suffix) + "$")
    found = []
    for p in path.parent.glob(f"{path.stem}.*{path.suffix}"):
        m = pattern.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def files_in_order(path: str | os.PathLike) -> list[Path]:
    """Every file of the output: its segments, oldest first, then the file being written (if there is one)."""
    path = Path(path)
    return segments(path) + ([path] if path.exists() else [])


def next_segment(path: Path) -> Path:
    done = segments(path)
    n = int(done[-1].name[len(path.stem) + 1:-len(path.suffix) or None]) + 1 if done else 1
    return path.with_name(f"{path.stem}.{n:06d}{path.suffix}")


def enforce_cap(path: Path, cap_bytes: int | None, what: str, reserve: int = 0) -> list[Path]:
    """Remove the oldest segments until the output's files total at most `cap_bytes` - `reserve` (called as a new
    file starts: `reserve` is the room it will grow into, so the total never passes the cap); the file being
    written is never removed. -> the removed files; each removal is logged."""
    if not cap_bytes:
        return []
    removed = []
    files = files_in_order(path)
    total = sum(f.stat().st_size for f in files)
    budget = max(0, cap_bytes - reserve)
    for old in files[:-1] if files and files[-1] == path else files:
        if total <= budget:
            break
        size = old.stat().st_size
        old.unlink(missing_ok=True)
        total -= size
        removed.append(old)
        _LOG.warning(f"{what}: removed the oldest file {old.name} ({size / MIB:.2f} MiB) to stay under the "
                     f"{cap_bytes / MIB:.2f} MiB cap")
    return removed


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that `path` (or its nearest existing parent) is on."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


@dataclass(frozen=True)
class OutputPlan:
    """One output the run will write: its path, its expected rate and its retention."""

    what: str  # "the decision log", "the video"
    path: Path
    bytes_per_s: float
    retention: Retention

    def needs(self, seconds: float | None) -> float:
        horizon = seconds if seconds else PREFLIGHT_HORIZON_S
        want = self.bytes_per_s * horizon
        return min(want, self.retention.cap_bytes) if self.retention.cap_bytes else want


def preflight(outputs: list[OutputPlan], seconds: float | None, min_free: int = MIN_FREE_BYTES) -> None:
    """Refuse, with the numbers, when an output's filesystem cannot hold what the run will write plus `min_free`
    (outputs on one filesystem are added up). Devices (/dev/null) are not checked."""
    by_fs: dict[int, list[OutputPlan]] = {}
    for o in outputs:
        if not rotatable(o.path):
            continue
        p = o.path.resolve()
        while not p.exists():
            p = p.parent
        by_fs.setdefault(os.stat(p).st_dev, []).append(o)
    for group in by_fs.values():
        free = free_bytes(group[0].path)
        need = sum(o.needs(seconds) for o in group)
        if free < need + min_free:
            parts = ", ".join(f"{o.what} {o.path} about {o.needs(seconds) / MIB:.1f} MiB "
                              f"({o.bytes_per_s / 1024:.0f} KiB/s"
                              + (f", capped at {o.retention.cap_bytes / MIB:.0f} MiB" if o.retention.cap_bytes else "")
                              + ")" for o in group)
            span = f"{seconds:.0f} s" if seconds else f"{PREFLIGHT_HORIZON_S / 3600:.0f} hour"
            raise DiskPreflightError(
                f"not enough free space for {span} of output: {free / MIB:.2f} MiB free on the filesystem of "
                f"{group[0].path.parent}, and {parts} plus {min_free / MIB:.0f} MiB to spare need "
                f"{(need + min_free) / MIB:.1f} MiB; free space, write elsewhere, or lower the caps ([outputs] in "
                "device.toml)")
