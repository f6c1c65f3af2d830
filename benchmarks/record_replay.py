"""Record two live GStreamer cameras with `edge-pfm record`, under a CPU hog on every core, then replay the
recording through `edge-pfm run`, and compare the two runs pair for pair: the pairing, the skews, the classes.

    python benchmarks/record_replay.py --bundle BUNDLE [--seconds 30] [--size 640x360] [--codec ffv1] \
        [--no-hog] [--out build/record_replay] [--json build/record_replay.json]

The cameras are videotestsrc pipelines (is-live, 30 fps, stamped by the pipeline clock), so the modality check
is off ([modality] enabled = false: test patterns look like neither modality) and so are the quality gates
(--no-gates: every pair is classified, so that each has a class to compare). Both commands are run as a user
runs them, in fresh processes; the replay runs on a quiet machine (the build machine's view of a field
recording). Needs GStreamer and PyGObject (the gst extra).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine, print_table, write_json  # noqa: E402


def camera(pattern: str, size: str) -> str:
    w, h = size.split("x")
    return (f"gst:videotestsrc is-live=true pattern={pattern} ! video/x-raw,format=BGR,width={w},height={h},"
            "framerate=30/1 ! appsink")


def decisions(log: Path) -> dict[int, dict]:
    """seq_white -> the record, for the decisions made from a pair."""
    out = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        if "seq_white" in r:
            out[r["seq_white"]] = r
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--codec", default="ffv1", choices=("ffv1", "mjpg"))
    ap.add_argument("--no-hog", action="store_true", help="record on a quiet machine instead")
    ap.add_argument("--out", default="build/record_replay")
    ap.add_argument("--json", default="build/record_replay.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = out / "device.toml"
    config.write_text("[modality]\nenabled = false\n")
    edge = [sys.executable, "-m", "edge_pfm"]
    live_log, replay_log, rec = out / "live.jsonl", out / "replay.jsonl", out / "rec"
    hog = [] if args.no_hog else [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                                  for _ in range(os.cpu_count() or 2)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run([*edge, "record", "--bundle", args.bundle, "--out", str(rec), "--mode", "video",
                            "--codec", args.codec, "--white", camera("smpte", args.size), "--fluo",
                            camera("ball", args.size), "--seconds", str(args.seconds), "--log", str(live_log),
                            "--config", str(config), "--no-gates", "--summary-json", str(out / "record_summary.json")],
                           capture_output=True, text=True)
    finally:
        for p in hog:
            p.kill()
            p.wait()
    record_s = time.perf_counter() - t0
    (out / "record.log").write_text(r.stdout + r.stderr)
    if r.returncode:
        print(f"!! edge-pfm record failed (exit {r.returncode}); its log: {out / 'record.log'}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    r = subprocess.run([*edge, "run", "--bundle", args.bundle, "--white", str(rec / "white_light.000.avi"),
                        "--fluo", str(rec / "fluorescence.000.avi"), "--log", str(replay_log), "--config",
                        str(config), "--no-gates", "--summary-json", str(out / "replay_summary.json")],
                       capture_output=True, text=True)
    replay_s = time.perf_counter() - t0
    (out / "replay.log").write_text(r.stdout + r.stderr)
    if r.returncode:
        print(f"!! edge-pfm run (the replay) failed (exit {r.returncode}); its log: {out / 'replay.log'}",
              file=sys.stderr)
        return 1
    rec_summary = json.loads((out / "record_summary.json").read_text())
    live, replayed = decisions(live_log), decisions(replay_log)
    common = sorted(set(live) & set(replayed))
    same_pair = [k for k in common if live[k]["seq_fluo"] == replayed[k]["seq_fluo"]]
    skew_diff = [abs(live[k]["skew_ms"] - replayed[k]["skew_ms"]) for k in same_pair]
    same_class = sum(live[k]["raw_class"] == replayed[k]["raw_class"] for k in same_pair)
    shown_same = sum(live[k]["shown_class"] == replayed[k]["shown_class"] for k in same_pair)
    cams = rec_summary["outputs"]["recording"]["cameras"]
    grabbed = {m: s["grabbed"] for m, s in rec_summary["sources"].items()}
    result = {
        "machine": machine(), "seconds": args.seconds, "size": args.size, "codec": args.codec,
        "cpu_hog": not args.no_hog, "frames_grabbed": grabbed, "frames_recorded": cams,
        "recording_bytes": rec_summary["outputs"]["recording"]["bytes"],
        "live_pair_decisions": len(live), "replay_pair_decisions": len(replayed), "common": len(common),
        "same_pair": len(same_pair), "max_skew_diff_ms": max(skew_diff) if skew_diff else None,
        "raw_class_agreement": same_class, "shown_class_agreement": shown_same,
        "live_pairing": rec_summary["pairing"], "replay_pairing": json.loads(
            (out / "replay_summary.json").read_text())["pairing"],
        "record_wall_s": round(record_s, 1), "replay_wall_s": round(replay_s, 1)}
    rows = [["frames grabbed (white, fluo)", f"{grabbed.get('white_light')}, {grabbed.get('fluorescence')}"],
            ["frames recorded / left out", ", ".join(f"{m} {c.get('written', 0)} / {c.get('dropped_busy', 0)}"
                                                     for m, c in cams.items())],
            ["recording", f"{result['recording_bytes'] / 2**20:.1f} MiB ({args.codec}, {args.size})"],
            ["pair decisions live / replay / both", f"{len(live)} / {len(replayed)} / {len(common)}"],
            ["same partner frame", f"{len(same_pair)} of {len(common)}"],
            ["max |skew live - skew replay|", f"{result['max_skew_diff_ms']} ms"],
            ["same raw class", f"{same_class} of {len(same_pair)}"],
            ["same shown class", f"{shown_same} of {len(same_pair)}"]]
    print_table(["record -> replay", "measured"], rows)
    write_json(args.json, result)
    return 0 if common and len(same_pair) == len(common) and max(skew_diff) < 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
