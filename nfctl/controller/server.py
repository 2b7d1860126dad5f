"""`nfctl controller`: one replica wired together (store, fleet, services, listeners,
background work), started and stopped as a process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import socket
import time
from pathlib import Path

import grpc
from aiohttp import web

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.agent_service import AgentService
from nfctl.controller.auth import AuthPolicy
from nfctl.controller.commands import CommandFanout
from nfctl.controller.config import ControllerConfig
from nfctl.controller.fleet import Fleet
from nfctl.controller.fleet_loops import flush_loop, session_log_loop, sync_loop
from nfctl.controller.gc_pacing import gc_loop
from nfctl.controller.grpc_servers import add_tls_port, grpc_server, probe_server
from nfctl.controller.http_servers import metrics_app, serve_http
from nfctl.controller.leader import LeaderElection
from nfctl.controller.leadership import Leadership
from nfctl.controller.metrics import ControllerMetrics
from nfctl.controller.node import NodeEntry
from nfctl.controller.rollout.engine import RolloutEngine
from nfctl.controller.rollout.gitrepo import RepoMirror, redact
from nfctl.controller.rollout.metrics import RolloutMetrics
from nfctl.controller.service import FleetService
from nfctl.controller.serving_health import ServingHealth
from nfctl.controller.storage import open_store
from nfctl.controller.store_pg import PgStore
from nfctl.controller.webhook import WebhookApp

log = logging.getLogger(__name__)


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
            leadership = Leadership(
                self.replica,
                self.fleet,
                self.metrics,
                self.pg,
                stale_after=config.stale_after,
                event_retention=config.event_retention,
            )
            self.election = LeaderElection(
                self.pg.url, leadership.changed, leadership.duty, config.leader_interval
            )
        else:
            self.metrics.leader.set(1)
        self.agents = AgentService(self.fleet, self.auth, self.metrics, self.fanout)
        self.operators = FleetService(self.fleet, self.auth, self.metrics, self.fanout)
        self.rollouts = self._rollout_engine()
        self.agents.rollouts = self.operators.rollouts = self.rollouts
        self.servers: list[grpc.aio.Server] = []
        self.runners: list[web.AppRunner] = []
        self.ports: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.health = ServingHealth()

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

    async def start(self) -> None:
        cfg = self.config
        main, main_health = grpc_server(
            cfg.max_message_bytes, self.auth, self.operators, agents=self.agents
        )
        self.health.add_listener(main_health, with_agents=True)
        if cfg.insecure:
            self.ports["grpc"] = main.add_insecure_port(cfg.listen)
        else:
            assert cfg.tls_ca and cfg.tls_cert and cfg.tls_key
            tls = (cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
            self.ports["grpc"] = add_tls_port(main, cfg.listen, tls, require_client_cert=True)
        self.servers.append(main)
        if cfg.operator_listen and not cfg.insecure:
            assert cfg.tls_ca and cfg.tls_cert and cfg.tls_key
            ops, ops_health = grpc_server(
                cfg.max_message_bytes, self.auth, self.operators, agents=None
            )
            self.health.add_listener(ops_health, with_agents=False)
            tls = (cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
            self.ports["operator"] = add_tls_port(
                ops, cfg.operator_listen, tls, require_client_cert=False
            )
            self.servers.append(ops)
        if cfg.health_addr:
            probes, self.health.probe = probe_server()
            self.ports["health"] = probes.add_insecure_port(cfg.health_addr)
            self.servers.append(probes)
        for server in self.servers:
            await server.start()
        await self.health.check_store(self.store)
        await self.health.serving()
        if cfg.webhook_addr:
            secret = (
                cfg.webhook_secret_file.read_bytes().strip() if cfg.webhook_secret_file else None
            )
            hook = WebhookApp(self.fleet, self._webhook_reconcile, secret, self.metrics)
            self.ports["webhook"] = await self._serve_http(hook.app, cfg.webhook_addr, 9080)
        if cfg.metrics_addr:
            app = metrics_app(self.metrics)
            self.ports["metrics"] = await self._serve_http(app, cfg.metrics_addr, 9102)
        self._tasks = [
            asyncio.create_task(flush_loop(self.fleet, cfg.flush_interval)),
            asyncio.create_task(session_log_loop(self.fleet)),
            asyncio.create_task(gc_loop(cfg.gc_freeze_interval, cfg.gc_compact_interval)),
            asyncio.create_task(self.health.watch_store(self.store)),
        ]
        if self.rollouts is not None:
            self._tasks.append(asyncio.create_task(self.rollouts.run()))
        if self.fanout is not None and self.election is not None:
            assert self.pg is not None
            self._tasks += [
                asyncio.create_task(sync_loop(self.fleet, self.pg, cfg.sync_interval)),
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
        runner, port = await serve_http(app, address, default_port)
        self.runners.append(runner)
        return port

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        gc.unfreeze()
        await self.health.shutdown()
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
