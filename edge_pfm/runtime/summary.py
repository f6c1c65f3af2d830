"""The run summary: what `edge-pfm run` prints at the end and writes with --summary-json."""
from __future__ import annotations

from typing import Any

import numpy as np


def percentiles(values) -> dict[str, float]:
    if not len(values):
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "n": 0}
    a = np.asarray(values)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "n": len(values)}


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['pairs_inferred']} pairs in {s['seconds']} s = {s['pairs_per_s']} pairs/s  "
             f"(backend {s['backend']})",
             f"paired {s['pairs']}, dropped stale {s['pairs_dropped_stale']}, unpaired {s['unpaired']}, "
             f"gated {s['gated']}, rejected {s['rejected_nonfinite']}, bad frames {s['bad_frames']}",
             f"decisions {s['decisions']}",
             f"sources {s['sources']}",
             *([f"modality (judged frames, camera:looks like) {s['modality']}"] if s.get("modality") else []),
             *([f"{s['tolerance']['describe']}"] if s.get("tolerance") else []),
             *([f"thread plan {s['thread_plan']}"] if s.get("thread_plan") else []),
             *([s["lesion_map"]] if s.get("lesion_map") else []),
             "latency ms      p50      p95      p99"]
    for stage, p in s["latency_ms"].items():
        lines.append(f"  {stage:11s} {p['p50']:8.2f} {p['p95']:8.2f} {p['p99']:8.2f}")
    return "\n".join(lines)
