"""The one HTTP listener of `edge-pfm serve`: health (/healthz, /readyz, /metrics) now, the live view (/,
/stream.mjpg, /events, /snapshot.jpg) on the same socket next. Private by default: 127.0.0.1 unless configured.

    listener = Listener(ListenAddress.parse("127.0.0.1:9464"), ListenerSecurity(), health_routes(ready, metrics))
    listener.start()          # binds now: a port in use raises AddressInUseError naming the address and its key
    listener.port             # the bound port (port 0 picks a free one)
    listener.stop()           # returns promptly, even with a stalled streaming client connected

**The rules.** On any address that is not loopback, `start()` refuses unless BOTH a token and TLS (a certificate
and its key) are configured: the view shows patient images and /metrics names the model, and neither leaves the
device in clear text or to anyone who asks. Routes are `public` (health: no token on loopback, where only this
machine can ask) or protected (the view: the token whenever one is configured). On a network address every route,
health included, needs the token; a Prometheus scraper sends it as a bearer header.

**How the token travels.** An `<img src=/stream.mjpg>` or an `EventSource` cannot add a header, so a browser
carries a cookie: `GET /login?token=...` checks the token, sets `edge_pfm_session` (HttpOnly, Secure,
SameSite=Strict, Path=/; its value an HMAC of the token, not the token itself) and redirects (303) to `/`. Machine
clients (Prometheus, curl) send `Authorization: Bearer <token>`. A token in the query of every URL is refused as a
design: query strings end up in access logs, shell and browser history and Referer headers. Only the one-time login
URL carries it, and it is not kept: the access log here never records a query, every response says
`Referrer-Policy: no-referrer`, and the 303 replaces the login URL with `/`. Tokens and cookies are compared with
`hmac.compare_digest`, so the time a wrong guess takes says nothing about the right one.

**Why the standard library.** The device gains no dependency (and no event loop) for a handful of routes;
`http.server.ThreadingHTTPServer` and `ssl` ship with every Python; a stream (MJPEG parts, server-sent events) is
plain writes to a socket. What a bare ThreadingHTTPServer lacks is added here: a cap on connections and on streaming
clients (each holds a thread for as long as it watches), a socket timeout so a client that stops reading or never
finishes its request (or its TLS handshake, done in the worker thread, not in accept) gives its thread back, daemon
threads, and a `stop()` that shuts down every open connection so nothing blocks shutdown. HTTP/1.0: one request per
connection, a stream ends when the connection closes.

`http.server` and `ssl` are imported by `start()`, never by `import edge_pfm.service.listener`: the device's import
stays lean.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import ipaddress
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from edge_pfm.errors import InvalidArgument

_LOG = logging.getLogger(__name__)

HEALTH_KEY = "[serve] health"  # the config key of the address, named in every error about it
TOKEN_KEY = "[serve] token"
TLS_CERT_KEY = "[serve] tls_cert"
TLS_KEY_KEY = "[serve] tls_key"
DEFAULT_ADDRESS = "127.0.0.1:9464"  # 9464: the port OpenTelemetry's Prometheus exporter made the usual one
MIN_TOKEN_CHARS = 16  # e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'` gives 43

LOGIN_PATH = "/login"
SESSION_COOKIE = "edge_pfm_session"
SESSION_MAX_AGE_S = 12 * 3600  # one clinic day; then log in again
# on every response: nothing with a patient or a token in it is cached, sniffed into another type, or referred on
FIXED_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
TEXT = "text/plain; charset=utf-8"

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


class ListenerError(InvalidArgument):
    """The listener cannot be used as configured; the message names the address and the config key."""


class AddressInUseError(ListenerError):
    """Another process (often another edge-pfm serve) already listens on the configured address."""


class InsecureListenerError(ListenerError):
    """A non-loopback address without a token and TLS: refused, patient images do not leave the device in clear."""


# ---------------------------------------------------------------- the address

@dataclass(frozen=True)
class ListenAddress:
    """host:port to bind; `key` is the config key that gave it, for error messages."""

    host: str
    port: int
    key: str = field(default=HEALTH_KEY, compare=False)

    @classmethod
    def parse(cls, text: str, key: str = HEALTH_KEY) -> ListenAddress:
        """'127.0.0.1:9464', 'localhost:9464', '[::1]:9464', '0.0.0.0:9464'. The host is never implied: an empty
        one would mean every interface, which must be asked for by name."""
        form = f"{key} = {text!r}: give host:port, e.g. {DEFAULT_ADDRESS!r} or '[::1]:9464' (IPv6 in brackets)"
        text = text.strip()
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep or not _is_ip(host, version=6):
                raise ListenerError(form)
        else:
            host, sep, port = text.rpartition(":")
            if not sep or not host or ":" in host or not (_is_ip(host) or _HOSTNAME.match(host)):
                raise ListenerError(form)
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ListenerError(f"{form}; the port is 0 to 65535 (0 picks a free one)")
        return cls(host, int(port), key)

    @property
    def is_loopback(self) -> bool:
        """Only this machine can connect: 127.0.0.0/8, ::1 (or ::ffff:127.x) and the name 'localhost'."""
        if self.host.lower() == "localhost":
            return True
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return False  # a name other than localhost: it may resolve to anything, so it counts as the network
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if _is_ip(self.host, version=6) else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _is_ip(host: str, version: int | None = None) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return version is None or ip.version == version


# ---------------------------------------------------------------- token and TLS

@dataclass(frozen=True)
class ListenerSecurity:
    """The token and the TLS files, as configured (None: not configured)."""

    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None

    def check(self, address: ListenAddress) -> None:
        """Raise InsecureListenerError naming what is missing when `address` reaches the network without both a token
        and TLS; ListenerError for half a TLS pair, a missing file or a short token, on any address."""
        token = self.token or None
        if token is not None and len(token) < MIN_TOKEN_CHARS:
            raise ListenerError(f"{TOKEN_KEY} is {len(token)} characters: use at least {MIN_TOKEN_CHARS} random ones "
                                "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if (self.tls_cert is None) != (self.tls_key is None):
            have, lack = (TLS_CERT_KEY, TLS_KEY_KEY) if self.tls_key is None else (TLS_KEY_KEY, TLS_CERT_KEY)
            raise ListenerError(f"{have} is set but {lack} is not: TLS needs the certificate and its private key")
        for key, path in ((TLS_CERT_KEY, self.tls_cert), (TLS_KEY_KEY, self.tls_key)):
            if path is not None and not Path(path).is_file():
                raise ListenerError(f"{key} = {str(path)!r}: no such file")
        if address.is_loopback:
            return
        missing = [k for k, v in ((TOKEN_KEY, token), (TLS_CERT_KEY, self.tls_cert), (TLS_KEY_KEY, self.tls_key))
                   if v is None]
        if missing:
            raise InsecureListenerError(
                f"refusing to listen on {address} ({address.key}): it is not loopback, and off this machine the view "
                f"and metrics need both a token and TLS; missing: {', '.join(missing)}. Set them, or listen on "
                f"127.0.0.1 and reach it through an SSH tunnel")

    def ssl_context(self) -> Any:
        """A server-side ssl.SSLContext (TLS 1.2 or later) with the configured certificate; imports ssl."""
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        except (OSError, ssl.SSLError) as exc:
            raise ListenerError(f"cannot use {TLS_CERT_KEY} = {str(self.tls_cert)!r} with {TLS_KEY_KEY} = "
                                f"{str(self.tls_key)!r}: {exc} (a PEM certificate and the PEM private key that "
                                "matches it, unencrypted)") from exc
        return ctx

    def session_value(self) -> str:
        """The login cookie's value: an HMAC of the token (a leaked cookie does not reveal the token; changing the
        token ends every session)."""
        assert self.token
        return hmac.new(self.token.encode(), b"edge-pfm view session", hashlib.sha256).hexdigest()

    def token_matches(self, candidate: str) -> bool:
        return bool(self.token) and hmac.compare_digest(candidate.encode(), self.token.encode())

    def credentials(self, headers: Mapping[str, str]) -> bool | None:
        """True: a valid bearer token or session cookie; False: one was presented and is wrong; None: none was."""
        presented = None
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            presented = self.token_matches(value.strip())
            if presented:
                return True
        cookie = _cookies(headers.get("cookie", "")).get(SESSION_COOKIE)
        if cookie is not None and self.token:
            if hmac.compare_digest(cookie.encode(), self.session_value().encode()):
                return True
            presented = False
        return presented


def _cookies(header: str) -> dict[str, str]:
    """name -> value from a Cookie header (RFC 6265 §4.2: 'a=b; c=d'); malformed pairs are skipped, not fatal."""
    out: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name:
            out.setdefault(name, value.strip().strip('"'))
    return out


# ---------------------------------------------------------------- requests, responses, routes

@dataclass(frozen=True)
class Request:
    """What a handler sees: the method (GET or HEAD), the path without its query, the query (last value of each
    name), the headers (lower-case names), the peer's address, and `stopping`: set when the listener stops, so a
    stream that waits for frames can wait on it too."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    client: str = ""
    stopping: threading.Event = field(default_factory=threading.Event, repr=False)


