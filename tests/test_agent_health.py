"""The agent's probe server: liveness follows the reconcile loop's heartbeat, readiness is
whatever the agent says; both on their own port, over real HTTP."""

from __future__ import annotations

import urllib.error
import urllib.request

from nfctl.agent.health import Heartbeat, serve_health


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_liveness_fails_when_the_loop_stops_advancing() -> None:
    now = [1000.0]
    beat = Heartbeat(stall_seconds=60, clock=lambda: now[0])
    ready = [False, "adopting the datapath"]
    server = serve_health("127.0.0.1:0", beat.alive, lambda: (bool(ready[0]), str(ready[1])))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _get(base + "/healthz")[0] == 200
        code, body = _get(base + "/readyz")
        assert code == 503 and "adopting" in body
        now[0] += 59
        assert _get(base + "/healthz")[0] == 200
        now[0] += 2  # one pass has now taken 61 s
        code, body = _get(base + "/healthz")
        assert code == 503 and "stuck for 61s" in body
        beat.beat()
        assert _get(base + "/healthz")[0] == 200
        ready[:] = [True, "datapath adopted"]
        assert _get(base + "/readyz") == (200, "datapath adopted\n")
        assert _get(base + "/metrics")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
