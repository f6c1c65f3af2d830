"""serve: the runtime under supervision: systemd notify, the unit, health and metrics. `edge-pfm serve` is `run`
under systemd (Type=notify): READY=1 once the engine is checked, both cameras pair and the outputs are writable;
WATCHDOG=1 only while the runtime makes progress, so a hung call stops the pings and systemd restarts the service.

    notify.py         the sd_notify protocol (READY, STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC, STOPPING), our own ten lines
                      over an AF_UNIX datagram socket, and WatchdogGate: pings fed by progress, never by a timer
    unit.py           render_unit(): the systemd unit with this installation's executable and config filled in
    edge-pfm.service  the unit template (package data): notify + watchdog, restart limits, least privilege
    listener.py       the health listener on 127.0.0.1: /healthz, /readyz, /metrics
    metrics.py        the Prometheus metrics (the `service` extra: prometheus_client)

Nothing here is imported by `import edge_pfm`, and this file imports nothing: the HTTP server and prometheus_client
are imported only by the modules that serve them.
"""
