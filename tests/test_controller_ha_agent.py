"""A real agent (lab namespace, real BPF programs) with two controller replicas on a real
PostgreSQL: it moves to the other replica when its replica is killed, stays through a
PostgreSQL restart and a 20 s freeze (SIGSTOP, standing in for a minute-long outage to
keep the test short), every event it recorded is stored exactly once, commands from the
surviving replica reach it, and its datapath is never touched: program ids unchanged."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfctl.lab.topology import Topology
from tests.agent_harness import GitDaemon, GitRepo, wait_until
from tests.conftest import require_kernel
from tests.controller_harness import ControllerProcess, NodeAgent, Pki, new_topology, operator
from tests.pg_harness import PgServer, pg_url, postgres  # noqa: F401

pytestmark = [pytest.mark.kernel, pytest.mark.e2e, pytest.mark.slow]

NODE = "node1"


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_kernel()
    topology = new_topology(1)
    try:
        yield topology
    finally:
        topology.destroy()


def replica(
    topo: Topology, pki: Pki, url: str, workdir: Path, name: str, port: int
) -> ControllerProcess:
    proc = ControllerProcess(
        topo, pki, workdir / name / "unused.db", "--replica", name, "--stale-after", "30",
        "--listen", f"{topo.hub_ip}:{port}", "--webhook-addr", "", "--metrics-addr", "",
        "--health-listen", "",
    )  # fmt: skip
    proc.address = f"{topo.hub_ip}:{port}"
    proc.args[proc.args.index("--db") + 1] = url
    return proc.start()


def program_ids(agent: NodeAgent) -> dict[str, int]:
    return {f["name"]: f.get("programId") for f in agent.status().get("functions", [])}


def local_events(agent: NodeAgent) -> list[tuple[int, str]]:
    lines = (agent.state_dir / "events.jsonl").read_text().splitlines()
    return [(e["sequence"], e["reason"]) for e in map(json.loads, lines)]


def stored_events(topo: Topology, pki: Pki, via: ControllerProcess) -> list[tuple[int, str]]:
    history: Any = operator(
        topo, pki, "get", "history", "--node", NODE, "--limit", "10000", "-o", "json",
        "--controller", via.address,
    )  # fmt: skip
    return [(int(e["sequence"]), e["reason"]) for e in history]


def connected_to(agent: NodeAgent) -> str:
    found = re.findall(r"connected to controller (\S+)", agent.log_path.read_text())
    return found[-1] if found else ""


def test_real_agent_rides_out_replica_and_postgres_failures(
    topo: Topology,
    tmp_path: Path,
    postgres: PgServer,  # noqa: F811
    pg_url: str,  # noqa: F811
) -> None:
    pki = Pki(tmp_path / "pki", topo, [NODE])
    repo = GitRepo(tmp_path / "git" / "nfs-repo")
    repo.add_library_nf("counter")
    c1 = repo.commit("counter 1.0.0")
    git = GitDaemon(tmp_path / "git", topo.hub, topo.hub_ip)
    git.start()
    replicas = [
        replica(topo, pki, pg_url, tmp_path, "ra", 9443),
        replica(topo, pki, pg_url, tmp_path, "rb", 9543),
    ]
    endpoints = ",".join(r.address for r in replicas)
    agent = NodeAgent(
        topo, NODE, pki, git.url("nfs-repo"), tmp_path, "--interval", "300",
        "--controller", endpoints,
    )  # fmt: skip
    agent.start()
    try:
        wait_until(lambda: agent.status().get("lastAppliedRevision") == c1, 90, what="applied")
        wait_until(lambda: connected_to(agent), 30, what="agent connected")
        ids = program_ids(agent)
        assert ids and all(ids.values()), ids
        holder = next(r for r in replicas if r.address == connected_to(agent))
        other = next(r for r in replicas if r is not holder)
        # the other replica sees it too (from the database)
        wait_until(
            lambda: stored_events(topo, pki, other) == local_events(agent), 30, what="events"
        )

        assert holder.proc is not None
        holder.proc.kill()  # SIGKILL
        holder.proc.wait(timeout=10)
        holder.proc = None
        wait_until(lambda: connected_to(agent) == other.address, 20, what="moved to the other")

        postgres.stop()
        postgres.start()
        postgres.pause()
        try:
            time.sleep(20)
        finally:
            postgres.resume()

        # a command from the survivor still reaches the agent
        operator(topo, pki, "suspend", "--nodes", NODE, "--controller", other.address)
        wait_until(
            lambda: any(r == "Suspended" for _, r in local_events(agent)), 20, what="suspended"
        )
        operator(topo, pki, "resume", "--nodes", NODE, "--controller", other.address)
        wait_until(lambda: any(r == "Resumed" for _, r in local_events(agent)), 20, what="resumed")
        wait_until(
            lambda: stored_events(topo, pki, other) == local_events(agent),
            30,
            what="every event stored exactly once, in order",
        )
        assert program_ids(agent) == ids, "the datapath was touched"
    finally:
        agent.teardown()
        for r in replicas:
            r.stop()
        git.stop()
