"""Two controller replicas on one real PostgreSQL, simulated agents over real gRPC+mTLS:
one fleet view from either replica, commands from either reach agents on the other within
a second and exactly once, one leader and a takeover after kill -9, agents moving off a
killed replica without losing or duplicating events, PostgreSQL restarted or frozen."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfctl.api.nfctl.v1 import nfctl_pb2 as pb
from nfctl.controller.store_pg import PgStore
from tests.ha_harness import AgentPool, Replica, SimAgent, make_pki, wait_for
from tests.pg_harness import PgServer, pg_url, postgres  # noqa: F401

pytestmark = pytest.mark.e2e

NODES = [f"ha-n{i}" for i in range(1, 7)]


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return make_pki(tmp_path / "pki", NODES)


def start_replicas(url: str, pki: Path, workdir: Path, count: int = 2) -> list[Replica]:
    return [
        Replica(name, url, pki, workdir, "--stale-after", "30").start()
        for name in ("ra", "rb", "rc")[:count]
    ]


@pytest.fixture
def cluster(pg_url: str, pki: Path, tmp_path: Path) -> Iterator[list[Replica]]:  # noqa: F811
    replicas = start_replicas(pg_url, pki, tmp_path)
    try:
        yield replicas
    finally:
        for r in replicas:
            r.stop()


def connected_nodes(replica: Replica) -> set[str]:
    try:
        nodes = replica.operator("get", "nodes")
    except AssertionError:
        return set()
    return {n["status"]["node"] for n in nodes if n.get("connected")}


def test_one_fleet_commands_across_replicas_and_leader_takeover(
    cluster: list[Replica], pki: Path
) -> None:
    a, b = cluster
    # the first three start on a, the others on b; each moves to the other when it must
    agents = [SimAgent(n, [a.address, b.address], pki, index=i // 3) for i, n in enumerate(NODES)]
    pool = AgentPool(agents)
    try:
        wait_for(lambda: all(x.connected_to for x in agents), 30, "agents to connect")
        for r in (a, b):  # the whole fleet from either replica
            wait_for(lambda: connected_nodes(r) == set(NODES), 15, f"fleet on {r.name}")  # noqa: B023

        # a reconcile on a reaches agents held by b within a second, once each
        sent_at = time.time()
        reply = a.reconcile()  # over gRPC: the time is the controllers', not the CLI's start
        assert sorted(reply.nodes) == NODES and not reply.offline, reply
        wait_for(lambda: all(x.commands for x in agents), 5, "the command on every agent")
        latest = max(x.commands[0][1] for x in agents) - sent_at
        assert latest < 1.0, f"slowest agent got the command {latest:.2f} s after the call"
        # suspend through b reaches the agents of a
        b.operator("suspend", "--nodes", ",".join(NODES[:3]), as_json=False)
        wait_for(lambda: all(len(x.commands) == 2 for x in agents[:3]), 5, "suspend on a's agents")
        time.sleep(1.5)  # time for a duplicate to show up, if there were one
        for x in agents:
            ids = Counter(cid for cid, _ in x.commands)
            assert all(n == 1 for n in ids.values()), (x.name, x.commands)
        assert [len(x.commands) for x in agents] == [2, 2, 2, 1, 1, 1]

        # exactly one leader; kill -9 it and the other takes over
        leaders = wait_for(
            lambda: [r for r in (a, b) if r.metric("nfctl_controller_leader") == 1.0],
            10,
            "a leader",
        )
        assert len(leaders) == 1
        assert {r.metric("nfctl_controller_leader") for r in (a, b)} == {0.0, 1.0}
        leader = leaders[0]
        other = b if leader is a else a
        on_other = [x for x in agents if x.connected_to == other.address]
        before = {x.name: len(x.commands) for x in agents}
        # a fan-out from the leader, the leader killed as soon as the call returns
        leader.operator("reconcile", as_json=False)
        killed_at = time.monotonic()
        leader.kill9()
        wait_for(lambda: other.metric("nfctl_controller_leader") == 1.0, 15, "takeover")
        failover = time.monotonic() - killed_at
        assert failover < 10, f"takeover after {failover:.1f} s"
        history = other.operator("events", "--reason", "LeaderElected", "--limit", "50")
        assert any(e["node"] == f"controller/{other.name}" for e in history), history
        wait_for(
            lambda: all(len(x.commands) == before[x.name] + 1 for x in on_other),
            5,
            "the fan-out on the other replica's agents",
        )
        wait_for(lambda: all(x.connected_to == other.address for x in agents), 15, "agents moved")
        time.sleep(1.5)
        for x in agents:  # nothing sent twice, not even to agents that moved
            assert len({cid for cid, _ in x.commands}) == len(x.commands), x.commands
            assert len(x.commands) <= before[x.name] + 1
    finally:
        pool.stop()


@pytest.mark.slow
def test_agents_move_off_a_killed_replica_and_ride_out_postgres_trouble(
    cluster: list[Replica],
    pki: Path,
    postgres: PgServer,  # noqa: F811
    pg_url: str,  # noqa: F811
) -> None:
    a, b = cluster
    agents = [SimAgent(n, [a.address, b.address], pki) for n in NODES]  # all start on a
    for x in agents:
        x.add_event("Applied")
    pool = AgentPool(agents)
    try:
        wait_for(lambda: all(x.connected_to == a.address for x in agents), 30, "agents on a")
        wait_for(lambda: connected_nodes(b) == set(NODES), 15, "a's agents seen from b")
        pool.call(lambda: _all(agents, 3, "BeforeKill"))
        time.sleep(1)  # these were stored and acknowledged by a (flush every 0.25 s)
        pool.call(lambda: _all(agents, 2, "RightBeforeKill"))
        # a command a replica took for the first agent and died with, unanswered
        ghost = PgStore(pg_url, replica="ghost")
        lost = pb.ControllerMessage(command=pb.Command(id="in-flight", reconcile=pb.ReconcileNow()))
        ghost.add_command(
            "in-flight", lost.SerializeToString(), [NODES[0]], [NODES[0]], time.time()
        )
        ghost.close()
        a.kill9()  # perhaps before it stored or acknowledged these two
        killed = time.monotonic()
        wait_for(lambda: all(x.connected_to == b.address for x in agents), 15, "agents on b")
        moved = time.monotonic() - killed
        assert moved < 15, f"agents back after {moved:.1f} s"
        assert connected_nodes(b) == set(NODES)
        wait_for(lambda: "in-flight" in [c for c, _ in agents[0].commands], 5, "redelivery")
        assert all("in-flight" not in [c for c, _ in x.commands] for x in agents[1:])

        # PostgreSQL restarted: the replica keeps its agents and stores what they send
        postgres.stop()
        postgres.start()
        pool.call(lambda: _all(agents, 1, "AfterRestart"))
        # PostgreSQL unreachable for 20 s (SIGSTOP; a minute in production terms)
        postgres.pause()
        try:
            pool.call(lambda: _all(agents, 1, "DuringOutage"))
            time.sleep(20)
            assert all(x.connected_to == b.address for x in agents), "an agent was dropped"
        finally:
            postgres.resume()
        pool.call(lambda: _all(agents, 1, "AfterOutage"))

        wanted = {(x.name, s) for x in agents for s in range(1, x.sequence + 1)}
        stored: Counter[tuple[str, int]] = Counter()

        def complete() -> bool:
            history = b.operator("events", "--limit", "1000")
            stored.clear()
            stored.update((e["node"], int(e["sequence"])) for e in history if e["node"] in NODES)
            return set(stored) == wanted

        try:
            wait_for(complete, 30, "every event stored", every=1)
        finally:
            print("missing", sorted(wanted - set(stored)), "extra", sorted(set(stored) - wanted))
        assert all(n == 1 for n in stored.values()), stored
        assert all(x.sessions == 2 for x in agents), [x.sessions for x in agents]
    finally:
        pool.stop()


async def _all(agents: list[SimAgent], count: int, reason: str) -> None:
    for x in agents:
        await x.send_new_events(count, reason)
