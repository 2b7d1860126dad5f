"""Parts of one controller replica, in process: which settings are refused, the metrics and
probe listeners on loopback, and what leadership changes and the leader's duty do."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.config import ControllerConfig
from nfctl.controller.fleet import Fleet
from nfctl.controller.grpc_servers import probe_server
from nfctl.controller.http_servers import metrics_app, split_address
from nfctl.controller.leadership import Leadership
from nfctl.controller.metrics import ControllerMetrics
from nfctl.controller.serving_health import ServingHealth
from nfctl.controller.store import ControllerStore
from nfctl.controller.watchers import Watcher


def test_plaintext_only_on_loopback_and_tls_needs_all_three_files(tmp_path: Path) -> None:
    ControllerConfig(insecure=True, listen="127.0.0.1:9443").validate()
    ControllerConfig(insecure=True, listen="[::1]:9443").validate()
    with pytest.raises(ValueError, match="only allowed on a loopback"):
        ControllerConfig(insecure=True, listen="0.0.0.0:9443").validate()
    with pytest.raises(ValueError, match="only allowed on a loopback"):
        ControllerConfig(insecure=True, listen=":9443").validate()
    with pytest.raises(ValueError, match="TLS needs"):
        ControllerConfig(tls_ca=tmp_path / "ca.pem", tls_cert=tmp_path / "c.pem").validate()
    with pytest.raises(ValueError, match="--stale-after must be positive"):
        ControllerConfig(insecure=True, listen="127.0.0.1:0", stale_after=0).validate()


def test_listen_addresses_default_host_and_port() -> None:
    assert split_address("127.0.0.1:9102", 80) == ("127.0.0.1", 9102)
    assert split_address(":9102", 80) == ("0.0.0.0", 9102)
    assert split_address("127.0.0.1:", 9080) == ("127.0.0.1", 9080)


def test_metrics_listener_counts_connected_and_stale_nodes(tmp_path: Path) -> None:
    async def main() -> None:
        fleet = Fleet(ControllerStore(tmp_path / "controller.db"), stale_after=60.0)
        fleet.connect(pb.Register(node="live", event_epoch="e"), "peer")
        quiet, session, _ = fleet.connect(pb.Register(node="quiet", event_epoch="e"), "peer")
        fleet.disconnect(quiet, session)
        quiet.last_seen = time.time() - 61.0
        async with TestClient(TestServer(metrics_app(ControllerMetrics(fleet)))) as client:
            body = await (await client.get("/metrics")).text()
            assert "nfctl_controller_agents_connected 1.0" in body
            assert "nfctl_controller_agents_stale 1.0" in body
            assert await (await client.get("/healthz")).text() == "ok\n"

    asyncio.run(main())


def test_the_probe_listener_says_not_serving_once_the_store_fails(tmp_path: Path) -> None:
    async def main() -> None:
        store = ControllerStore(tmp_path / "controller.db")
        health = ServingHealth()
        server, health.probe = probe_server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service="nfctl.v1.AgentService")
                await health.check_store(store)
                answer = await stub.Check(request, timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
                store.close()
                await health.check_store(store)
                answer = await stub.Check(request, timeout=10)
                assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await server.stop(None)

    asyncio.run(main())


class RecordingStore:
    """The leader's view of the shared store: what it was asked to release and expire."""

    def __init__(self) -> None:
        self.released_before: list[float] = []
        self.expired_before: list[float] = []

    def release_stale(self, cutoff: float) -> list[str]:
        self.released_before.append(cutoff)
        return ["n1"]

    def expire(self, before: float) -> tuple[int, int]:
        self.expired_before.append(before)
        return 0, 0


def test_leadership_changes_are_events_and_the_metric(tmp_path: Path) -> None:
    async def main() -> None:
        fleet = Fleet(ControllerStore(tmp_path / "controller.db"))
        metrics = ControllerMetrics(fleet)
        watcher = Watcher(pb.WatchEventsRequest())
        fleet.watchers.add(watcher)
        lead = Leadership("r1", fleet, metrics, RecordingStore(), 60.0, event_retention=0)
        lead.changed(True)
        assert metrics.registry.get_sample_value("nfctl_controller_leader") == 1
        lead.changed(False)
        assert metrics.registry.get_sample_value("nfctl_controller_leader") == 0
        got = [watcher.queue.get_nowait() for _ in range(2)]
        assert [(e.reason, e.sequence) for e in got] == [
            ("LeaderElected", 1),
            ("LeadershipLost", 2),
        ]
        assert {e.node for e in got} == {"controller/r1"} and got[0].epoch == got[1].epoch
        _, events = fleet.take_dirty()
        assert [e.reason for e in events] == ["LeaderElected", "LeadershipLost"]

    asyncio.run(main())


def test_the_leader_releases_nodes_quiet_for_stale_after_and_expires_by_retention(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        fleet = Fleet(ControllerStore(tmp_path / "controller.db"))
        metrics = ControllerMetrics(fleet)
        keep_all, retained = RecordingStore(), RecordingStore()
        before = time.time()
        await Leadership("r1", fleet, metrics, keep_all, 60.0, event_retention=0).duty()
        await Leadership("r1", fleet, metrics, retained, 60.0, event_retention=3600).duty()
        after = time.time()
        assert before - 60 <= keep_all.released_before[0] <= after - 60
        assert keep_all.expired_before == []  # retention 0 keeps everything
        assert before - 3600 <= retained.expired_before[0] <= after - 3600

    asyncio.run(main())
