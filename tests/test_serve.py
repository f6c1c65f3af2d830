"""`edge-pfm serve` as systemd runs it: a real process, a unix datagram socket bound here as $NOTIFY_SOCKET (no
systemd needed), synthetic cameras with injected faults (synthetic: source options), HTTP from a real client.

Each test starts one serve process and checks several things on it: a process costs seconds (imports, the engine's
check), so the acceptance items share them."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT

prometheus_parser = pytest.importorskip("prometheus_client.parser", reason="the service extra: prometheus_client")

WATCHDOG_S = 2.0  # WatchdogSec= of these tests


class NotifySocket:
    """What systemd would receive: every datagram, with the monotonic time it arrived."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def fields(self, key: str) -> list[tuple[float, str]]:
        return [(t, line.partition("=")[2]) for t, m in list(self.messages) for line in m.split("\n")
                if line.startswith(key + "=")]

    def wait_for(self, key: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.fields(key)
            if found:
                return found[0][0]
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"serve exited {proc.returncode} before {key}")
            time.sleep(0.05)
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


class Serve:
    """One `edge-pfm serve` process (optionally through benchmarks/serve_faults.py) and its stderr, read as it comes."""

    def __init__(self, config: Path, notify: NotifySocket, faults: list[str] | None = None):
        self.notify = notify
        cmd = ([sys.executable, str(ROOT / "benchmarks" / "serve_faults.py"), *faults, "--"] if faults is not None
               else [sys.executable, "-m", "edge_pfm"])
        env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)), "PYTHONUNBUFFERED": "1",
               **{k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}}
        self.proc = subprocess.Popen([*cmd, "serve", "--config", str(config)], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                        daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def url(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"listening on (http://\S+)", self.output)
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}:\n{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"no listener within {timeout} s:\n{self.output}")

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url() + path, timeout=5) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def poll_until(self, path: str, status: int, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = self.get(path)
            if seen[0] == status:
                return seen[1]
            time.sleep(0.1)
        raise AssertionError(f"{path} never answered {status}; last {seen}\n{self.output}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def notify(tmp_path):
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


@pytest.fixture(scope="module")
def engine_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-cache")  # shared: each process still checks its engine before READY


def write_config(tmp_path: Path, bundle: Path, cache: Path, white: str = "", fluo: str = "", view: bool = False,
                 **serve: object) -> Path:
    cam = "synthetic:fps=15,width=320,height=240"
    body = {"health": "127.0.0.1:0", "frozen_frames": 8, "camera_stall_s": 1.0, **serve}
    lines = ["[run]", f'bundle = "{bundle}"', 'log = "decisions.jsonl"', f'cache_dir = "{cache}"',
             "[cameras.white_light]", f'source = "{cam}{"," + white if white else ""}"',
             "[cameras.fluorescence]", f'source = "{cam}{"," + fluo if fluo else ""}"',
             "[serve]", *[f"{k} = {json.dumps(v)}" for k, v in body.items()],
             "[security]", 'trusted_keys = "keys"', 'state_dir = "state"',
             *(["[view]", 'listen = "127.0.0.1:0"'] if view else [])]
    path = tmp_path / "device.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def read_log(path: Path) -> tuple[dict, list[dict]]:
    """(the run header, the decisions) of a whole log: every line parses, numbered 1..N with no gap."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    header, decisions = lines[0], lines[1:]
    assert "run_id" in json.dumps(header)
    assert [d["n"] for d in decisions] == list(range(1, len(decisions) + 1))
    return header, decisions


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_ready_with_a_camera_missing_at_boot_then_health_watchdog_metrics_and_a_clean_stop(
        calibrated_bundle, engine_cache, notify, tmp_path):
    cfg = write_config(tmp_path, calibrated_bundle, engine_cache, fluo="missing_s=6", view=True)
    serve = Serve(cfg, notify)
    try:
        status, body = serve.get("/readyz")  # the listener is up while the engine loads
        assert status == 503 and "not ready" in body
        assert serve.get("/healthz") == (200, "alive\n")
        t_ready = notify.wait_for("READY", 90, serve.proc)
        # STATUS= said what it waited for, in order, and READY came after the engine's check
        said = [text for t, text in notify.fields("STATUS") if t <= t_ready]
        assert [s.split(" ")[0] for s in said[:2]] == ["loading", "engine"], said
        assert "passed" in said[1] and said[1].startswith("engine checked"), said
        ready_line = next(m for t, m in notify.messages if "READY=1" in m)
        assert "STATUS=serving" in ready_line
        # the fluorescence camera is still missing: READY came anyway, /readyz names the camera
        status, body = serve.get("/readyz")
        assert status == 503 and "camera_lost" in body and "fluorescence" in body, body
        body = serve.poll_until("/readyz", 200, 30)  # it is reopened and delivers
        assert body == "ready\n"
        # [view] on [serve] health's address: one listener serves the live view too
        serve.poll_until("/snapshot.jpg", 200, 10)  # once the drawing thread has drawn a frame
        assert "EventSource" in serve.get("/")[1]
        # pings only after READY, at least two per WatchdogSec, while the runtime progresses
        time.sleep(2.5 * WATCHDOG_S)
        pings = [t for t, _ in notify.fields("WATCHDOG")]
        assert pings and pings[0] >= t_ready
        steady = [t for t in pings if t > pings[-1] - 2 * WATCHDOG_S]
        gaps = [b - a for a, b in zip(steady, steady[1:])]
        assert len(steady) >= 4 and max(gaps) <= WATCHDOG_S / 2, gaps
        metrics_text = serve.get("/metrics")[1]
        assert metric(metrics_text, "edge_pfm_camera_reopens_total", camera="fluorescence") >= 1
        assert metric(metrics_text, "edge_pfm_ready") == 1
        info = [s for f in prometheus_parser.text_string_to_metric_families(metrics_text) for s in f.samples
                if s.name == "edge_pfm_bundle_info"]
        assert info and info[0].labels["backend"] == "onnxruntime" and info[0].labels["key_id"] == "unsigned"
        rc = serve.stop()
    finally:
        serve.kill()
    assert rc == 0, serve.output
    assert notify.fields("STOPPING")
    _, decisions = read_log(tmp_path / "decisions.jsonl")
    states = [d["state"] for d in decisions]
    assert states[0] == "camera_lost" and "fluorescence" in decisions[0]["flags"][0]
    assert "ok" in states[states.index("camera_lost"):]
    # the last scrape came before the stop: it counts what the log held then, never more (the hung-backend test,
    # where decisions stop, compares them exactly)
    counted = metric(metrics_text, "edge_pfm_decisions_total")
    assert 0 < counted <= len(decisions)


def test_a_frozen_camera_and_a_blocked_read_are_reopened_and_counted(calibrated_bundle, engine_cache, notify,
                                                                     tmp_path):
    cfg = write_config(tmp_path, calibrated_bundle, engine_cache, white="freeze=3:1.5", fluo="hang=5:30")
    serve = Serve(cfg, notify)
    try:
        notify.wait_for("READY", 90, serve.proc)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            text = serve.get("/metrics")[1]
            frozen = metric(text, "edge_pfm_camera_stalls_total", camera="white_light")
            hung = metric(text, "edge_pfm_camera_stalls_total", camera="fluorescence")
            if frozen >= 1 and hung >= 1 and serve.get("/readyz")[0] == 200 and time.monotonic() > deadline - 30:
                break
            time.sleep(0.3)
        assert frozen >= 1 and hung >= 1, text
        assert metric(text, "edge_pfm_camera_reopens_total", camera="white_light") >= 1
        assert metric(text, "edge_pfm_camera_reopens_total", camera="fluorescence") >= 1
        serve.poll_until("/readyz", 200, 20)
        time.sleep(1.0)
        rc = serve.stop()
        final = serve.output
    finally:
        serve.kill()
    assert rc == 0, final
    _, decisions = read_log(tmp_path / "decisions.jsonl")
    lost = [d for d in decisions if d["state"] == "camera_lost"]
    assert any("frozen" in d["flags"][0] and "white_light" in d["flags"][0] for d in lost), lost
    assert any("blocked" in d["flags"][0] and "fluorescence" in d["flags"][0] for d in lost), lost
    last_lost = max(d["n"] for d in lost)
    assert any(d["state"] == "ok" and d["n"] > last_lost for d in decisions)  # decisions resumed
    # metrics = log: the summary printed at the stop counts every decision the log holds
    assert f"'camera_lost': {len(lost)}" in final


def test_a_hung_backend_stops_the_watchdog_pings(calibrated_bundle, engine_cache, notify, tmp_path):
    cfg = write_config(tmp_path, calibrated_bundle, engine_cache)
    mark = tmp_path / "hung_at"
    serve = Serve(cfg, notify, faults=["--hang-after-s", "3", "--mark", str(mark)])
    try:
        notify.wait_for("READY", 90, serve.proc)
        deadline = time.monotonic() + 30
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        hung_at = float(mark.read_text())
        time.sleep(3 * WATCHDOG_S)
        pings = [t for t, _ in notify.fields("WATCHDOG")]
        assert serve.proc.poll() is None  # alive and useless: only the watchdog can tell
        assert any(t < hung_at for t in pings)
        assert max(pings) <= hung_at + WATCHDOG_S, (max(pings) - hung_at)
        assert serve.get("/healthz")[0] == 200  # liveness is the watchdog's question, not HTTP's
        # no decision comes any more: /metrics counts exactly the decisions the log holds (flushed line by line)
        text = serve.get("/metrics")[1]
        logged = (tmp_path / "decisions.jsonl").read_text().splitlines()[1:]
        assert metric(text, "edge_pfm_decisions_total") == len(logged) > 0
        by_state = {s: sum(json.loads(line)["state"] == s for line in logged) for s in ("ok", "warming_up")}
        assert all(metric(text, "edge_pfm_decisions_total", state=s) == n for s, n in by_state.items())
        assert metric(text, "edge_pfm_pairs_decided_total") == sum(
            json.loads(line)["state"] not in ("no_signal", "camera_lost") for line in logged)
        rc = serve.stop()  # SIGTERM with the inference thread stuck: the run still stops and closes its log
    finally:
        serve.kill()
    assert rc == 0, serve.output
    read_log(tmp_path / "decisions.jsonl")


def test_sigterm_while_the_engine_builds_exits_0_without_ready(calibrated_bundle, engine_cache, notify, tmp_path):
    cfg = write_config(tmp_path, calibrated_bundle, engine_cache)
    serve = Serve(cfg, notify, faults=["--load-delay-s", "60"])
    try:
        notify.wait_for("EXTEND_TIMEOUT_USEC", 60, serve.proc)  # systemd told to wait for the build
        assert "loading the engine" in serve.get("/readyz")[1]
        t0 = time.monotonic()
        rc = serve.stop()
        stopped_in = time.monotonic() - t0
    finally:
        serve.kill()
    assert rc == 0 and stopped_in < 10, (rc, stopped_in, serve.output)
    assert not notify.fields("READY") and notify.fields("STOPPING")
    assert not (tmp_path / "decisions.jsonl").exists()  # nothing was opened, nothing half-written


def test_a_camera_lost_past_give_up_exits_6_for_systemd_to_restart(calibrated_bundle, engine_cache, notify,
                                                                  tmp_path):
    cfg = write_config(tmp_path, calibrated_bundle, engine_cache, fluo="missing_s=600", camera_give_up_s=3)
    serve = Serve(cfg, notify)
    try:
        notify.wait_for("READY", 90, serve.proc)
        rc = serve.proc.wait(30)
        serve._reader.join(5)
    finally:
        serve.kill()
    assert rc == 6, serve.output
    assert "giving up" in serve.output and "fluorescence" in serve.output
    _, decisions = read_log(tmp_path / "decisions.jsonl")  # closed whole
    assert decisions and all(d["state"] == "camera_lost" for d in decisions)


@pytest.mark.parametrize("case", ["unknown [run] key", "unknown [serve] key", "network without token",
                                  "missing bundle", "port in use", "no config"])
def test_bad_input_exits_2_with_one_line_before_ready(case, calibrated_bundle, engine_cache, notify, tmp_path):
    cfg = write_config(tmp_path, calibrated_bundle, engine_cache)
    text = cfg.read_text()
    holder = None
    if case == "unknown [run] key":
        cfg.write_text(text.replace("[run]\n", "[run]\nbundel = 'x'\n"))
    elif case == "unknown [serve] key":
        cfg.write_text(text.replace("[serve]\n", "[serve]\nwatchdog = 3\n"))
    elif case == "network without token":
        cfg.write_text(text.replace('health = "127.0.0.1:0"', 'health = "0.0.0.0:0"'))
    elif case == "missing bundle":
        cfg.write_text(text.replace(str(calibrated_bundle), str(tmp_path / "nowhere")))
    elif case == "port in use":
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        cfg.write_text(text.replace('"127.0.0.1:0"', f'"127.0.0.1:{holder.getsockname()[1]}"'))
    else:
        cfg = tmp_path / "absent.toml"
    try:
        serve = Serve(cfg, notify)
        rc = serve.proc.wait(60)
        serve._reader.join(5)
    finally:
        if holder is not None:
            holder.close()
    errors = [line for line in serve.lines if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, serve.output
    assert not notify.fields("READY")
    expected = {"unknown [run] key": "bundel", "unknown [serve] key": "watchdog", "network without token": "token",
                "missing bundle": "nowhere", "port in use": "in use", "no config": "absent.toml"}[case]
    assert expected in errors[0], errors
