"""The sd_notify protocol, implemented here: one AF_UNIX datagram of newline-separated KEY=VALUE lines per message,
sent to the socket named by $NOTIFY_SOCKET (a leading '@' is Linux's abstract namespace). systemd documents the
protocol as a stable interface and recommends reimplementing it over linking libsystemd (sd_notify(3), NOTES).

    notifier = Notifier.from_env()      # a no-op (enabled=False) outside a Type=notify unit
    notifier.extend_timeout(120)        # while the engine builds: push TimeoutStartSec= out
    notifier.ready()                    # engine checked, both cameras pair, outputs writable
    gate = WatchdogGate(notifier)       # the runtime calls gate.progress() on each decided pair
    threading.Thread(target=gate.run_until, args=(stop,), daemon=True).start()
    notifier.stopping()

Sending never raises into the runtime: a socket that is gone (systemd restarted, a test's socket closed) is logged
once and the message dropped; the service manager then acts on its own timeouts, which is the supervision we want.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

_LOG = logging.getLogger(__name__)

# A datagram to a unix socket whose queue is full blocks; systemd drains its queue quickly, but a bounded wait keeps
# a stuck PID 1 from stalling the thread that reports (and dropping READY=1 at once on EAGAIN would be worse).
SEND_TIMEOUT_S = 1.0


def _address(value: str) -> str | None:
    """$NOTIFY_SOCKET -> the address for sendto(): '@name' is the abstract socket '\\0name', '/path' a path; else None."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. systemd 253's vsock:CID:PORT, which a Jetson's systemd does not hand out


def _watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """$WATCHDOG_USEC in seconds, honoured only when $WATCHDOG_PID is absent or names this process (a child that
    inherited the environment must not think it feeds the watchdog: sd_watchdog_enabled(3))."""
    usec, owner = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    if not usec:
        return None
    try:
        if owner is not None and int(owner) != pid:
            return None
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Notifier:
    """sd_notify for one process. Thread-safe (one lock around the socket); every method returns whether the message
    was handed to the socket, never raises. `enabled` is False when $NOTIFY_SOCKET is absent: then all are no-ops."""

    def __init__(self, address: str | None, watchdog_interval_s: float | None = None):
        self.address = address  # '/path' or '\0abstract' (as sendto() takes it), None when disabled
        self.watchdog_interval_s = watchdog_interval_s if address else None
        self._lock = threading.RLock()  # re-entrant: a signal handler may send while the main thread sends
        self._sock: socket.socket | None = None
        self._failed_logged = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        raw = environ.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            _LOG.warning("NOTIFY_SOCKET=%r is not a path or an @abstract name: systemd notifications are off", raw)
        return cls(address, _watchdog_interval(environ, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up is complete (systemd starts its watchdog clock now), with an optional STATUS= line."""
        return self.send(READY=1, **({"STATUS": status} if status is not None else {}))

    def status(self, text: str) -> bool:
        """STATUS=: one line for `systemctl status` (newlines would end the field: they become spaces)."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1, the keep-alive ping. Send it through WatchdogGate, which sends it only after progress."""
        return self.send(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: the service needs `seconds` more for its start (an engine build) or stop; repeat it
        before that runs out. Only while starting or stopping: while running systemd applies it to the watchdog
        too (systemd PR #7214), which would let a hung runtime live longer."""
        if not seconds > 0:
            raise ValueError(f"extend_timeout needs a positive number of seconds, got {seconds!r}")
        return self.send(EXTEND_TIMEOUT_USEC=int(seconds * 1e6))

    def stopping(self) -> bool:
        """STOPPING=1: the service is shutting down on purpose (after SIGTERM), so a silent watchdog is expected."""
        return self.send(STOPPING=1)

    def send(self, **fields: object) -> bool:
        """One datagram with KEY=VALUE per field, in the order given; values are made one line each."""
        lines = []
        for key, value in fields.items():
            if not key or "=" in key or not key.isupper():
                raise ValueError(f"sd_notify field names are upper-case KEY names, got {key!r}")
            text = str(value).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
            lines.append(f"{key}={text}")
        return self.send_raw("\n".join(lines))

    def send_raw(self, message: str) -> bool:
        """`message` as it is, one datagram. False when disabled or when the socket refused it (logged once)."""
        if self.address is None or not message:
            return False
        data = message.encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # not inherited (PEP 446)
                    self._sock.settimeout(SEND_TIMEOUT_S)
                # sendto, not connect: a socket that systemd re-creates (daemon-reexec) is found again by its name
                self._sock.sendto(data, self.address)
                return True
            except OSError as exc:
                if not self._failed_logged:
                    self._failed_logged = True
                    shown = "@" + self.address[1:] if self.address.startswith("\0") else self.address
                    _LOG.warning("systemd notification to %s failed (%s); further failures are not logged", shown, exc)
                return False

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class WatchdogGate:
    """WATCHDOG=1 fed by progress, not by a timer. The runtime calls progress() whenever it decides a pair or reaches
    a deliberate state (a camera being reopened, waiting with both cameras alive); a supervisor thread calls tick()
    every `tick_period_s`. tick() pings at most once per `fraction` x the watchdog interval (0.5: at least two pings
    per interval while progressing), and only if progress() was called since the last ping. A thread stuck in an
    inference call or a camera read makes no progress, the pings stop, and systemd kills and restarts the service:
    a timer thread would keep pinging for a process that is alive and useless."""

    def __init__(self, notifier: Notifier, interval_s: float | None = None, fraction: float = 0.5,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction!r}")
        self.notifier = notifier
        self.interval_s = interval_s if interval_s is not None else notifier.watchdog_interval_s
        self.min_gap_s = self.interval_s * fraction if self.interval_s else None
        self._clock = clock
        self._progressed = False
        self._last_ping: float | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """False when systemd expects no pings (no WatchdogSec=, or $WATCHDOG_PID names another process)."""
        return self.notifier.enabled and self.min_gap_s is not None

    @property
    def tick_period_s(self) -> float:
        """How often to call tick(): often against the gap, so a ping follows progress without much delay."""
        return min(1.0, self.min_gap_s / 4) if self.min_gap_s else 1.0

    def progress(self) -> None:
        """The runtime moved on (a pair decided, a deliberate wait reached). Cheap: called on the hot path."""
        self._progressed = True  # one bool store: atomic under the GIL, no lock on the hot path

    def tick(self, now: float | None = None) -> bool:
        """Ping if progress was made since the last ping and the last ping is at least min_gap_s old; True if sent."""
        if not self.enabled:
            return False
        with self._lock:
            now = self._clock() if now is None else now
            if self._last_ping is not None and now - self._last_ping < self.min_gap_s:
                return False
            if not self._progressed:
                return False
            self._progressed = False  # cleared before the send: progress during the send counts for the next ping
            self._last_ping = now
        return self.notifier.watchdog()

    def run_until(self, stop: threading.Event) -> None:
        """The supervisor loop: tick() every tick_period_s until `stop` is set (run it in a daemon thread)."""
        while not stop.wait(self.tick_period_s):
            self.tick()
