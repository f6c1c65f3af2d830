"""Soak: one pipeline with two synthetic cameras and injected faults, for M minutes.

    python benchmarks/soak.py --bundle build/demo/bundle --minutes 30 [--fps 120] [--tracemalloc]
                              [--json build/bench/soak.json]

--fps 120 runs the cameras at 4x a colposcope's rate, so 30 minutes show the trend of two hours.
Per minute it samples RSS, the Python heap (tracemalloc, with --tracemalloc) and glibc's native heap
(live, freed-but-kept, mmapped), so a leak (live memory grows) can be told from allocator churn (freed
memory kept); with --tracemalloc it also lists the Python allocation sites that grew most.

Faults: 5 % drops and +-30 % of a period jitter (10 ms at 30 fps) on both cameras, 1000 ppm clock drift on fluorescence, 1 %
corrupt frames (wrong size, greyscale, empty, None), and every 5 minutes a 2 s stall (white light)
and a 3 s disconnect (fluorescence, reopened with backoff). Every inferred pair's pixel stamps are
checked (no swapped modality, no frame used twice, skew within tolerance), and every decision made
must be in the log. Prints RSS after a 60 s warm-up, every minute and at the end; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_pfm.bench import _rss_mb  # noqa: E402
from edge_pfm.decision_log import read_log  # noqa: E402
from edge_pfm.memory import limit_heap_fragmentation, native_heap_mb  # noqa: E402
from edge_pfm.outputs import LOG_RETENTION, MIB, Retention, files_in_order  # noqa: E402
from edge_pfm.runtime import RunConfig, Runner, format_summary  # noqa: E402
from edge_pfm.sources.simulated.cameras import SceneBank, SyntheticSource  # noqa: E402
from edge_pfm.sources.simulated.faults import FaultySource  # noqa: E402
from edge_pfm.sources.simulated.stamp import read_stamp  # noqa: E402


class PairChecker:
    def __init__(self, tolerance_ns: int):
        self.tolerance_ns = tolerance_ns
        self.last = {"w": -1, "f": -1}  # frame indices only increase: a reuse shows as a repeat
        self.last_seq = {"w": -1, "f": -1}  # the sources' own frame numbers: the software never pairs a frame twice
        self.checked = self.swapped = self.reused = self.skewed = self.unstamped = self.seq_reused = 0

    def __call__(self, work, decision) -> None:
        w, f = work.pair.white_light.image, work.pair.fluorescence.image
        ws, fs = work.pair.white_light.seq, work.pair.fluorescence.seq
        self.seq_reused += ws <= self.last_seq["w"] or fs <= self.last_seq["f"]
        self.last_seq = {"w": ws, "f": fs}
        self.checked += 1
        self.skewed += abs(work.pair.skew_ns) > self.tolerance_ns
        if min(w.shape[1], f.shape[1]) < 26 * 6:  # a corrupted, cropped frame: its stamp is cut off
            self.unstamped += 1
            return
        (wi, wm), (fi, fm) = read_stamp(w), read_stamp(f)
        self.swapped += (wm, fm) != ("white_light", "fluorescence")
        self.reused += wi <= self.last["w"] or fi <= self.last["f"]
        self.last = {"w": wi, "f": fi}


WARM_UP_S = 300  # pools, caches and the allocator fill in the first minutes: the trend is taken after them


def _trend(rows: list[dict], value) -> float | None:
    """Least-squares slope in MB/h over the per-minute samples after the warm-up (all of them in a short run): a
    leak is a trend, not one noisy end sample."""
    settled = [r for r in rows if r["t_s"] >= WARM_UP_S]
    pts = [(r["t_s"], value(r)) for r in (settled if len(settled) >= 3 else rows) if value(r) is not None]
    if len(pts) < 3:
        return None
    return round(float(np.polyfit([t for t, _ in pts], [v for _, v in pts], 1)[0]) * 3600, 2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="build/demo/bundle")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--json", default="build/bench/soak.json")
    ap.add_argument("--log", default="build/bench/soak_decisions.jsonl")
    ap.add_argument("--fps", type=float, default=30.0, help="camera rate (120: 4x a colposcope's, to show the trend sooner)")
    ap.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations (slower)")
    ap.add_argument("--log-rotate-mb", type=float, help="rotate the decision log at this size (default: the product's)")
    ap.add_argument("--log-cap-mb", type=float, help="keep at most this much of it (default: the product's)")
    args = ap.parse_args()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(8)
    Path(args.log).unlink(missing_ok=True)
    limit_heap_fragmentation()  # as `edge-pfm run` does
    bank = SceneBank((1280, 720), seed=5, per_class=2)
    tol_ms = 1000 / args.fps / 2
    jitter_ms = 0.3 * 1000 / args.fps  # +-10 ms at 30 fps: scaled with the period so that pairing stays possible
    white = FaultySource(SyntheticSource("white_light", bank, fps=args.fps, seed=1), drop=0.05, jitter_ms=jitter_ms, corrupt=0.01,
                         stall=(60.0, 2.0), every_s=300.0, seed=101)
    # 1000 ppm clock drift: the fluorescence camera runs at 29.97 fps (both are stamped by the host clock)
    fluo = FaultySource(SyntheticSource("fluorescence", bank, fps=args.fps, seed=2, drift_ppm=1000), drop=0.05,
                        jitter_ms=jitter_ms, corrupt=0.01, disconnect=(150.0, 3.0), every_s=300.0, seed=202)
    retention = LOG_RETENTION
    if args.log_rotate_mb is not None or args.log_cap_mb is not None:
        mb = (lambda v, d: d if v is None else int(v * MIB))  # noqa: E731
        retention = Retention(mb(args.log_rotate_mb, LOG_RETENTION.rotate_bytes), None,
                              mb(args.log_cap_mb, LOG_RETENTION.cap_bytes))
    for old in files_in_order(args.log):
        old.unlink()
    runner = Runner(args.bundle, white, fluo, config=RunConfig(backend="onnxruntime", log=args.log,
                                                                tolerance_ms=tol_ms,
                                                                log_retention=retention))
    checker = PairChecker(int(tol_ms * 1e6))
    runner.observers.append(checker)
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()
    stop = threading.Event()

    snapshots = []

    def sample():
        while not stop.wait(60.0):
            row = {"t_s": round(time.monotonic() - t0), "rss_mb": round(_rss_mb(), 1),
                   "pairs": runner.counts["pairs_inferred"], "native": native_heap_mb(),
                   "frame_pool": {s.modality: dict(s.inner.pool.stats) for s in (white, fluo)}}
            if args.tracemalloc:
                row["python_heap_mb"] = round(tracemalloc.get_traced_memory()[0] / (1 << 20), 2)
                snapshots[min(len(snapshots), 1):] = [tracemalloc.take_snapshot()]  # the first (after warm-up), the latest
            rss.append(row)
            print(f"  t={row['t_s']:5d}s  rss {row['rss_mb']:.0f} MB  python {row.get('python_heap_mb', '-')} MB  "
                  f"native {row['native']}  pairs {row['pairs']}", flush=True)

    threading.Thread(target=sample, daemon=True).start()
    summary = runner.run(args.minutes * 60)
    stop.set()
    rss_end = _rss_mb()
    rss_start = rss[0]["rss_mb"] if rss else rss_end  # after the 60 s warm-up
    top_growth = []
    if args.tracemalloc and len(snapshots) == 2:
        top_growth = [str(d) for d in snapshots[1].compare_to(snapshots[0], "lineno")[:10]]
    records, partial = read_log(args.log)
    made = sum(summary["decisions"].values())
    logged = summary["outputs"]["log"]
    # with a cap, the oldest files are gone: what is kept must be the last decisions, each once, none missing
    numbers = [r["n"] for r in records]
    kept_contiguous = numbers == list(range(made - len(numbers) + 1, made + 1))
    files = [{"file": f.name, "lines": sum(1 for _ in f.open()), "bytes": f.stat().st_size}
             for f in files_in_order(args.log)]
    faults = {f"{s.modality}.{k}": round(v, 1) for s in (white, fluo) for k, v in s.faults.items()}
    faults.update({f"{s.modality}.{k}": s.stats[k] for s in (white, fluo) for k in ("read_errors", "reconnects")})
    faults["bad_frames"] = summary["bad_frames"]
    result = {
        "minutes": args.minutes, "rss_start_mb": rss_start, "rss_end_mb": round(rss_end, 1),
        "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2), "rss_series": rss,
        "rss_trend_mb_per_hour": _trend(rss, lambda r: r["rss_mb"]),
        "python_heap_trend_mb_per_hour": _trend(rss, lambda r: r.get("python_heap_mb")),
        "native_in_use_trend_mb_per_hour": _trend(rss, lambda r: (r["native"] or {}).get("in_use")),
        "native_free_trend_mb_per_hour": _trend(rss, lambda r: (r["native"] or {}).get("free_in_heap")),
        "python_growth_top": top_growth,
        "decisions_made": made, "decisions_logged": logged["lines"], "decisions_kept": len(records),
        "partial_lines": partial, "lost_decisions": made - logged["lines"],
        "kept_files_contiguous": kept_contiguous, "log_files": files, "log_bytes": sum(f["bytes"] for f in files),
        "log_retention": {"rotate_bytes": retention.rotate_bytes, "cap_bytes": retention.cap_bytes},
        "log_files_removed": len(logged["removed"]), "pairs_checked": checker.checked,
        "mispaired": checker.swapped + checker.reused + checker.skewed, "swapped": checker.swapped,
        "reused_frames": checker.reused, "skew_over_tolerance": checker.skewed, "unstamped": checker.unstamped,
        "decisions": summary["decisions"], "pairs_per_s": summary["pairs_per_s"], "unpaired": summary["unpaired"],
        "faults": faults, "latency_ms": summary["latency_ms"],
    }
    print(format_summary(summary))
    print(json.dumps({k: v for k, v in result.items() if k not in ("latency_ms", "rss_series")}, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
