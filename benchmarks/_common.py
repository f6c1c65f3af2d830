"""Shared by the benchmark scripts: timing, a table printer, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


def time_runs(fn: Callable[[], object], runs: int = 30, warmup: int = 5) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {"median_ms": statistics.median(samples), "p10_ms": samples[len(samples) // 10],
            "p90_ms": samples[(len(samples) * 9) // 10], "runs": runs}


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "machine": machine()}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def python_argv(argv: list, block_torch: bool = False) -> list[str]:
    """The command line for `python argv` (a module's CLI when argv[0] is '-m', else a script). With block_torch, a
    process where `import torch` raises ImportError (sys.modules['torch'] = None, then runpy), as on a machine
    without PyTorch; that runs a module only."""
    argv = [str(a) for a in argv]
    if not block_torch:
        return [sys.executable, *argv]
    assert argv[0] == "-m", "block_torch runs a module: ['-m', module, ...]"
    module, args = argv[1], argv[2:]
    return [sys.executable, "-c", f"import runpy, sys; sys.modules['torch'] = None; sys.argv = [{module!r}, "
            f"*{args!r}]; runpy.run_module({module!r}, run_name='__main__')"]
