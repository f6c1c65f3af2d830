"""Progress on the build machine: a tqdm bar on a terminal; plain lines (one every 15 s, and the last) when the
output is a file or a CI log, where carriage returns would pile up into one unreadable line; work shorter than
15 s then prints no bar at all. No torch."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def log(msg: str) -> None:
    """One line of build-machine progress on stderr (stdout is left to reports)."""
    print(msg, file=sys.stderr, flush=True)


class _Lines:
    """A file for tqdm that turns each redraw into a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "pairs",
             enabled: bool = True, leave: bool = True) -> Any:
    """A tqdm bar over `iterable` (or a manual one: .update(n), .close()) that reads well anywhere."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave,
                file=sys.stderr if tty else _Lines(sys.stderr), mininterval=0.2 if tty else 15.0, ascii=not tty,
                dynamic_ncols=tty, delay=0 if tty else 15.0)
