"""The gRPC health this replica reports: SERVING on its listeners once they are started, and
on the probe listener SERVING only while the store answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from grpc_health.v1 import health, health_pb2

from nfctl.controller.storage import Store

log = logging.getLogger(__name__)


class ServingHealth:
    """The health servicers of the replica's gRPC listeners and of its probe listener (see
    the module docstring); all of them say NOT_SERVING from a graceful stop on."""

    def __init__(self) -> None:
        self.listeners: list[tuple[health.aio.HealthServicer, bool]] = []
        self.probe: health.aio.HealthServicer | None = None

    def add_listener(self, servicer: health.aio.HealthServicer, with_agents: bool) -> None:
        self.listeners.append((servicer, with_agents))

    async def serving(self) -> None:
        """The listeners are started: their services are SERVING."""
        for servicer, with_agents in self.listeners:
            services = ["", "nfctl.v1.FleetService"] + (
                ["nfctl.v1.AgentService"] if with_agents else []
            )
            for service in services:
                await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def check_store(self, store: Store) -> None:
        """The probe listener's answer: SERVING while the store answers a ping."""
        if self.probe is None:
            return
        try:
            await asyncio.to_thread(store.ping)
            serving = health_pb2.HealthCheckResponse.SERVING
        except Exception as exc:
            log.error("store unusable: %s", exc)
            serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "nfctl.v1.AgentService", "nfctl.v1.FleetService"):
            await self.probe.set(service, serving)

    async def watch_store(self, store: Store, every: float = 5.0) -> None:
        while True:
            await asyncio.sleep(every)
            await self.check_store(store)

    async def shutdown(self) -> None:
        for servicer in [s for s, _ in self.listeners] + [self.probe]:
            if servicer is not None:
                with contextlib.suppress(Exception):
                    await servicer.enter_graceful_shutdown()
