"""The live view's cost and latency, in one process, one run: the view off, then on with one client, ten clients,
a client that connects and never reads, and clients that leave mid-frame.

    python benchmarks/view_bench.py [--bundle build/demo/bundle] [--seconds 20] [--json build/bench/view.json]

Two synthetic cameras at 1280x720, 30 fps, ONNX Runtime, the decision log on. Per phase: pairs/s, the process's CPU
(user + system seconds per second: the view's drawing and JPEG encoding show here), and for the reading clients the
capture-to-client latency: from the pair's capture (X-Capture-Ns, CLOCK_MONOTONIC) to the last byte of its MJPEG
part arriving at an HTTP client on loopback (a browser adds its JPEG decode and paint). Every decision made must be
in the log: 0 lost.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import print_table, write_json  # noqa: E402

CAMERA = "synthetic:fps=30,width=1280,height=720,seed=3"


def reader(url: str, stop: threading.Event, latencies: list[float]) -> None:
    """A client that reads every part it is sent and measures capture-to-arrival."""
    from edge_pfm.service.view import BOUNDARY

    with urllib.request.urlopen(url + "/stream.mjpg", timeout=30) as r:
        while not stop.is_set():
            line = r.readline()
            if not line:
                return
            if line.strip() != f"--{BOUNDARY}".encode():
                continue
            headers = {}
            while (line := r.readline().strip()):
                k, _, v = line.decode().partition(":")
                headers[k.lower()] = v.strip()
            r.read(int(headers["content-length"]))
            t = int(headers["x-capture-ns"])
            if t:
                latencies.append((time.monotonic_ns() - t) / 1e6)


def never_reads(host: str, port: int, stop: threading.Event) -> None:
    s = socket.create_connection((host, port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
    stop.wait()
    s.close()


def leaves_mid_frame(host: str, port: int, stop: threading.Event, count: list[int]) -> None:
    while not stop.is_set():
        s = socket.create_connection((host, port))
        s.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
        got = 0
        while got < 20_000:  # headers and part of the first frame, then gone
            chunk = s.recv(4096)
            if not chunk:
                break
            got += len(chunk)
        s.close()
        count[0] += 1
        stop.wait(0.2)


def phase(runner, seconds: float) -> dict:
    p0, c0, t0 = runner.counts["pairs_inferred"], time.process_time(), time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return {"pairs_per_s": round((runner.counts["pairs_inferred"] - p0) / dt, 2),
            "cpu_per_s": round((time.process_time() - c0) / dt, 3)}


def start_runner(bundle: str, log: Path, view=None):
    from edge_pfm.runtime import RunConfig, Runner
    from edge_pfm.sources import open_source
    from edge_pfm.sources.simulated.cameras import synthetic_bank

    log.unlink(missing_ok=True)
    bank = synthetic_bank(CAMERA)
    runner = Runner(bundle, open_source(CAMERA, "white_light", bank), open_source(CAMERA, "fluorescence", bank),
                    config=RunConfig(backend="onnxruntime", log=str(log)), view=view)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(runner.run()), daemon=True)
    thread.start()
    while not runner.started.is_set() and thread.is_alive():
        time.sleep(0.1)
    time.sleep(3)  # warm up: the pools, the measured tolerance
    return runner, thread, out


def stop_runner(runner, thread, log: Path) -> dict:
    runner.stop_event.set()
    thread.join(30)
    lines = log.read_text().splitlines()[1:]
    numbers = [json.loads(line)["n"] for line in lines]
    return {"decisions_made": runner.decisions_made, "logged": len(lines),
            "lost": runner.decisions_made - len(lines), "contiguous": numbers == list(range(1, len(numbers) + 1))}


def pcts(values: list[float]) -> dict:
    if len(values) < 2:
        return {"n": len(values)}
    q = statistics.quantiles(values, n=20)
    return {"n": len(values), "p50_ms": round(statistics.median(values), 1), "p95_ms": round(q[18], 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="build/demo/bundle")
    ap.add_argument("--seconds", type=float, default=20.0, help="per phase")
    ap.add_argument("--json", default="build/bench/view.json")
    args = ap.parse_args()
    from edge_pfm.memory import limit_heap_fragmentation
    from edge_pfm.service.listener import ListenAddress, Listener
    from edge_pfm.service.view import LiveView

    limit_heap_fragmentation()
    work = Path(args.json).parent
    work.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}

    runner, thread, _ = start_runner(args.bundle, work / "view_off.jsonl")
    results["off"] = phase(runner, args.seconds)
    lost = {"off": stop_runner(runner, thread, work / "view_off.jsonl")}

    view = LiveView()
    listener = Listener(ListenAddress.parse("127.0.0.1:0"), None, view.routes(), max_streams=16).start()
    host, port, url = "127.0.0.1", listener.port, listener.url
    runner, thread, _ = start_runner(args.bundle, work / "view_on.jsonl", view)
    results["on, no client"] = phase(runner, args.seconds)
    patterns = {"1 client": (1, False, False), "10 clients": (10, False, False),
                "1 client + 1 that never reads": (1, True, False), "1 client + clients leaving mid-frame": (1, False, True)}
    left = [0]
    for name, (readers, stalled, leaving) in patterns.items():
        stop = threading.Event()
        lat: list[float] = []
        threads = [threading.Thread(target=reader, args=(url, stop, lat if i == 0 else []), daemon=True)
                   for i in range(readers)]
        if stalled:
            threads.append(threading.Thread(target=never_reads, args=(host, port, stop), daemon=True))
        if leaving:
            threads.append(threading.Thread(target=leaves_mid_frame, args=(host, port, stop, left), daemon=True))
        for t in threads:
            t.start()
        time.sleep(1.0)
        lat.clear()
        results[name] = {**phase(runner, args.seconds), "latency": pcts(lat)}
        stop.set()
        time.sleep(0.5)
    lost["on"] = stop_runner(runner, thread, work / "view_on.jsonl")
    listener.stop()
    base = results["off"]
    for name, r in results.items():
        lat = r.get("latency", {})
        rows.append([name, f"{r['pairs_per_s']:.1f}", f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}",
                     f"{r['cpu_per_s']:.2f}", f"{r['cpu_per_s'] - base['cpu_per_s']:+.2f}",
                     str(lat.get("p50_ms", "-")), str(lat.get("p95_ms", "-"))])
    print_table(["phase", "pairs/s", "x off", "CPU s/s", "CPU vs off", "latency p50 ms", "p95 ms"], rows)
    print(f"decisions: {json.dumps(lost)}; clients that left mid-frame: {left[0]}; frames encoded "
          f"{view.stats['frames_encoded']}")
    write_json(args.json, {"phases": results, "decisions": lost, "left_mid_frame": left[0], "camera": CAMERA,
                           "seconds_per_phase": args.seconds, "view_stats": dict(view.stats)})
    return 0 if all(v["lost"] == 0 and v["contiguous"] for v in lost.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
