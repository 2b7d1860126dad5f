"""`nfctl controller`: the asyncio gRPC server, the webhook receiver, metrics, persistence."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.api.nfctl.v1 import nfctl_pb2_grpc as pbg
from nfctl.controller.auth import AuthPolicy, server_credentials
from nfctl.controller.fleet import Fleet
from nfctl.controller.metrics import ControllerMetrics
from nfctl.controller.service import AgentService, FleetService
from nfctl.controller.store import ControllerStore
from nfctl.controller.webhook import WebhookApp

log = logging.getLogger(__name__)

MAX_AGENT_MESSAGE_BYTES = 2 << 20


@dataclass
class ControllerConfig:
    listen: str = "0.0.0.0:9443"
    operator_listen: str | None = None  # TLS without client certs: operators with tokens
    db: Path = Path("/var/lib/nfctl/controller.db")
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    operator_token_file: Path | None = None
    webhook_addr: str | None = "0.0.0.0:9080"
    webhook_secret_file: Path | None = None
    metrics_addr: str | None = "0.0.0.0:9102"
    stale_after: float = 60.0
    flush_interval: float = 0.25
    max_message_bytes: int = MAX_AGENT_MESSAGE_BYTES

    def validate(self) -> None:
        if self.insecure:
            host = self.listen.rpartition(":")[0].strip("[]") or "0.0.0.0"
            try:
                loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(
                    "--insecure (plaintext) is only allowed on a loopback --listen address"
                )
        elif not (self.tls_ca and self.tls_cert and self.tls_key):
            raise ValueError(
                "TLS needs --tls-ca, --tls-cert and --tls-key (or --insecure on loopback)"
            )


def _split(address: str, default_port: int) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return (host or "0.0.0.0"), int(port or default_port)


class Controller:
    def __init__(self, config: ControllerConfig) -> None:
        config.validate()
        self.config = config
        self.store = ControllerStore(config.db)
        self.fleet = Fleet(self.store, stale_after=config.stale_after)
        self.metrics = ControllerMetrics(self.fleet)
        self.auth = AuthPolicy.create(
            tls=not config.insecure, token_file=config.operator_token_file
        )
        self.agents = AgentService(self.fleet, self.auth, self.metrics)
        self.operators = FleetService(self.fleet, self.auth, self.metrics)
        self.servers: list[grpc.aio.Server] = []
        self.runners: list[web.AppRunner] = []
        self.ports: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._health: list[tuple[health.aio.HealthServicer, bool]] = []

    def _grpc_server(self, with_agents: bool) -> grpc.aio.Server:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_concurrent_streams", 200_000),
            ]
        )
        names = [pb.DESCRIPTOR.services_by_name["FleetService"].full_name]
        pbg.add_FleetServiceServicer_to_server(self.operators, server)
        if with_agents:
            pbg.add_AgentServiceServicer_to_server(self.agents, server)
            names.append(pb.DESCRIPTOR.services_by_name["AgentService"].full_name)
        health_servicer = health.aio.HealthServicer()
        from grpc_health.v1 import health_pb2_grpc

        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        self._health.append((health_servicer, with_agents))
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        return server

    async def start(self) -> None:
        cfg = self.config
        main = self._grpc_server(with_agents=True)
        if cfg.insecure:
            self.ports["grpc"] = main.add_insecure_port(cfg.listen)
        else:
            assert cfg.tls_ca and cfg.tls_cert and cfg.tls_key
            creds = server_credentials(
                cfg.tls_ca, cfg.tls_cert, cfg.tls_key, require_client_cert=True
            )
            self.ports["grpc"] = main.add_secure_port(cfg.listen, creds)
        self.servers.append(main)
        if cfg.operator_listen and not cfg.insecure:
            assert cfg.tls_ca and cfg.tls_cert and cfg.tls_key
            ops = self._grpc_server(with_agents=False)
            creds = server_credentials(
                cfg.tls_ca, cfg.tls_cert, cfg.tls_key, require_client_cert=False
            )
            self.ports["operator"] = ops.add_secure_port(cfg.operator_listen, creds)
            self.servers.append(ops)
        for server in self.servers:
            await server.start()
        for servicer, with_agents in self._health:
            services = ["", "nfctl.v1.FleetService"] + (
                ["nfctl.v1.AgentService"] if with_agents else []
            )
            for service in services:
                await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        if cfg.webhook_addr:
            secret = (
                cfg.webhook_secret_file.read_bytes().strip() if cfg.webhook_secret_file else None
            )
            hook = WebhookApp(self.fleet, self.operators.reconcile, secret, self.metrics)
            self.ports["webhook"] = await self._serve_http(hook.app, cfg.webhook_addr, 9080)
        if cfg.metrics_addr:
            app = web.Application()
            app.add_routes([web.get("/metrics", self._metrics), web.get("/healthz", self._healthz)])
            self.ports["metrics"] = await self._serve_http(app, cfg.metrics_addr, 9102)
        self._tasks = [
            asyncio.create_task(self._flush_loop()),
        ]
        log.info(
            "controller listening: grpc %s (%s)%s, webhook %s, metrics %s; %d nodes known",
            cfg.listen,
            "plaintext" if cfg.insecure else "mTLS",
            f", operators {cfg.operator_listen} (TLS + token)" if "operator" in self.ports else "",
            cfg.webhook_addr or "off",
            cfg.metrics_addr or "off",
            len(self.fleet.nodes),
        )

    async def _serve_http(self, app: web.Application, address: str, default_port: int) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = _split(address, default_port)
        site = web.TCPSite(runner, host, port)
        await site.start()
        self.runners.append(runner)
        sockets = getattr(site._server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval)
            nodes, events = self.fleet.take_dirty()
            if nodes or events:
                try:
                    await asyncio.to_thread(self.store.write, nodes, events)
                except Exception:
                    log.exception("writing to the store failed; will retry")
                    for n in nodes:
                        entry = self.fleet.nodes.get(n.name)
                        if entry:
                            entry.dirty = True
                    self.fleet.pending_events[:0] = events

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for servicer, _ in self._health:
            with contextlib.suppress(Exception):
                await servicer.enter_graceful_shutdown()
        for server in self.servers:
            await server.stop(grace=1.0)
        for runner in self.runners:
            await runner.cleanup()
        self.store.write(*self.fleet.take_dirty())
        self.store.close()


async def run(config: ControllerConfig) -> None:
    controller = Controller(config)
    await controller.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("controller stopping at %s", time.strftime("%H:%M:%S"))
    await controller.stop()
