"""Soak: the pipeline at 30 fps with two synthetic cameras and injected faults, for M minutes.

    python benchmarks/soak.py --bundle build/demo/bundle --minutes 30 [--json build/bench/soak.json]

Faults on both cameras: 5 % drops, +-10 ms jitter, 1000 ppm clock drift on one, 1 % corrupt frames
(wrong size, greyscale, empty, None), and every 5 minutes a 2 s stall (white light) and a 3 s
disconnect (fluorescence). Checks every inferred pair's pixel stamps (no swapped modality, no
frame used twice, skew within tolerance) and that every decision made is in the log.
Prints RSS at start (after 30 s warm-up) and end, decisions made vs logged, faults seen; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_pfm.bench import _rss_mb  # noqa: E402
from edge_pfm.faults import FaultySource  # noqa: E402
from edge_pfm.pipeline import RunConfig, Runner, format_summary  # noqa: E402
from edge_pfm.record import read_log  # noqa: E402
from edge_pfm.sources import SceneBank, SyntheticSource  # noqa: E402
from edge_pfm.stamp import read_stamp  # noqa: E402


class PairChecker:
    def __init__(self, tolerance_ns: int):
        self.tolerance_ns = tolerance_ns
        self.seen: set[tuple[str, int]] = set()
        self.checked = self.swapped = self.reused = self.skewed = 0
        self.lock = threading.Lock()

    def __call__(self, work, decision) -> None:
        wi, wm = read_stamp(work.pair.white_light.image)
        fi, fm = read_stamp(work.pair.fluorescence.image)
        with self.lock:
            self.checked += 1
            self.swapped += (wm, fm) != ("white_light", "fluorescence")
            for key in (("w", wi), ("f", fi)):
                self.reused += key in self.seen
                self.seen.add(key)
            self.skewed += abs(work.pair.skew_ns) > self.tolerance_ns


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="build/demo/bundle")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--json", default="build/bench/soak.json")
    ap.add_argument("--log", default="build/bench/soak_decisions.jsonl")
    args = ap.parse_args()
    seconds = args.minutes * 60
    Path(args.log).unlink(missing_ok=True)
    bank = SceneBank((1280, 720), seed=5, per_class=2)
    every = 300.0
    # repeating fault windows: one stall and one disconnect per 5 minutes (the wrappers take one window each,
    # so the runner is rebuilt per period with fresh sources; the log and the checks span all periods)
    tol_ms = 1000 / 30 / 2
    checker = PairChecker(int(tol_ms * 1e6))
    totals = {"decisions_made": 0, "faults": {}, "summaries": []}
    rss_start = None
    rss_samples: list[float] = []
    t_start = time.monotonic()
    period = 0
    while time.monotonic() - t_start < seconds:
        run_s = min(every, seconds - (time.monotonic() - t_start))
        white = FaultySource(SyntheticSource("white_light", bank, fps=30, jitter_ms=0, seed=period),
                             drop=0.05, jitter_ms=10, corrupt=0.01, stall=(60.0, 2.0) if run_s > 70 else None,
                             seed=100 + period)
        fluo = FaultySource(SyntheticSource("fluorescence", bank, fps=30, seed=period + 1), drop=0.05, jitter_ms=10,
                            drift_ppm=1000, corrupt=0.01, disconnect=(150.0, 3.0) if run_s > 160 else None,
                            seed=200 + period)
        runner = Runner(args.bundle, white, fluo, config=RunConfig(backend="onnxruntime", log=args.log,
                                                                    tolerance_ms=tol_ms))
        checker.seen = set()  # frame indices restart with each period's sources
        runner.observers.append(checker)
        if rss_start is None:  # sample RSS after a 30 s warm-up of the first period
            threading.Timer(30.0, lambda: rss_samples.append(_rss_mb())).start()
        t_period = time.monotonic()
        summary = runner.run(run_s)
        if rss_start is None:
            rss_start = rss_samples[0] if rss_samples else _rss_mb()
        made = sum(summary["decisions"].values())
        totals["decisions_made"] += made
        for src in (white, fluo):
            for k, v in src.faults.items():
                totals["faults"][f"{src.modality}.{k}"] = round(totals["faults"].get(f"{src.modality}.{k}", 0) + v, 2)
            totals["faults"][f"{src.modality}.reconnects"] = (totals["faults"].get(f"{src.modality}.reconnects", 0)
                                                             + src.stats["reconnects"])
        totals["faults"]["bad_frames"] = totals["faults"].get("bad_frames", 0) + summary["bad_frames"]
        totals["summaries"].append({k: summary[k] for k in ("seconds", "pairs_inferred", "pairs_per_s", "decisions",
                                                             "bad_frames", "unpaired")})
        print(f"[period {period}] {time.monotonic() - t_period:.0f}s  rss {_rss_mb():.0f} MB\n{format_summary(summary)}",
              flush=True)
        period += 1
    rss_end = _rss_mb()
    records, partial = read_log(args.log)
    result = {
        "minutes": args.minutes, "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1),
        "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2),
        "decisions_made": totals["decisions_made"], "decisions_logged": len(records), "partial_lines": partial,
        "lost_decisions": totals["decisions_made"] - len(records),
        "pairs_checked": checker.checked, "mispaired": checker.swapped + checker.reused + checker.skewed,
        "swapped": checker.swapped, "reused_frames": checker.reused, "skew_over_tolerance": checker.skewed,
        "no_signal_decisions": sum(r["state"] == "no_signal" for r in records),
        "faults": totals["faults"], "periods": totals["summaries"],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "periods"}, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
