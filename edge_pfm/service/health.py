"""serve's health routes for the listener: liveness, readiness and the Prometheus metrics, all public on loopback.

    listener = Listener(address, security, health_routes(runner.readiness, metrics))

/healthz  200 "alive" while the process serves HTTP at all. Whether the runtime makes progress is the systemd
          watchdog's question (pings fed by decided pairs), so a hung inference restarts the service instead of
          flapping a probe.
/readyz   200 "ready" when a decision can be made now (engine checked, both cameras pair, outputs writable), else
          503 with the reason in the body: what a person or a load balancer needs to know first.
/metrics  the Prometheus text format; `edge_pfm_ready` is refreshed from the same readiness answer first, so the
          gauge and /readyz never disagree.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from edge_pfm.service.listener import Request, Response, Route
from edge_pfm.service.metrics import ServiceMetrics

_LOG = logging.getLogger(__name__)

Readiness = Callable[[], "tuple[bool, str]"]


def _ask(readiness: Readiness) -> tuple[bool, str]:
    """The readiness answer; a check that raises is 'not ready' with its error, never a 500."""
    try:
        ready, reason = readiness()
    except Exception as exc:
        _LOG.exception("the readiness check failed")
        return False, f"the readiness check failed: {exc}"
    return bool(ready), str(reason)


def health_routes(readiness: Readiness, metrics: ServiceMetrics) -> dict[str, Route]:
    """/healthz, /readyz and /metrics; `readiness()` returns (ready, reason) and is called on every request."""

    def healthz(_: Request) -> Response:
        return Response.text(200, "alive")

    def readyz(_: Request) -> Response:
        ready, reason = _ask(readiness)
        return Response.text(200, "ready") if ready else Response.text(503, f"not ready: {reason or 'unknown'}")

    def metrics_route(_: Request) -> Response:
        metrics.set_ready(_ask(readiness)[0])
        body, content_type = metrics.render()
        return Response(200, body, content_type)

    return {"/healthz": Route(healthz, public=True), "/readyz": Route(readyz, public=True),
            "/metrics": Route(metrics_route, public=True)}
