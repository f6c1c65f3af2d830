"""Serve soak: `edge-pfm serve` as systemd runs it (a real process, a notify socket bound here, the watchdog on),
two synthetic cameras with faults at 4x a colposcope's rate, for M minutes.

    python benchmarks/serve_soak.py --bundle build/demo/bundle --minutes 30 [--fps 120] [--json build/bench/serve_soak.json]

Faults, every 5 minutes: the white-light camera freezes on one frame for 3 s (reopened after `frozen_frames`) and a
read blocks for 4 s (reopened after `camera_stall_s`); the fluorescence camera disconnects for 3 s (reads fail,
reopened with backoff). Always: 5 % drops and jitter on both, 1000 ppm clock drift on fluorescence. A frozen
camera's repeated frames are decided until `frozen_frames` of them have come (they carry new frame numbers, as a
frozen driver's do): counted apart as frozen_repeats_decided, not as mispaired.

Per minute: the process's RSS (/proc/PID/status) and a /metrics scrape. At the end the backend is made to hang
(benchmarks/serve_faults.py), so decisions stop; then /metrics must count exactly the decisions the log holds, the
log's numbers must run 1..N with no gap, and every inferred pair's pixel stamps must have been right (checked in the
serve process). Also measured: the longest gap between watchdog pings while serving.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from soak import _trend  # noqa: E402

WATCHDOG_S = 10.0


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def total(m: dict[str, float], name: str) -> float:
    return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="build/demo/bundle")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--fps", type=float, default=120.0, help="camera rate (120: 4x a colposcope's)")
    ap.add_argument("--out", default="build/bench/serve_soak")
    ap.add_argument("--json", default="build/bench/serve_soak.json")
    args = ap.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("decisions*.jsonl"):  # the log rotates at 64 MB: a 30-minute soak writes several files
        old.unlink()
    tol_ms = 1000 / args.fps / 2
    jitter = 0.3 * 1000 / args.fps
    cam = f"synthetic:fps={args.fps:g},width=1280,height=720,seed=5,drop=0.05,jitter_ms={jitter:.2f}"
    cfg = out / "device.toml"
    cfg.write_text(f"""[run]
