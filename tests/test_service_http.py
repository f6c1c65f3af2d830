"""edge_pfm.service's HTTP listener, health routes and metrics, over real sockets on 127.0.0.1:0 with real clients
(urllib, http.client, raw sockets), TLS with a certificate made here. Nothing binds any address but 127.0.0.1."""
from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge_pfm._lazy import MissingDependencyError
from edge_pfm.errors import ExitCode, InvalidArgument
from edge_pfm.service.health import health_routes
from edge_pfm.service.listener import (
    SESSION_COOKIE,
    AddressInUseError,
    InsecureListenerError,
    ListenAddress,
    Listener,
    ListenerError,
    ListenerSecurity,
    Response,
    Route,
    StreamingResponse,
)

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from edge_pfm.service.metrics import ServiceMetrics  # noqa: E402

LOCAL = ListenAddress.parse("127.0.0.1:0")
TOKEN = "s3cret-token-for-the-tests-0123456789"


def get(url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) for any status: urllib raises on 4xx/5xx, the answer is in the error."""
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5, context=context) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers.items()), err.read()


class Readiness:
    def __init__(self) -> None:
        self.state = (False, "cameras not paired yet")

    def __call__(self) -> tuple[bool, str]:
        return self.state


@pytest.fixture
def health():
    readiness, metrics = Readiness(), ServiceMetrics()
    with Listener(LOCAL, ListenerSecurity(), health_routes(readiness, metrics)) as listener:
        yield listener, readiness, metrics


# ---------------------------------------------------------------- health

def test_healthz_is_alive_with_the_fixed_headers(health):
    listener, _, _ = health
    assert listener.port > 0 and listener.url == f"http://127.0.0.1:{listener.port}"
    status, headers, body = get(f"{listener.url}/healthz")
    assert (status, body) == (200, b"alive\n")
    assert headers["Cache-Control"] == "no-store" and headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer" and "Python" not in headers["Server"]
    status, headers, body = get(f"{listener.url}/healthz", method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", "6")


def test_readyz_gives_the_reason_until_ready(health):
    listener, readiness, metrics = health
    status, _, body = get(f"{listener.url}/readyz")
    assert status == 503 and body == b"not ready: cameras not paired yet\n"
    readiness.state = (True, "")
    assert get(f"{listener.url}/readyz")[::2] == (200, b"ready\n")


def test_a_readiness_check_that_raises_is_not_ready():
    def broken() -> tuple[bool, str]:
        raise RuntimeError("engine gone")

    metrics = ServiceMetrics()
    metrics.set_ready(True)
    with Listener(LOCAL, routes=health_routes(broken, metrics)) as listener:
        status, _, body = get(f"{listener.url}/readyz")
        assert status == 503 and b"engine gone" in body
        assert b"edge_pfm_ready 0.0" in get(f"{listener.url}/metrics")[2]


def test_metrics_count_what_was_observed(health, tmp_path):
    listener, readiness, metrics = health
    for state, cls, latency in [("ok", "cin2plus", 0.041), ("ok", "normal", 0.032), ("ok", "cin2plus", 0.12),
                                ("gated", None, 0.02), ("no_signal", None, None)]:
        metrics.observe_decision(state, cls, latency)
    for _ in range(7):
        metrics.camera_event("white_light", "frames")
    metrics.camera_event("fluorescence", "drops")
    metrics.camera_event("fluorescence", "reopens")
    metrics.gate_rejected("blur")
    metrics.gate_rejected("blur")
    metrics.set_outputs({"log": tmp_path / "not-yet" / "decisions.jsonl"})
    metrics.set_bundle(version=7, key_id="ab12", precision="int8", backend="tensorrt", model="pfm_tiny")
    metrics.set_camera_lost("fluorescence", True)
    readiness.state = (True, "")
    with pytest.raises(ValueError, match="frames, drops, stalls, reopens"):
        metrics.camera_event("white_light", "explosions")

    status, headers, body = get(f"{listener.url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("edge_pfm_pairs_decided_total") == 5
    assert value("edge_pfm_decisions_total", state="ok", cls="cin2plus") == 2
    assert value("edge_pfm_decisions_total", state="gated", cls="none") == 1
    assert value("edge_pfm_decision_latency_seconds_count") == 4  # the one without a latency is not timed
    assert value("edge_pfm_decision_latency_seconds_sum") == pytest.approx(0.213)
    assert value("edge_pfm_decision_latency_seconds_bucket", le="0.05") == 3
    assert value("edge_pfm_pairs_per_second") == pytest.approx(5 / 10)  # 5 pairs in the 10 s window
    assert value("edge_pfm_camera_frames_total", camera="white_light") == 7
    assert value("edge_pfm_camera_drops_total", camera="fluorescence") == 1
    assert value("edge_pfm_camera_reopens_total", camera="fluorescence") == 1
    assert value("edge_pfm_gate_rejections_total", gate="blur") == 2
    assert value("edge_pfm_disk_free_bytes", output="log") > 0  # the nearest existing folder's filesystem
    assert value("edge_pfm_process_resident_memory_bytes") > 1 << 20
    assert value("edge_pfm_bundle_info", version="7", key_id="ab12", precision="int8", backend="tensorrt",
                 model="pfm_tiny") == 1
    assert value("edge_pfm_ready") == 1  # refreshed from readiness on scrape
    assert value("edge_pfm_camera_lost", camera="fluorescence") == 1


def test_pairs_per_second_forgets_pairs_older_than_the_window():
    now = [100.0]
    metrics = ServiceMetrics(window_s=4.0, clock=lambda: now[0])
    for _ in range(8):
        metrics.observe_decision("ok", "normal", 0.03)
    now[0] += 2.0
    for _ in range(4):
        metrics.observe_decision("ok", "normal", 0.03)
    assert metrics._pairs_per_second() == pytest.approx(12 / 4)
    now[0] += 3.0  # the first 8 are 5 s old now
    assert metrics._pairs_per_second() == pytest.approx(4 / 4)


def test_two_service_metrics_do_not_collide():
    a, b = ServiceMetrics(), ServiceMetrics()  # own registries: no 'Duplicated timeseries'
    a.observe_decision("ok", "normal", 0.01)
    assert b"edge_pfm_pairs_decided_total 0.0" in b.render()[0]


def test_missing_prometheus_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    with pytest.raises(MissingDependencyError, match=r"edge-pfm\[service\]") as err:
        ServiceMetrics()
    assert err.value.exit_code == ExitCode.UNAVAILABLE


# ---------------------------------------------------------------- routing

def test_unknown_paths_are_404_and_other_methods_405(health):
    listener, _, _ = health
    status, headers, body = get(f"{listener.url}/nope?x=1")
    assert (status, body) == (404, b"no such path: /nope\n") and headers["Cache-Control"] == "no-store"
    status, headers, _ = get(f"{listener.url}/healthz", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD" and headers["X-Content-Type-Options"] == "nosniff"


def test_a_failing_handler_is_a_500_and_the_listener_goes_on():
    def boom(_):
        raise RuntimeError("bug")

    with Listener(LOCAL, routes={"/boom": boom, "/ok": lambda _: Response.text(200, "fine")}) as listener:
        assert get(f"{listener.url}/boom")[0] == 500
        assert get(f"{listener.url}/ok")[::2] == (200, b"fine\n")


# ---------------------------------------------------------------- addresses and the security rules

def test_listen_address_parsing():
    assert ListenAddress.parse("127.0.0.1:9464") == ListenAddress("127.0.0.1", 9464)
    assert ListenAddress.parse("[::1]:0").is_loopback and str(ListenAddress.parse("[::1]:80")) == "[::1]:80"
    assert ListenAddress.parse("localhost:9464").is_loopback
    assert ListenAddress.parse("[::ffff:127.0.0.1]:1").is_loopback
    for text in ("0.0.0.0:9464", "[::]:9464", "192.168.1.20:9464", "colposcope.local:9464"):
        assert not ListenAddress.parse(text).is_loopback, text
    for bad in ("9464", ":9464", "::1:9464", "127.0.0.1:65536", "127.0.0.1:x", "[::1]9464", "bad host:1"):
        with pytest.raises(ListenerError, match=r"\[serve\] health"):
            ListenAddress.parse(bad)


def test_a_network_address_needs_a_token_and_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("x")
    anywhere = ListenAddress.parse("0.0.0.0:0")  # checked, never bound
    cases = {
        ListenerSecurity(): "missing: [serve] token, [serve] tls_cert, [serve] tls_key.",
        ListenerSecurity(token=TOKEN): "missing: [serve] tls_cert, [serve] tls_key.",
        ListenerSecurity(tls_cert=cert, tls_key=key): "missing: [serve] token.",
    }
    for security, missing in cases.items():
        with pytest.raises(InsecureListenerError, match=re.escape(missing)) as err:
            security.check(anywhere)
        assert "0.0.0.0:0 ([serve] health)" in str(err.value)
        assert isinstance(err.value, InvalidArgument) and err.value.exit_code == ExitCode.BAD_INPUT
    ListenerSecurity(TOKEN, cert, key).check(anywhere)  # both: allowed
    ListenerSecurity().check(LOCAL)  # loopback needs neither
    with pytest.raises(ListenerError, match="tls_key is not"):
        ListenerSecurity(TOKEN, cert, None).check(LOCAL)
    with pytest.raises(ListenerError, match="no such file"):
        ListenerSecurity(TOKEN, cert, tmp_path / "absent.pem").check(anywhere)
    with pytest.raises(ListenerError, match="at least 16"):
        ListenerSecurity("short").check(LOCAL)
    with pytest.raises(InsecureListenerError):  # and start() checks before it binds anything
        Listener(anywhere, ListenerSecurity(TOKEN)).start()


def test_a_port_in_use_names_the_address_and_the_key():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AddressInUseError, match=rf"127\.0\.0\.1:{port} \(\[serve\] health\).*in use") as err:
            Listener(ListenAddress.parse(f"127.0.0.1:{port}")).start()
    assert isinstance(err.value, InvalidArgument)


# ---------------------------------------------------------------- the token, over TLS

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1 (IP SAN: what a client's hostname check compares)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-pfm test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def client_tls(tls_files) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files[0]))  # trusts this certificate, checks the hostname


def test_protected_routes_need_the_token_by_bearer_or_login_cookie(tls_files, client_tls, caplog):
    caplog.set_level("DEBUG", logger="edge_pfm.service.listener")
    view = Route(lambda _: Response(200, b"<html>view</html>", "text/html; charset=utf-8"))
    readiness = Readiness()
    routes = {"/": view, **health_routes(readiness, ServiceMetrics())}
    with Listener(LOCAL, ListenerSecurity(TOKEN, *tls_files), routes) as listener:
        url = listener.url
        assert url.startswith("https://127.0.0.1:")

        status, headers, _ = get(f"{url}/", context=client_tls)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert get(f"{url}/", {"Authorization": "Bearer wrong-token-0123456789"}, client_tls)[0] == 403
        assert get(f"{url}/", {"Authorization": f"Bearer {TOKEN}"}, client_tls)[::2] == (200, b"<html>view</html>")
        assert get(f"{url}/healthz", context=client_tls)[0] == 200  # health is public on loopback

        # the browser's way: /login sets the cookie and redirects (http.client: no redirect, no cookie jar)
        conn = http.client.HTTPSConnection("127.0.0.1", listener.port, context=client_tls, timeout=5)
        conn.request("GET", f"/login?token={TOKEN}")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 303 and resp.getheader("Location") == "/"
        cookie = resp.getheader("Set-Cookie")
        attributes = [a.strip() for a in cookie.split(";")]
        assert {"HttpOnly", "Secure", "SameSite=Strict", "Path=/"} <= set(attributes)
        session = attributes[0]
        assert session.startswith(f"{SESSION_COOKIE}=") and TOKEN not in session  # an HMAC, not the token
        assert get(f"{url}/", {"Cookie": f"theme=dark; {session}"}, client_tls)[0] == 200
        assert get(f"{url}/", {"Cookie": f"{SESSION_COOKIE}=forged"}, client_tls)[0] == 403
        assert get(f"{url}/login?token=wrong-token-0123456789", context=client_tls)[0] == 403
        assert get(f"{url}/login", context=client_tls)[0] == 400

        with pytest.raises(ssl.SSLError), socket.create_connection(("127.0.0.1", listener.port), 5) as raw, \
                ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1"):
            pass  # a client that does not trust the certificate gets no further
        assert get(f"{url}/healthz", context=client_tls)[0] == 200  # and the listener goes on
    assert "GET /login -> 303" in caplog.text and TOKEN not in caplog.text  # the access log drops queries


def test_no_token_on_loopback_leaves_protected_routes_open_and_no_login():
    with Listener(LOCAL, routes={"/": lambda _: Response.text(200, "view")}) as listener:
        assert get(f"{listener.url}/")[0] == 200
        assert get(f"{listener.url}/login?token=x")[0] == 404


# ---------------------------------------------------------------- streams

def _stalled_stream_route(ended: threading.Event, count: list[int]):
    def stream(_):
        def chunks():
            try:
                while True:
                    yield b"x" * 65536
                    count[0] += 1
            finally:
                ended.set()

        return StreamingResponse(chunks(), "application/octet-stream")

    return stream


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_a_stalled_stream_client_does_not_block_stop(tls, tls_files, client_tls):
    ended, count = threading.Event(), [0]
    security = ListenerSecurity(None, *tls_files) if tls else ListenerSecurity()
    listener = Listener(LOCAL, security, {"/stream": _stalled_stream_route(ended, count)}, io_timeout_s=60).start()
    idle = socket.create_connection(("127.0.0.1", listener.port), 5)  # connects, never sends a request
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast; then never read
    stalled.connect(("127.0.0.1", listener.port))
    conn = client_tls.wrap_socket(stalled, server_hostname="127.0.0.1") if tls else stalled
    try:
        conn.sendall(b"GET /stream HTTP/1.0\r\nHost: x\r\n\r\n")
        last, deadline = -1, time.monotonic() + 10
        while count[0] != last and time.monotonic() < deadline:  # until the server's writes block
            last = count[0]
            time.sleep(0.3)
        assert count[0] == last and not ended.is_set()
        t0 = time.monotonic()
        listener.stop()
        assert time.monotonic() - t0 < 2.0
        assert ended.wait(2.0)  # the blocked write failed and the generator was closed: no thread left behind
    finally:
        listener.stop()
        conn.close()
        idle.close()


def test_streaming_clients_are_capped():
    def ticks(request):
        def chunks():
            while not request.stopping.wait(0.02):
                yield b"data: tick\n\n"

        return StreamingResponse(chunks(), "text/event-stream")

    with Listener(LOCAL, routes={"/events": ticks}, max_streams=1) as listener:
        first = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=5)
        first.request("GET", "/events")
        resp = first.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        assert resp.getheader("Cache-Control") == "no-store"
        assert resp.read(12) == b"data: tick\n\n"

        status, headers, body = get(f"{listener.url}/events")
        assert status == 503 and b"at most 1" in body and headers["Retry-After"]
        assert get(f"{listener.url}/events", method="HEAD")[0] == 200  # headers only: takes no slot

        first.close()  # the slot comes back once the server's next write fails
        deadline = time.monotonic() + 5
        while True:
            again = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=5)
            again.request("GET", "/events")
            resp = again.getresponse()
            if resp.status == 200 or time.monotonic() > deadline:
                break
            again.close()
            time.sleep(0.05)
        assert resp.status == 200
        again.close()


def test_connections_past_the_cap_are_closed_at_once():
    with Listener(LOCAL, routes={"/ok": lambda _: Response.text(200, "fine")}, max_connections=1) as listener:
        idle = socket.create_connection(("127.0.0.1", listener.port), 5)  # holds the one slot, sends nothing
        with socket.create_connection(("127.0.0.1", listener.port), 5) as extra:
            extra.sendall(b"GET /ok HTTP/1.0\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):  # closed without an answer, not queued behind it
                assert extra.recv(100) == b""
        idle.close()  # its worker reads EOF and gives the slot back
        deadline = time.monotonic() + 5
        while True:
            try:
                assert get(f"{listener.url}/ok")[0] == 200
                break
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


# ---------------------------------------------------------------- lean imports

def test_import_edge_pfm_service_stays_lean():
    heavy = ("http.server", "socketserver", "ssl", "prometheus_client")
    probe = ("import sys, edge_pfm.service, edge_pfm.service.listener, edge_pfm.service.health, "
             f"edge_pfm.service.metrics; print([m for m in {heavy!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
