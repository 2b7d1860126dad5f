"""The agent's probes, on a port of their own (bound to 127.0.0.1 by default: the kubelet
probes a host-network pod from the node itself, and nothing else needs them).

/healthz (liveness): the reconcile loop still advances. A loop stuck in one pass longer
than the stall limit is restarted by the kubelet; the datapath stays attached.
/readyz (readiness): the agent runs and has adopted (or applied) the datapath. Git and NF
failures are reported in conditions, events and metrics, never here: a Git outage must
not turn a fleet NotReady or block a DaemonSet rollout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from nfctl.agent.metrics import parse_address

log = logging.getLogger(__name__)

DEFAULT_HEALTH_ADDR = "127.0.0.1:9103"

Probe = Callable[[], tuple[bool, str]]


class Heartbeat:
    """Beats once per turn of the reconcile loop."""

    def __init__(self, stall_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_seconds = stall_seconds
        self.clock = clock
        self.last = clock()

    def beat(self) -> None:
        self.last = self.clock()

    def alive(self) -> tuple[bool, str]:
        age = self.clock() - self.last
        if age > self.stall_seconds:
            return False, f"reconcile loop stuck for {age:.0f}s (limit {self.stall_seconds:.0f}s)"
        return True, f"reconcile loop advanced {age:.1f}s ago"


class _Handler(BaseHTTPRequestHandler):
    server: _HealthServer

    def do_GET(self) -> None:
        probe = self.server.probes.get(self.path.split("?", 1)[0])
        if probe is None:
            self._send(404, "not found")
            return
        ok, message = probe()
        self._send(200 if ok else 503, message)

    def _send(self, code: int, text: str) -> None:
        body = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health: " + format, *args)


class _HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], probes: dict[str, Probe]) -> None:
        super().__init__(address, _Handler)
        self.probes = probes


def serve_health(address: str, liveness: Probe, readiness: Probe) -> ThreadingHTTPServer:
    server = _HealthServer(
        parse_address(address, 9103), {"/healthz": liveness, "/readyz": readiness}
    )
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
