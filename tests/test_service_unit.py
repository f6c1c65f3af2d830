"""edge_pfm.service: the sd_notify protocol spoken to a real socket by a real child process, the watchdog fed by
progress (an injected clock, no sleeps), and the systemd unit rendered and checked by systemd-analyze itself."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import ROOT

from edge_pfm.errors import ExitCode
from edge_pfm.service import unit
from edge_pfm.service.notify import Notifier, WatchdogGate
from edge_pfm.service.unit import DEFAULT_CONFIG, render_unit

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


# ---------------------------------------------------------------- the socket systemd would listen on

@pytest.fixture
def notify_socket():
    """A bound AF_UNIX datagram socket at a short path (sun_path holds 108 bytes: pytest's tmp_path may not fit),
    with SO_PASSCRED on, as systemd's own: each datagram carries the sender's pid."""
    folder = tempfile.mkdtemp(prefix="sdn-")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def receive(sock: socket.socket) -> tuple[str, int]:
    """One datagram: (its text, the sender's pid from SCM_CREDENTIALS)."""
    data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pid = next(int.from_bytes(d[:4], sys.byteorder) for level, kind, d in ancdata
               if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
    return data.decode(), pid


def pending(sock: socket.socket) -> list[str]:
    """Every datagram already queued (a unix datagram is queued by the time sendto returns: no waiting needed)."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(10)


CHILD = """
from edge_pfm.service.notify import Notifier
n = Notifier.from_env()
assert n.enabled
sent = [n.ready(), n.status("engine checked\\nboth cameras pair"), n.watchdog(), n.extend_timeout(2.5), n.stopping()]
print(all(sent), n.watchdog_interval_s)
"""


def run_child(code: str, **env: str) -> subprocess.Popen:
    child_env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**child_env, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_child_process_notifies_the_socket_in_order(notify_socket):
    sock, path = notify_socket
    child = run_child(CHILD, NOTIFY_SOCKET=path, WATCHDOG_USEC="30000000")
    got = [receive(sock) for _ in range(5)]
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert [text for text, _ in got] == ["READY=1", "STATUS=engine checked both cameras pair", "WATCHDOG=1",
                                         "EXTEND_TIMEOUT_USEC=2500000", "STOPPING=1"]
    # sent by the main process itself, as NotifyAccess=main requires (no helper process, no fork)
    assert {pid for _, pid in got} == {child.pid}
    assert out.split() == ["True", "30.0"]  # WATCHDOG_USEC honoured: no WATCHDOG_PID names another process


def test_the_abstract_namespace_form():
    name = f"edge-pfm-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        child = run_child("from edge_pfm.service.notify import Notifier; "
                          "n = Notifier.from_env(); print(n.ready('up'), n.address == '\\0' + n.address[1:])",
                          NOTIFY_SOCKET="@" + name)
        assert sock.recv(4096).decode() == "READY=1\nSTATUS=up"  # one datagram, two fields
        out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.split() == ["True", "True"]


def test_without_notify_socket_every_call_is_a_quiet_no_op():
    n = Notifier.from_env({})
    assert not n.enabled and n.watchdog_interval_s is None
    assert [n.ready(), n.status("x"), n.watchdog(), n.extend_timeout(1), n.stopping()] == [False] * 5


def test_a_notify_socket_that_is_neither_path_nor_abstract_turns_notifications_off(caplog):
    with caplog.at_level(logging.WARNING, logger="edge_pfm.service.notify"):
        n = Notifier.from_env({"NOTIFY_SOCKET": "relative/socket"})
    assert not n.enabled and "relative/socket" in caplog.text


def test_a_vanished_socket_is_logged_once_and_never_raises(notify_socket, caplog):
    sock, path = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.ready()
    sock.close()
    os.unlink(path)  # systemd gone, or its socket re-created elsewhere
    with caplog.at_level(logging.WARNING, logger="edge_pfm.service.notify"):
        assert [n.watchdog(), n.status("still here"), n.stopping()] == [False] * 3
    warnings = [r for r in caplog.records if r.name == "edge_pfm.service.notify"]
    assert len(warnings) == 1 and path in warnings[0].getMessage()


def test_field_names_and_values():
    n = Notifier(None)
    with pytest.raises(ValueError):
        n.send(ready=1)  # systemd's keys are upper case
    with pytest.raises(ValueError):
        n.extend_timeout(0)


def test_status_is_one_line_and_send_keeps_the_order(notify_socket):
    sock, path = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.status("a\r\nb\nc\rd")
    assert n.send(STATUS="x", ERRNO=5) and n.send_raw("RELOADING=1")
    assert pending(sock) == ["STATUS=a b c d", "STATUS=x\nERRNO=5", "RELOADING=1"]


# ---------------------------------------------------------------- the watchdog: fed by progress, not by a timer

def test_watchdog_pid_of_another_process_means_no_watchdog(notify_socket):
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 30.0
    other = Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid() + 1)})  # inherited from a parent
    assert other.enabled and other.watchdog_interval_s is None
    gate = WatchdogGate(other, clock=lambda: 0.0)
    gate.progress()
    assert not gate.enabled and not gate.tick() and pending(sock) == []
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "0"}).watchdog_interval_s is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval_s is None


@pytest.fixture
def gate_on_socket(notify_socket):
    sock, path = notify_socket
    now = [0.0]
    gate = WatchdogGate(Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"}), clock=lambda: now[0])
    return gate, now, sock


def test_no_progress_no_ping(gate_on_socket):
    gate, now, sock = gate_on_socket
    for now[0] in (0.0, 15.0, 30.0, 100.0):  # a runtime stuck in one call: systemd must see silence
        assert not gate.tick()
    assert pending(sock) == []


def test_progress_then_ping(gate_on_socket):
    gate, now, sock = gate_on_socket
    gate.progress()
    assert gate.tick() and pending(sock) == ["WATCHDOG=1"]
    assert not gate.tick(now=100.0)  # the ping consumed the progress
    assert pending(sock) == []


def test_pings_are_rate_limited_to_the_interval_fraction(gate_on_socket):
    gate, now, sock = gate_on_socket
    assert gate.interval_s == 30.0 and gate.min_gap_s == 15.0
    sent = []
    for t in [x * 0.5 for x in range(0, 121)]:  # 60 s, progress on every tick (30 pairs a second, say)
        gate.progress()
        if gate.tick(now=t):
            sent.append(t)
    assert sent == [0.0, 15.0, 30.0, 45.0, 60.0]  # twice per interval, never more
    assert pending(sock) == ["WATCHDOG=1"] * 5


def test_progress_during_the_gap_is_kept_for_the_next_ping(gate_on_socket):
    gate, now, sock = gate_on_socket
    gate.progress()
    assert gate.tick(now=0.0)
    gate.progress()  # one pair at t=1, then the runtime hangs
    assert not gate.tick(now=14.9)
    assert gate.tick(now=15.0)  # the pair at t=1 still earns this ping
    assert not gate.tick(now=30.0) and not gate.tick(now=45.0)  # then silence: systemd fires at 15 + 30 s
    assert pending(sock) == ["WATCHDOG=1"] * 2


def test_the_fraction_is_configurable(notify_socket):
    _, path = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000000"})
    gate = WatchdogGate(n, fraction=0.25, clock=lambda: 0.0)
    assert gate.min_gap_s == 5.0 and gate.tick_period_s == 1.0
    assert WatchdogGate(n, interval_s=2.0).tick_period_s == 0.25  # tick often against a short gap
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError):
            WatchdogGate(n, fraction=bad)


def test_run_until_ticks_until_stopped(gate_on_socket):
    gate, now, sock = gate_on_socket

    class Stop:  # a threading.Event stand-in: wait() advances the clock instead of sleeping, then says stop
        waits = 0

        def wait(self, timeout: float) -> bool:
            assert timeout == gate.tick_period_s
            self.waits += 1
            now[0] += 10.0
            gate.progress()
            return self.waits > 4

    gate.run_until(Stop())  # ticks at 10, 20, 30, 40 s: pings at 10 and 30 (15 s apart at least)
    assert pending(sock) == ["WATCHDOG=1"] * 2


def test_the_gate_is_off_without_systemd():
    gate = WatchdogGate(Notifier.from_env({}))
    gate.progress()
    assert not gate.enabled and not gate.tick(now=1e9)


def test_the_service_room_imports_lean():
    probe = ("import sys, edge_pfm.service, edge_pfm.service.notify, edge_pfm.service.unit; "
             "print([m for m in ('prometheus_client', 'http.server', 'socketserver', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- the unit

def directives(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value in order (systemd allows a key more than once: After=, Environment=)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        assert section is not None and "=" in line, f"not a directive: {raw!r}"
        key, value = line.split("=", 1)
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def one(d: dict[str, list[str]], key: str) -> str:
    assert len(d.get(key, [])) == 1, f"{key}= should appear once, got {d.get(key)}"
    return d[key][0]


def test_the_unit_has_every_directive_it_needs():
    u = directives(render_unit("/usr/local/bin/edge-pfm"))
    assert set(u) == {"Unit", "Service", "Install"}
    unit_, svc = u["Unit"], u["Service"]
    after = " ".join(unit_["After"]).split()
    assert {"nvargus-daemon.service", "network.target", "time-sync.target"} <= set(after)
    for strong in ("Requires", "BindsTo", "Requisite", "Wants", "PartOf"):  # ordering only: harmless where absent
        assert "nvargus-daemon.service" not in " ".join(unit_.get(strong, []))
    assert one(unit_, "StartLimitIntervalSec") == "10min" and one(unit_, "StartLimitBurst") == "5"
    assert "StartLimitIntervalSec" not in svc  # in [Service] systemd ignores it (it is a [Unit] setting)
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30s", "Restart": "on-failure", "RestartSec": "5s",
        "TimeoutStartSec": "3min", "TimeoutStopSec": "30s", "KillSignal": "SIGTERM",
        "User": "edge-pfm", "Group": "edge-pfm", "SupplementaryGroups": "video",
        "StateDirectory": "edge-pfm", "StateDirectoryMode": "0700", "CacheDirectory": "edge-pfm",
        "CacheDirectoryMode": "0700", "LogsDirectory": "edge-pfm", "LogsDirectoryMode": "0750",
        "ProtectSystem": "strict", "ProtectHome": "yes", "NoNewPrivileges": "yes", "PrivateTmp": "no",
        "ExecStart": f"/usr/local/bin/edge-pfm serve --config {DEFAULT_CONFIG}",
    }
    assert {k: one(svc, k) for k in expected} == expected
    assert one(svc, "RestartPreventExitStatus").split() == [str(int(ExitCode.BAD_INPUT))]
    assert "XDG_CACHE_HOME=%C" in svc["Environment"]
    # what would cut the cameras or the GPU off stays out (see the unit's comments)
    for absent in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute",
                   "PrivateUsers", "BindPaths"):
        assert absent not in svc, absent
    assert u["Install"] == {"WantedBy": ["multi-user.target"]}


def test_the_unit_directories_are_where_the_runtime_looks():
    """StateDirectory is the trust state's default, and XDG_CACHE_HOME=%C puts the engine cache in CacheDirectory."""
    from edge_pfm.trust import DEFAULT_STATE_DIR

    svc = directives(render_unit("/usr/local/bin/edge-pfm"))["Service"]
    assert Path("/var/lib") / one(svc, "StateDirectory") == DEFAULT_STATE_DIR
    probe = "from edge_pfm.engine.trt_build import DEFAULT_CACHE_DIR; print(DEFAULT_CACHE_DIR)"
    env = {**os.environ, "XDG_CACHE_HOME": "/var/cache"}  # %C for the system manager
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).parent == Path("/var/cache") / one(svc, "CacheDirectory")


def test_render_escapes_specifiers_and_refuses_what_a_unit_would_split():
    text = render_unit("/opt/edge%pfm/bin/edge-pfm", "/etc/edge-pfm/$site.toml")
    (line,) = [x for x in text.splitlines() if x.startswith("ExecStart=")]
    assert line == "ExecStart=/opt/edge%%pfm/bin/edge-pfm serve --config /etc/edge-pfm/$$site.toml"
    assert "@EXEC@" not in text and "@CONFIG@" not in text
    for bad in ("edge-pfm", "~/bin/edge-pfm", "/opt/my apps/edge-pfm", "/opt/x\n[Service]\nUser=root", '/opt/"x"',
                "/opt/x\\y", "/opt/x\ty"):
        with pytest.raises(ValueError):
            render_unit(bad)
        with pytest.raises(ValueError):
            render_unit("/usr/bin/edge-pfm", config=bad)


def script(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_the_default_executable(monkeypatch, tmp_path):
    on_path = script(tmp_path / "path" / "edge-pfm")
    monkeypatch.setenv("PATH", str(on_path.parent))
    # the console script beside the interpreter (its own environment's, even when another is on $PATH)
    beside = script(tmp_path / "venv" / "bin" / "edge-pfm")
    monkeypatch.setattr(sys, "executable", str(beside.parent / "python3"))
    assert unit.default_command() == [str(beside)]
    # else the one on $PATH
    beside.unlink()
    assert unit.default_command() == [str(on_path)]
    # else this interpreter with -m (a venv's python is a symlink: kept, not resolved, or the venv would be lost)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert unit.default_command() == [str(beside.parent / "python3"), "-m", "edge_pfm"]
    assert f"ExecStart={beside.parent / 'python3'} -m edge_pfm serve --config {DEFAULT_CONFIG}\n" in render_unit()


def test_the_template_ships_as_package_data():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert unit.TEMPLATE in data["tool"]["setuptools"]["package-data"]["edge_pfm.service"]
    assert (ROOT / "edge_pfm" / "service" / unit.TEMPLATE).read_text() == unit.template_text()


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(path)], cwd=path.parent, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt: systemd)")
@pytest.mark.parametrize("form", ["script", "python -m"])
def test_systemd_analyze_verifies_the_rendered_unit(form, tmp_path, monkeypatch):
    if form == "python -m":
        monkeypatch.setattr(unit, "default_command", lambda: [sys.executable, "-m", "edge_pfm"])
    path = tmp_path / "edge-pfm.service"
    if form == "script":  # what a user installs: the unit `edge-pfm service-unit` prints
        script = Path(sys.executable).parent / "edge-pfm"
        printed = subprocess.run([str(script), "service-unit"], capture_output=True, text=True, check=True).stdout
        assert f"ExecStart={script} serve --config {DEFAULT_CONFIG}\n" in printed
        path.write_text(printed)
    else:
        path.write_text(render_unit())  # ExecStart must name a real executable: this environment's
    result = verify(path)
    said = (result.stdout + result.stderr).splitlines()
    assert result.returncode == 0, said
    assert not [line for line in said if "edge-pfm" in line], said  # nothing about our unit, not even a warning


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt: systemd)")
def test_systemd_analyze_would_catch_a_broken_unit(tmp_path):
    """The check above is live: a unit whose executable does not exist, or with a misspelt key, fails it."""
    path = tmp_path / "edge-pfm.service"
    path.write_text(render_unit("/nonexistent/edge-pfm").replace("WatchdogSec=", "WatchdogSecs="))
    result = verify(path)
    said = result.stdout + result.stderr
    assert result.returncode != 0 and "/nonexistent/edge-pfm" in said and "WatchdogSecs" in said
