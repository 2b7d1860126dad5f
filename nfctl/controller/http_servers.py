"""The replica's HTTP listeners (aiohttp): serving an app on an address, and the
Prometheus metrics app."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nfctl.controller.metrics import ControllerMetrics


def split_address(address: str, default_port: int) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return (host or "0.0.0.0"), int(port or default_port)


async def serve_http(
    app: web.Application, address: str, default_port: int
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (the port may be 0); returns its runner and the port bound."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = split_address(address, default_port)
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    return runner, int(sockets[0].getsockname()[1]) if sockets else port


def metrics_app(metrics: ControllerMetrics) -> web.Application:
    """/metrics (the replica's Prometheus registry) and /healthz."""

    async def scrape(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.add_routes([web.get("/metrics", scrape), web.get("/healthz", healthz)])
    return app