@dataclass(frozen=True)
class Response:
    """A whole response: status, body, content type, extra headers."""

    status: int = 200
    body: bytes = b""
    content_type: str = TEXT
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, text: str, headers: Mapping[str, str] | None = None) -> Response:
        return cls(status, (text if text.endswith("\n") else text + "\n").encode(), TEXT, headers or {})


@dataclass(frozen=True)
class StreamingResponse:
    """A long-lived response (MJPEG parts, server-sent events): `chunks` is written as it yields, until it ends, the
    client leaves or the listener stops. A generator's `finally` runs in every case (it is closed)."""

    chunks: Iterable[bytes]
    content_type: str
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Request], "Response | StreamingResponse"]


@dataclass(frozen=True)
class Route:
    """A handler and who may call it. public: no token on a loopback listener (health); otherwise (the default) the
    token is needed whenever one is configured. On a network address every route needs it."""

    handler: Handler
    public: bool = False


def _as_route(value: Route | Handler) -> Route:
    return value if isinstance(value, Route) else Route(value)


# ---------------------------------------------------------------- the listener

class Listener:
    """One HTTP(S) listener for health and the view. Routes are exact paths; GET and HEAD only."""

    def __init__(self, address: ListenAddress, security: ListenerSecurity | None = None,
                 routes: Mapping[str, Route | Handler] | None = None, *, max_streams: int = 4,
                 max_connections: int = 32, io_timeout_s: float = 10.0) -> None:
        if max_streams < 1 or max_connections < 1 or io_timeout_s <= 0:
            raise InvalidArgument(f"max_streams ({max_streams}) and max_connections ({max_connections}) must be at "
                                  f"least 1 and io_timeout_s ({io_timeout_s}) positive")
        self.address = address
        self.security = security or ListenerSecurity()
        self.routes: dict[str, Route] = {}
        self.max_streams = max_streams
        self.max_connections = max_connections
        self.io_timeout_s = io_timeout_s
        self.stopping = threading.Event()
        self._streams = threading.BoundedSemaphore(max_streams)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.add_routes(routes or {})

    def add_routes(self, routes: Mapping[str, Route | Handler]) -> None:
        """Register more paths (the view adds its own to serve's listener) before `start()`; a path twice is a bug."""
        if self._server is not None:
            raise RuntimeError("add routes before start()")
        for path, value in routes.items():
            if not path.startswith("/") or path in self.routes or (path == LOGIN_PATH and self.security.token):
                raise ValueError(f"route {path!r}: paths start with '/' and are registered once "
                                 f"({LOGIN_PATH} is the listener's own when a token is set)")
            self.routes[path] = _as_route(value)

    # -------------------------------------------------------- lifecycle

    def start(self) -> Listener:
        """Check the security rules, bind (raising ListenerError, AddressInUseError for a port in use) and serve in
        a daemon thread."""
        if self._server is not None:
            raise RuntimeError("the listener is started already")
        self.security.check(self.address)
        ctx = self.security.ssl_context() if self.security.tls else None
        server_cls = _server_class(self.address.family)
        try:
            server = server_cls((self.address.host, self.address.port), _handler_class())
        except OSError as exc:
            raise _bind_error(self.address, exc) from exc
        server.listener, server.ssl_context = self, ctx
        server.slots = threading.BoundedSemaphore(self.max_connections)
        server.open_sockets, server.open_lock = set(), threading.Lock()
        self._server = server
        self.stopping.clear()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"edge-pfm-http-{self.port}", daemon=True)
        self._thread.start()
        _LOG.info("listening on %s", self.url)
        return self

    @property
    def port(self) -> int:
        """The bound port (the real one when the address asked for port 0)."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.address.host}]" if ":" in self.address.host else self.address.host
        return f"{'https' if self.security.tls else 'http'}://{host}:{self.port}"

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop accepting, close the listening socket and shut down every open connection (a stalled client's
        blocked write fails at once); worker threads are daemons and end on their own. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        self.stopping.set()
        server.shutdown()  # waits for serve_forever's loop: at most one poll_interval
        server.server_close()
        with server.open_lock:
            open_sockets = list(server.open_sockets)
        for sock in open_sockets:
            # socket.socket's own shutdown: an SSLSocket's would also drop its TLS state under a writer; a socket
            # closed meanwhile raises OSError
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------- per request (worker threads)

    def check_access(self, route: Route, request: Request) -> Response | None:
        """None when `request` may call `route`, else the refusal: 401 without credentials, 403 with wrong ones."""
        if not self.security.token or (route.public and self.address.is_loopback):
            return None  # no token: the security check allowed it only on loopback
        ok = self.security.credentials(request.headers)
        if ok:
            return None
        if ok is None:
            return Response.text(401, f"a token is needed: {LOGIN_PATH}?token=... in a browser, or the header "
                                      "'Authorization: Bearer <token>'",
                                 {"WWW-Authenticate": 'Bearer realm="edge-pfm"'})
        return Response.text(403, "wrong token")

    def login(self, request: Request) -> Response:
        """GET /login?token=...: a right token sets the session cookie and redirects to /."""
        token = request.query.get("token")
        if not token:
            return Response.text(400, f"usage: {LOGIN_PATH}?token=<the token>")
        if not self.security.token_matches(token):
            return Response.text(403, "wrong token")
        cookie = (f"{SESSION_COOKIE}={self.security.session_value()}; Path=/; Max-Age={SESSION_MAX_AGE_S}; "
                  "HttpOnly; Secure; SameSite=Strict")
        return Response.text(303, "logged in", {"Location": "/", "Set-Cookie": cookie})

    def respond(self, request: Request) -> Response | StreamingResponse:
        """Route `request`: login, 404, the access check, then the handler (an exception is a 500, logged)."""
        if request.path == LOGIN_PATH and self.security.token:
            return self.login(request)
        route = self.routes.get(request.path)
        if route is None:
            return Response.text(404, f"no such path: {request.path}")
        refused = self.check_access(route, request)
        if refused is not None:
            return refused
        try:
            response = route.handler(request)
        except Exception:
            _LOG.exception("handler for %s failed", request.path)
            return Response.text(500, "internal error (see the service log)")
        if not isinstance(response, (Response, StreamingResponse)):
            _LOG.error("handler for %s returned %r, not a Response", request.path, type(response).__name__)
            return Response.text(500, "internal error (see the service log)")
        return response

    def stream_slot(self) -> bool:
        """Take a streaming slot if one is free (the caller releases it with `release_stream_slot`)."""
        return self._streams.acquire(blocking=False)

    def release_stream_slot(self) -> None:
        self._streams.release()


def _bind_error(address: ListenAddress, exc: OSError) -> ListenerError:
    where = f"cannot listen on {address} ({address.key})"
    if exc.errno == errno.EADDRINUSE:
        return AddressInUseError(f"{where}: the address is in use (another edge-pfm serve, or another program: "
                                 f"`ss -ltnp 'sport = :{address.port}'` shows which); stop it or choose another "
                                 f"port in {address.key}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ListenerError(f"{where}: {address.host} is not an address of this machine")
    if exc.errno == errno.EACCES:
        return ListenerError(f"{where}: permission denied (ports below 1024 need privileges; use 9464)")
    if isinstance(exc, socket.gaierror):
        return ListenerError(f"{where}: cannot resolve {address.host!r} ({exc})")
    return ListenerError(f"{where}: {exc}")


# ---------------------------------------------------------------- the stdlib server, built on first start()

_CLASSES: dict[Any, Any] = {}


def _server_class(family: socket.AddressFamily) -> Any:
    """ThreadingHTTPServer with daemon threads, a connection cap, TLS in the worker thread and no reverse DNS."""
    if family in _CLASSES:
        return _CLASSES[family]
    import socketserver
    from http.server import ThreadingHTTPServer

    class _Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        block_on_close = False  # server_close() never waits for a client
        request_queue_size = 16
        # set by Listener.start()
        listener: Listener
        ssl_context: Any
        slots: threading.BoundedSemaphore
        open_sockets: set[socket.socket]
        open_lock: threading.Lock

        def server_bind(self) -> None:
            socketserver.TCPServer.server_bind(self)  # not HTTPServer's: its getfqdn() can wait on DNS at boot
            self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

        def process_request(self, request: Any, client_address: Any) -> None:  # the accept thread
            if not self.slots.acquire(blocking=False):
                _LOG.warning("refusing a connection from %s: %d open already", client_address[0],
                             self.listener.max_connections)
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:  # a worker thread
            conn = request
            self._track(conn, True)
            try:
                request.settimeout(self.listener.io_timeout_s)
                if self.ssl_context is not None:
                    conn = self.ssl_context.wrap_socket(request, server_side=True)  # the handshake, timed out
                    self._track(request, False)
                    self._track(conn, True)
                if not self.listener.stopping.is_set():
                    self.finish_request(conn, client_address)
            except OSError as exc:  # ssl.SSLError included: a client that left or spoke no TLS
                _LOG.debug("connection from %s ended: %s", client_address[0], exc)
            except Exception:
                self.handle_error(conn, client_address)
            finally:
                self._track(conn, False)
                self.shutdown_request(conn)
                self.slots.release()

        def _track(self, sock: socket.socket, add: bool) -> None:
            with self.open_lock:
                (self.open_sockets.add if add else self.open_sockets.discard)(sock)

        def handle_error(self, request: Any, client_address: Any) -> None:
            _LOG.exception("error serving %s", client_address[0] if client_address else "?")

    _CLASSES[family] = _Server
    return _Server


def _handler_class() -> Any:
    if "handler" in _CLASSES:
        return _CLASSES["handler"]
    from http.server import BaseHTTPRequestHandler

    class _Handler(BaseHTTPRequestHandler):
        server_version = "edge-pfm"
        sys_version = ""  # no Python version in the Server header
        protocol_version = "HTTP/1.0"  # one request per connection; a stream ends with its connection

        def do_GET(self) -> None:
            self._serve()

        def do_HEAD(self) -> None:
            self._serve()

        def _refuse_method(self) -> None:
            self.close_connection = True
            self._send(Response.text(405, "only GET and HEAD", {"Allow": "GET, HEAD"}))

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

        def _serve(self) -> None:
            listener: Listener = self.server.listener
            parts = urlsplit(self.path)
            request = Request(self.command, parts.path or "/", dict(parse_qsl(parts.query)),
                              {k.lower(): v for k, v in self.headers.items()}, self.client_address[0],
                              listener.stopping)
            response = listener.respond(request)
            if isinstance(response, StreamingResponse):
                self._stream(listener, response)
            else:
                self._send(response)

        def _send(self, response: Response) -> None:
            self.send_response(response.status)
            self._headers(response.content_type, response.headers)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command != "HEAD" and response.body:
                self.wfile.write(response.body)

        def _stream(self, listener: Listener, response: StreamingResponse) -> None:
            chunks = response.chunks
            try:
                if self.command == "HEAD":
                    self._head(response)
                    return
                if not listener.stream_slot():
                    self._send(Response.text(503, f"too many streaming clients (at most {listener.max_streams}); "
                                                  "close another view and retry", {"Retry-After": "5"}))
                    return
                try:
                    self._head(response)
                    for chunk in chunks:
                        if listener.stopping.is_set():
                            break
                        if chunk:
                            self.wfile.write(chunk)
                except OSError as exc:  # the client left, stalled past the timeout, or stop() shut the socket
                    _LOG.debug("stream %s to %s ended: %s", self.path.split("?")[0], self.client_address[0], exc)
                finally:
                    listener.release_stream_slot()
            finally:
                close = getattr(chunks, "close", None)
                if callable(close):
                    close()  # the generator's finally runs now (unsubscribes from frames)
                self.close_connection = True

        def _head(self, response: StreamingResponse) -> None:
            self.send_response(response.status)
            self._headers(response.content_type, response.headers)
            self.end_headers()

        def _headers(self, content_type: str, extra: Mapping[str, str]) -> None:
            self.send_header("Content-Type", content_type)
            fixed = {k.lower() for k in FIXED_HEADERS} | {"content-type", "content-length"}
            for name, value in extra.items():
                if name.lower() not in fixed:
                    self.send_header(name, value)

        def end_headers(self) -> None:
            for name, value in FIXED_HEADERS.items():
                self.send_header(name, value)
            self.send_header("Connection", "close")
            super().end_headers()

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own errors (a malformed request, an unknown method) as plain text with our headers."""
            from http import HTTPStatus

            self.close_connection = True
            try:
                phrase = HTTPStatus(code).phrase
            except ValueError:
                phrase = "error"
            self._send(Response.text(code, message or phrase))

        def log_request(self, code: Any = "-", size: Any = "-") -> None:
            # the path only: a query may hold the login token
            path = getattr(self, "path", "").split("?", 1)[0]
            _LOG.debug("%s %s %s -> %s", self.client_address[0], self.command, path, code)

        def log_message(self, format: str, *args: Any) -> None:
            _LOG.debug("%s: %s", self.client_address[0], format % args)

    _CLASSES["handler"] = _Handler
    return _Handler

