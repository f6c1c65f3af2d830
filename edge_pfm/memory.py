"""Process memory settings for long runs (the application calls this; importing edge_pfm does not)."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def limit_heap_fragmentation(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation above `threshold_bytes` (camera frames) with mmap, returned to the OS on free.

    glibc raises its mmap threshold after the first large free, after which multi-megabyte frame
    buffers come from per-thread heap arenas that fragment: measured here, a 1080p two-camera run
    sits ~38 MB (17 %) higher without this. A fixed threshold disables that adjustment. No-op
    outside glibc. -> whether it was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def native_heap_mb() -> dict[str, float] | None:
    """glibc's malloc view of the process, summed over all arenas: `in_use` (live allocations in the heap
    arenas), `free_in_heap` (freed but kept by the allocator: churn and fragmentation), `mmapped` (live
    large blocks, returned to the OS on free), `heap` (the arenas' size).
    None outside glibc >= 2.33."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    mi = fn()
    mb = 1 / (1 << 20)
    return {"in_use": round(mi.uordblks * mb, 2), "free_in_heap": round(mi.fordblks * mb, 2),
            "mmapped": round(mi.hblkhd * mb, 2), "heap": round(mi.arena * mb, 2)}
