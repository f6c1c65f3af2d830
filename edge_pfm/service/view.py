"""The live view: what the clinician sees, in any browser, from the running `run --view` or `serve` ([view]).

    view = LiveView()
    runner = Runner(bundle, white, fluo, view=view)     # a sink, attached like the others
    listener = Listener(address, security, view.routes())

/              the page: the live stream, the class and confidence, the state (gated, no_signal, camera_lost,
               log_failed) and its flags, following /events
/stream.mjpg   the annotated frames (both cameras, the class bar, the lesion map when shown) as MJPEG
               (multipart/x-mixed-replace): every browser plays it in an <img>, no plugin, no WebRTC, no ICE
/events        the decisions as server-sent events: each `data:` is the decision log's record, `id:` its number
/snapshot.jpg  the newest drawn frame

**Frames.** The frames are drawn by the one drawing thread of the video sink (edge_pfm.overlay, at its capped rate,
off the inference thread) and handed here; each is JPEG-encoded once, whoever watches. Every client has its own
latest-frame slot: a stream sends the newest frame whenever its client has taken the previous one, so a slow client
skips frames and a stalled one only holds its own connection (until the listener's socket timeout); nothing here
ever waits for a client, so capture and inference never do. The listener caps the streaming clients.

**Events.** The records go into a bounded ring; each client reads it from its own cursor. A client that falls behind
by more than the ring skips to the oldest kept record and is told how many it missed (an SSE comment); a browser
that reconnects sends Last-Event-ID and resumes after it.

Frame-level timing goes with each MJPEG part as headers (X-Frame-Id, X-Capture-Ns: the pair's capture time on
CLOCK_MONOTONIC), so a client on the same machine measures capture-to-browser latency.
"""
from __future__ import annotations

import collections
import json
import threading
from importlib import resources
from typing import Any

from edge_pfm.runtime.record import DecisionEvent
from edge_pfm.runtime.sinks import Sink
from edge_pfm.service.listener import Request, Response, Route, StreamingResponse

BOUNDARY = "edge-pfm-frame"
JPEG_QUALITY = 80
EVENT_RING = 1024  # records kept for clients that are behind (a minute at 15 pairs/s)
KEEPALIVE_S = 15.0  # an SSE comment this often, so proxies and the browser keep the stream


class ViewSink(Sink):
    """Hands each decision's record to the view's event ring (the frames come from the drawing thread)."""

    def __init__(self, view: LiveView):
        self.view = view

    def write(self, event: DecisionEvent) -> None:
        self.view.publish_record(event.record)


class LiveView:
    def __init__(self, quality: int = JPEG_QUALITY, ring: int = EVENT_RING):
        self.quality = quality
        self._cond = threading.Condition()
        self._jpeg: bytes | None = None
        self._frame_id = 0
        self._capture_ns = 0
        self._events: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=ring)
        self._event_id = 0
        self.stats = collections.Counter()  # frames_encoded, events, event_drops

    # -- what the runtime hands over ---------------------------------------------------------------
    def frame_drawn(self, frame: Any, decision: Any, t_capture_ns: int) -> None:
        """An annotated frame from the drawing thread: encoded once, then every stream sends it."""
        import cv2

        ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            return
        with self._cond:
            self._jpeg, self._capture_ns = buf.tobytes(), t_capture_ns
            self._frame_id += 1
            self.stats["frames_encoded"] += 1
            self._cond.notify_all()

    def publish_record(self, record: dict) -> None:
        data = json.dumps(record, separators=(",", ":"), default=str)
        with self._cond:
            self._event_id = int(record.get("n", self._event_id + 1))
            self._events.append((self._event_id, f"id: {self._event_id}\nevent: decision\ndata: {data}\n\n".encode()))
            self.stats["events"] += 1
            self._cond.notify_all()

    def sink(self) -> ViewSink:
        return ViewSink(self)

    # -- HTTP ---------------------------------------------------------------------------------------
    def routes(self) -> dict[str, Route]:
        return {"/": Route(self._page), "/stream.mjpg": Route(self._stream), "/events": Route(self._events_stream),
                "/snapshot.jpg": Route(self._snapshot)}

    def _page(self, _: Request) -> Response:
        html = resources.files("edge_pfm.service").joinpath("view.html").read_bytes()
        return Response(200, html, "text/html; charset=utf-8",
                        {"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                                    "script-src 'self' 'unsafe-inline'; img-src 'self'"})

    def _snapshot(self, _: Request) -> Response:
        with self._cond:
            jpeg, frame_id, t = self._jpeg, self._frame_id, self._capture_ns
        if jpeg is None:
            return Response.text(503, "no frame drawn yet", {"Retry-After": "1"})
        return Response(200, jpeg, "image/jpeg", {"X-Frame-Id": str(frame_id), "X-Capture-Ns": str(t)})

    def _stream(self, request: Request) -> StreamingResponse:
        def parts():
            sent = 0
            while not request.stopping.is_set():
                with self._cond:
                    self._cond.wait_for(lambda s=sent: self._frame_id != s or request.stopping.is_set(), timeout=1.0)
                    jpeg, frame_id, t = self._jpeg, self._frame_id, self._capture_ns
                if jpeg is None or frame_id == sent:
                    continue
                sent = frame_id
                yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n"
                       f"X-Frame-Id: {frame_id}\r\nX-Capture-Ns: {t}\r\n\r\n").encode() + jpeg + b"\r\n"

        return StreamingResponse(parts(), f"multipart/x-mixed-replace; boundary={BOUNDARY}")

    def _events_stream(self, request: Request) -> StreamingResponse:
        try:
            cursor = int(request.headers.get("last-event-id", "0"))
        except ValueError:
            cursor = 0

        def events():
            nonlocal cursor
            yield b"retry: 2000\n\n"
            with self._cond:
                if not cursor or cursor > self._event_id:  # new, or numbered by a run before a restart: start
                    cursor = self._events[-2][0] if len(self._events) > 1 else 0  # from the newest record
            while not request.stopping.is_set():
                with self._cond:
                    self._cond.wait_for(lambda c=cursor: self._event_id > c or request.stopping.is_set(),
                                        timeout=KEEPALIVE_S)
                    pending = [(i, e) for i, e in self._events if i > cursor]
                    oldest = self._events[0][0] if self._events else 0
                if not pending:
                    yield b": keepalive\n\n"
                    continue
                missed = oldest - cursor - 1 if cursor and oldest > cursor + 1 else 0
                if missed:
                    self.stats["event_drops"] += missed
                    yield f": {missed} decisions skipped (this client fell behind)\n\n".encode()
                cursor = pending[-1][0]
                yield b"".join(e for _, e in pending)

        return StreamingResponse(events(), "text/event-stream", headers={"X-Accel-Buffering": "no"})