bundle = "{Path(args.bundle).absolute()}"
backend = "onnxruntime"
log = "decisions.jsonl"
tolerance_ms = {tol_ms:.3f}
[cameras.white_light]
source = "{cam},freeze=60:3,hang=200:4,every_s=300"
[cameras.fluorescence]
source = "{cam},drift_ppm=1000,disconnect=150:3,every_s=300"
[serve]
health = "127.0.0.1:0"
camera_stall_s = 1.5
frozen_frames = {int(args.fps / 2)}
camera_give_up_s = 60
[security]
trusted_keys = "keys"
state_dir = "state"
""")
    sock_path = out / "notify.sock"
    sock_path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    messages: list[tuple[float, str]] = []
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            try:
                messages.append((time.monotonic(), sock.recv(4096).decode()))
            except TimeoutError:
                continue

    threading.Thread(target=listen, daemon=True).start()
    mark, pairs_json = out / "hung_at", out / "pairs.json"
    mark.unlink(missing_ok=True)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
           "PYTHONUNBUFFERED": "1"}
    child_log = (out / "serve.out").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "serve_faults.py"),
                             "--hang-after-s", str(args.minutes * 60), "--mark", str(mark),
                             "--pair-check", str(pairs_json), "--", "serve", "--config", str(cfg)],
                            cwd=ROOT, env=env, stdout=child_log, stderr=subprocess.STDOUT, text=True)
    try:
        while not any("READY=1" in m for _, m in messages):
            if proc.poll() is not None:
                raise SystemExit(f"serve exited {proc.returncode}: see {out / 'serve.out'}")
            time.sleep(0.2)
        t_ready = time.monotonic()
        url = next(line.split("listening on ")[1].strip() for line in (out / "serve.out").read_text().splitlines()
                   if "listening on " in line)
        print(f"serve ready; {url}; soaking {args.minutes:g} min at {args.fps:g} fps", flush=True)
        rows = []
        while not mark.exists():
            time.sleep(min(60.0, max(1.0, 60 - (time.monotonic() - t_ready) % 60)))
            if proc.poll() is not None:
                raise SystemExit(f"serve exited {proc.returncode}: see {out / 'serve.out'}")
            m = scrape(url)
            row = {"t_s": round(time.monotonic() - t_ready), "rss_mb": round(rss_mb(proc.pid) or 0, 1),
                   "decisions": total(m, "edge_pfm_decisions_total"),
                   "pairs_per_s": round(m.get("edge_pfm_pairs_per_second", 0), 1),
                   "reopens": total(m, "edge_pfm_camera_reopens_total"),
                   "stalls": total(m, "edge_pfm_camera_stalls_total")}
            rows.append(row)
            print(f"  t={row['t_s']:5d}s  rss {row['rss_mb']:.0f} MB  decisions {row['decisions']:.0f}  "
                  f"{row['pairs_per_s']} pairs/s  reopens {row['reopens']:.0f}  stalls {row['stalls']:.0f}", flush=True)
        hung_at = float(mark.read_text())
        previous, final = -1.0, {}
        while True:  # decisions have stopped once two scrapes a second apart agree
            time.sleep(1.0)
            final = scrape(url)
            if total(final, "edge_pfm_decisions_total") == previous:
                break
            previous = total(final, "edge_pfm_decisions_total")
        from edge_pfm.decision_log import read_log

        records, _ = read_log(out / "decisions.jsonl")  # every rotated file, oldest first
        numbers = [r["n"] for r in records]
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        done.set()
    pings = [t for t, m in messages if "WATCHDOG=1" in m and t < hung_at]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    pairs = json.loads(pairs_json.read_text()) if pairs_json.exists() else {}
    states: dict[str, int] = {}
    for r in records:
        states[r["state"]] = states.get(r["state"], 0) + 1
    counted = total(final, "edge_pfm_decisions_total")
    result = {
        "minutes": args.minutes, "fps": args.fps, "exit_code": rc,
        "rss_series": rows, "rss_first_mb": rows[0]["rss_mb"] if rows else None,
        "rss_last_mb": rows[-1]["rss_mb"] if rows else None, "rss_trend_mb_per_hour": _trend(rows, lambda r: r["rss_mb"]),
        "decisions_logged": len(records), "decisions_in_metrics": counted,
        "metrics_equal_log": counted == len(records),
        "log_numbers_contiguous": numbers == list(range(1, len(numbers) + 1)),
        "lost_decisions": int(counted) - len(records),
        "metrics_pairs_decided": total(final, "edge_pfm_pairs_decided_total"),
        "log_pairs_decided": sum(r["state"] not in ("no_signal", "camera_lost") for r in records),
        "states": states, "pairs_checked": pairs.get("checked"),
        # a frame the software paired twice (its source's seq repeats), a swapped modality or a skew past tolerance;
        # a frozen camera's repeated pixels under new frame numbers are the fault itself, decided until detected
        "mispaired": sum(pairs.get(k, 0) for k in ("swapped", "seq_reused", "skewed")) if pairs else None,
        "frozen_repeats_decided": pairs.get("reused"),
        "pair_check": pairs,
        "camera_reopens": {k: v for k, v in final.items() if k.startswith("edge_pfm_camera_reopens_total")},
        "camera_stalls": {k: v for k, v in final.items() if k.startswith("edge_pfm_camera_stalls_total")},
        "watchdog_pings": len(pings), "watchdog_max_gap_s": round(max(gaps), 2) if gaps else None,
        "watchdog_s": WATCHDOG_S,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rss_series"}, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if rc == 0 and result["metrics_equal_log"] and result["log_numbers_contiguous"] else 1


if __name__ == "__main__":
    sys.exit(main())
