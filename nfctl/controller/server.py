"""`nfctl controller`: the asyncio gRPC server, the webhook receiver, metrics, persistence."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import resource
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.auth import AuthPolicy, OperatorTokenGate, server_credentials
from nfctl.controller.commands import CommandFanout
from nfctl.controller.fleet import Fleet, NodeEntry
from nfctl.controller.leader import LeaderElection
from nfctl.controller.metrics import ControllerMetrics
from nfctl.controller.reflection import enable_reflection
from nfctl.controller.rollout.engine import RolloutEngine
from nfctl.controller.rollout.gitrepo import RepoMirror, redact
from nfctl.controller.rollout.metrics import RolloutMetrics
from nfctl.controller.service import AgentService, FleetService, add_service
from nfctl.controller.storage import open_store
from nfctl.controller.store_pg import PgStore
from nfctl.controller.webhook import WebhookApp

log = logging.getLogger(__name__)

MAX_AGENT_MESSAGE_BYTES = 2 << 20
# grpc.aio takes new calls from gRPC core one at a time; calls core holds meanwhile are
# "pending". Core's defaults (1,000 soft / 3,000 hard, 30 s) shed most of a reconnect storm
# of thousands of agents (they see CANCELLED and back off); a queue that big is fine here.
MAX_PENDING_CALLS = 100_000
MAX_UNREQUESTED_SECONDS = 300
# The operator token listener takes connections without client certificates: anyone who
# can reach it gets this much before the token is checked (OperatorTokenGate refuses a call
# without it at once). Operators run a few calls and watches each.
OPERATOR_MAX_STREAMS = 16
OPERATOR_LISTENER_LIMITS = [
    ("grpc.max_concurrent_streams", OPERATOR_MAX_STREAMS),
    ("grpc.max_allowed_incoming_connections", 256),
    ("grpc.server.max_pending_requests", 64),
    ("grpc.server.max_pending_requests_hard_limit", 128),
    ("grpc.server_max_unrequested_time_in_server", 5),
    ("grpc.server_handshake_timeout_ms", 10_000),
]
# HTTP/2 BDP probing answers received data with PINGs to size flow-control windows for bulk
# transfers. Agents send a few KB every few seconds, well inside the default window; with
# 10,000 connections the probes cost gRPC's threads ~40% more CPU for nothing.
BDP_PROBE = 0
# TLS: the size of the buffer each connection's frame protector keeps (default 16 KB).
# Agent messages are a few KB; 4 KB records save ~12 KB a connection (120 MB at 10,000).
TLS_FRAME_BYTES = 4096


@dataclass
class ControllerConfig:
    listen: str = "0.0.0.0:9443"
    operator_listen: str | None = None  # TLS without client certs: operators with tokens
    db: str = "/var/lib/nfctl/controller.db"  # a SQLite file, or a postgresql:// URL
    replica: str = ""  # this replica's name with a shared store [default: host-pid]
    sync_interval: float = 0.5  # shared store: how often to read what other replicas wrote
    leader_interval: float = 1.0  # shared store: leader lock tries and checks
    event_retention: float = 0.0  # seconds of events and commands to keep; 0 keeps all
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    operator_token_file: Path | None = None
    webhook_addr: str | None = "0.0.0.0:9080"
    webhook_secret_file: Path | None = None
    metrics_addr: str | None = "0.0.0.0:9102"
    # plaintext gRPC health only (probes, load balancers): no client certificate, no fleet data
    health_addr: str | None = "0.0.0.0:9444"
    stale_after: float = 60.0
    heartbeat: float | None = None  # default stale_after / HEARTBEATS_PER_STALE
    flush_interval: float = 0.25
    status_persist_interval: float = 30.0  # heartbeat-only reports; see fleet.py
    gc_freeze_interval: float = 0.1
    gc_compact_interval: float = 3600.0
    max_message_bytes: int = MAX_AGENT_MESSAGE_BYTES
    # Rollouts (docs/rollouts.md): the NF repository the agents follow, read by the
    # controller itself to learn revisions and their RolloutPolicy. None: no rollouts.
    source_url: str | None = None
    source_ref: str = "main"
    source_path: str = ""  # the folder of the repository the agents follow
    source_interval: float = 30.0  # seconds between fetches (a webhook fetches at once)
    repo_dir: Path | None = None  # the bare mirror [default: next to a SQLite db]
    prometheus_url: str | None = None  # for promql gates without their own url
    rollout_tick: float = 1.0  # seconds between two steps of the rollout engine

    def validate(self) -> None:
        if self.source_interval <= 0 or self.rollout_tick <= 0:
            raise ValueError("--source-interval and --rollout-tick must be positive")
        if self.stale_after <= 0:
            raise ValueError("--stale-after must be positive")
        if self.heartbeat is not None and not 0 < self.heartbeat * 2 <= self.stale_after:
            raise ValueError(
                f"--heartbeat {self.heartbeat:g} s must be positive and at most half of "
                f"--stale-after {self.stale_after:g} s: a node is stale only after it missed "
                "heartbeats, never between two"
            )
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
    """One `nfctl controller` replica: opens the store, holds the fleet, serves the agent and
    operator gRPC services, the webhook and metrics, and flushes state to the store."""

    def __init__(self, config: ControllerConfig) -> None:
        config.validate()
        self.config = config
        self.replica = config.replica or f"{socket.gethostname()}-{os.getpid()}"
        self.store = open_store(config.db, replica=self.replica)
        self.pg = self.store if isinstance(self.store, PgStore) else None
        persist_interval = config.status_persist_interval
        if self.pg:
            # other replicas judge staleness (and the leader releases nodes) from the
            # stored last_seen: refresh it well within stale_after
            persist_interval = min(persist_interval, config.stale_after / 3)
        self.fleet = Fleet(
            self.store,
            stale_after=config.stale_after,
            persist_interval=persist_interval,
            heartbeat=config.heartbeat,
            replica=self.replica if self.pg else None,
        )
        self.metrics = ControllerMetrics(self.fleet)
        self.auth = AuthPolicy.create(
            tls=not config.insecure, token_file=config.operator_token_file
        )
        self.fanout = CommandFanout(self.fleet, self.pg) if self.pg else None
        self.election: LeaderElection | None = None
        if self.pg:
            self.election = LeaderElection(
                self.pg.url, self._leadership, self._leader_duty, config.leader_interval
            )
        else:
            self.metrics.leader.set(1)
        self._leader_epoch = uuid.uuid4().hex[:12]
        self._leader_events = 0
        self.agents = AgentService(self.fleet, self.auth, self.metrics, self.fanout)
        self.operators = FleetService(self.fleet, self.auth, self.metrics, self.fanout)
        self.rollouts = self._rollout_engine()
        self.agents.rollouts = self.operators.rollouts = self.rollouts
        self.servers: list[grpc.aio.Server] = []
        self.runners: list[web.AppRunner] = []
        self.ports: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._health: list[tuple[health.aio.HealthServicer, bool]] = []
        self._probe_health: health.aio.HealthServicer | None = None

    def _rollout_engine(self) -> RolloutEngine | None:
        cfg = self.config
        if not cfg.source_url:
            return None
        directory = cfg.repo_dir or (
            Path(cfg.db).parent / "rollout-repo"
            if self.pg is None
            else Path("/var/lib/nfctl/rollout-repo")
        )
        mirror = RepoMirror(cfg.source_url, cfg.source_ref, directory, cfg.source_path)
        log.info(
            "rollouts: following %s ref %s%s (mirror in %s), fetched every %g s",
            redact(cfg.source_url),
            cfg.source_ref,
            f" path {cfg.source_path}" if cfg.source_path else "",
            directory,
            cfg.source_interval,
        )

        async def send(
            entries: list[NodeEntry], command: pb.Command
        ) -> tuple[list[str], list[str]]:
            return await self.operators._send(entries, command, "approve")

        def is_leader() -> bool:
            return self.election is None or self.election.leader

        return RolloutEngine(
            self.fleet,
            mirror,
            send,
            prometheus_url=cfg.prometheus_url,
            fetch_interval=cfg.source_interval,
            tick=cfg.rollout_tick,
            is_leader=is_leader,
            metrics=RolloutMetrics(self.metrics.registry, self.fleet, is_leader),
        )

    async def _webhook_reconcile(
        self, entries: list[NodeEntry], revision: str, reason: str
    ) -> tuple[list[str], list[str]]:
        """A push: the rollout engine fetches now; agents are told to reconcile (under a
        policy they fetch, and apply only what is approved)."""
        if self.rollouts is not None:
            self.rollouts.poke()
        return await self.operators.reconcile(entries, revision, reason)

    def _grpc_server(self, with_agents: bool) -> grpc.aio.Server:
        if with_agents:
            limits: list[tuple[str, int]] = [
                ("grpc.max_concurrent_streams", 200_000),
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
                ("grpc.server_max_unrequested_time_in_server", MAX_UNREQUESTED_SECONDS),
            ]
            interceptors: list[grpc.aio.ServerInterceptor] = []
        else:
            limits = OPERATOR_LISTENER_LIMITS
            interceptors = [OperatorTokenGate(self.auth)]
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.config.max_message_bytes),
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                *limits,
                ("grpc.http2.bdp_probe", BDP_PROBE),
                ("grpc.tsi.max_frame_size", TLS_FRAME_BYTES),
            ],
            interceptors=interceptors,
        )
        names = [pb.DESCRIPTOR.services_by_name["FleetService"].full_name]
        add_service("FleetService", self.operators, server)
        if with_agents:
            add_service("AgentService", self.agents, server)
            names.append(pb.DESCRIPTOR.services_by_name["AgentService"].full_name)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        self._health.append((health_servicer, with_agents))
        enable_reflection([*names, health.SERVICE_NAME], server)
        return server

    def _health_server(self) -> grpc.aio.Server:
        """Plaintext, no client certificate: grpc.health.v1.Health and nothing else (no
        reflection, no fleet service), for kubelet `grpc:` probes and load balancers."""
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4096)])
        self._probe_health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._probe_health, server)
        return server

    async def _set_probe_health(self) -> None:
        if self._probe_health is None:
            return
        try:
            await asyncio.to_thread(self.store.ping)
            serving = health_pb2.HealthCheckResponse.SERVING
        except Exception as exc:
            log.error("store unusable: %s", exc)
            serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "nfctl.v1.AgentService", "nfctl.v1.FleetService"):
            await self._probe_health.set(service, serving)

    async def _health_loop(self, every: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every)
            await self._set_probe_health()

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
        if cfg.health_addr:
            probes = self._health_server()
            self.ports["health"] = probes.add_insecure_port(cfg.health_addr)
            self.servers.append(probes)
        for server in self.servers:
            await server.start()
        await self._set_probe_health()
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
            hook = WebhookApp(self.fleet, self._webhook_reconcile, secret, self.metrics)
            self.ports["webhook"] = await self._serve_http(hook.app, cfg.webhook_addr, 9080)
        if cfg.metrics_addr:
            app = web.Application()
            app.add_routes([web.get("/metrics", self._metrics), web.get("/healthz", self._healthz)])
            self.ports["metrics"] = await self._serve_http(app, cfg.metrics_addr, 9102)
        self._tasks = [
            asyncio.create_task(self._flush_loop()),
            asyncio.create_task(self._session_log_loop()),
            asyncio.create_task(self._gc_loop()),
            asyncio.create_task(self._health_loop()),
        ]
        if self.rollouts is not None:
            self._tasks.append(asyncio.create_task(self.rollouts.run()))
        if self.fanout is not None and self.election is not None:
            self._tasks += [
                asyncio.create_task(self._sync_loop()),
                asyncio.create_task(self.fanout.run()),
                asyncio.create_task(self.fanout.run_results()),
                asyncio.create_task(self.election.run()),
            ]
        log.info(
            "controller listening: grpc %s (%s)%s, webhook %s, metrics %s, health %s; "
            "%d nodes known; store %s",
            cfg.listen,
            "plaintext" if cfg.insecure else "mTLS",
            f", operators {cfg.operator_listen} (TLS + token)" if "operator" in self.ports else "",
            cfg.webhook_addr or "off",
            cfg.metrics_addr or "off",
            cfg.health_addr or "off",
            len(self.fleet.nodes),
            f"PostgreSQL, replica {self.replica}" if self.pg else "SQLite",
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
            try:
                await self.fleet.flush_async()
            except Exception as exc:
                log.error("writing to the store failed (%s); will retry", exc)

    async def _sync_loop(self) -> None:
        """Shared store: take in the nodes other replicas wrote, so any replica shows the
        whole fleet."""
        assert self.pg is not None
        change = 0
        while True:
            try:
                rows, change = await asyncio.to_thread(self.pg.changed_nodes, change)
                self.fleet.merge(rows)
            except Exception as exc:
                log.warning("reading the fleet from the store failed: %s", exc)
            await asyncio.sleep(self.config.sync_interval)

    def _leadership(self, leader: bool) -> None:
        self.metrics.leader.set(1 if leader else 0)
        reason = "LeaderElected" if leader else "LeadershipLost"
        message = (
            f"replica {self.replica} now runs the singletons (stale streams, retention)"
            if leader
            else f"replica {self.replica} no longer leads"
        )
        log.warning("%s", message)
        self._leader_events += 1
        event = pb.Event(
            node=f"controller/{self.replica}",
            epoch=self._leader_epoch,
            sequence=self._leader_events,
            time=time.time(),
            type="Normal" if leader else "Warning",
            reason=reason,
            message=message,
        )
        self.fleet.pending_events.append(event)
        self.fleet.publish([event])

    async def _leader_duty(self) -> None:
        assert self.pg is not None
        now = time.time()
        released = await asyncio.to_thread(self.pg.release_stale, now - self.config.stale_after)
        if released:
            log.warning(
                "%d nodes had no report for %.0f s from the replica holding them: shown as "
                "disconnected",
                len(released),
                self.config.stale_after,
            )
        if self.config.event_retention > 0:
            await asyncio.to_thread(self.pg.expire, now - self.config.event_retention)

    async def _gc_loop(self) -> None:
        """Keep Python's cyclic GC from stopping every stream for up to a second.

        Each agent stream always has a pending read (about a dozen tracked objects: the
        coroutine, its future, gRPC's batch operation and callback) plus its last status;
        these live for one report interval, so 10,000 agents keep 150,000+ young objects
        that every collection walks (50-400 ms of CPU, then more in full collections of
        the million long-lived objects); a fan-out renews all of them within a second.
        Freezing (O(1)) every 0.1 s hides what exists from the collector, so a collection
        only walks the survivors of the last 0.1 s. Frozen objects are still freed by
        reference counting; only cyclic garbage among them (rare: a few objects per ended
        stream) waits for the compaction: unfreeze, one full collection."""
        gc.freeze()
        last_compaction = time.monotonic()
        while True:
            await asyncio.sleep(self.config.gc_freeze_interval)
            if time.monotonic() - last_compaction >= self.config.gc_compact_interval:
                start = time.perf_counter()
                gc.unfreeze()
                collected = gc.collect()
                last_compaction = time.monotonic()
                log.info(
                    "gc compaction: %d objects collected in %.0f ms",
                    collected,
                    (time.perf_counter() - start) * 1000,
                )
            gc.freeze()

    async def _session_log_loop(self, every: float = 10.0) -> None:
        """One line per interval instead of one per agent (10,000 agents reconnecting)."""
        seen = (0, 0)
        while True:
            await asyncio.sleep(every)
            now = (self.fleet.connects, self.fleet.disconnects)
            if now != seen:
                log.info(
                    "agents: %d connected (+%d, -%d in the last %.0f s)",
                    sum(1 for e in self.fleet.nodes.values() if e.session is not None),
                    now[0] - seen[0],
                    now[1] - seen[1],
                    every,
                )
                seen = now

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        gc.unfreeze()
        for servicer in [s for s, _ in self._health] + [self._probe_health]:
            if servicer is not None:
                with contextlib.suppress(Exception):
                    await servicer.enter_graceful_shutdown()
        # End every agent session first: their handlers return and the agents see the
        # stream end (and reconnect with backoff), instead of 10,000 handlers cancelled.
        for entry in list(self.fleet.nodes.values()):
            if entry.session is not None:
                entry.session.close()
        await asyncio.sleep(0)
        for server in self.servers:
            await server.stop(grace=1.0)
        for runner in self.runners:
            await runner.cleanup()
        self.fleet.flush(everything=True)
        self.store.close()


def raise_open_files_limit() -> int:
    """One descriptor per agent connection: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def run(config: ControllerConfig) -> None:
    limit = raise_open_files_limit()
    if limit < 4096:
        log.warning("open files limit is %d: at most about that many agents can connect", limit)
    controller = Controller(config)
    await controller.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("controller stopping at %s", time.strftime("%H:%M:%S"))
    await controller.stop()
