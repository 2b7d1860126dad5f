"""The control channel under faults: real controller, real agents in lab namespaces.

Every event an agent records must be stored by the controller exactly once and in order,
whatever happens to the controller (SIGKILL, SIGTERM, quiet outages, a kill while the
agents are resending); heartbeats keep quiet nodes fresh; threads do not pile up."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nfctl.lab.topology import Topology
from tests.agent_harness import REPO_ROOT, GitDaemon, GitRepo, wait_until
from tests.controller_harness import (
    PY,
    ControllerProcess,
    NodeAgent,
    Pki,
    hub_python,
    kernel_topology,
    operator,
    watch_events,
)

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]

NODES = ("node1", "node2")


@pytest.fixture
def topo() -> Iterator[Topology]:
    with kernel_topology(len(NODES)) as topology:
        yield topology


def local_events(agent: NodeAgent) -> list[tuple[int, str, str]]:
    """What the agent recorded, from its state dir (the source of truth)."""
    out = []
    for line in (agent.state_dir / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        out.append((event["sequence"], event["reason"], event["message"]))
    return out


def stored_events(topo: Topology, pki: Pki, node: str) -> list[tuple[int, str, str]]:
    history = operator(
        topo, pki, "get", "history", "--node", node, "--limit", "10000", "-o", "json"
    )
    return [(int(e["sequence"]), e["reason"], e["message"]) for e in history]


def all_stored(topo: Topology, pki: Pki, agents: list[NodeAgent]) -> bool:
    return all(stored_events(topo, pki, a.node) == local_events(a) for a in agents)


def threads(agent: NodeAgent) -> int:
    assert agent.proc is not None
    return len(list(Path(f"/proc/{agent.proc.pid}/task").iterdir()))


def reconcile_locally(agent: NodeAgent) -> None:
    subprocess.run(
        [PY, "-m", "nfctl", "reconcile", "--local", "--state-dir", str(agent.state_dir)],
        check=True,
        cwd=REPO_ROOT,
        capture_output=True,
    )


def kill(controller: ControllerProcess, signum: int) -> None:
    assert controller.proc is not None
    controller.proc.send_signal(signum)
    controller.proc.wait(timeout=30)
    controller.proc = None


def counter_fleet_source(topo: Topology, tmp_path: Path) -> tuple[Pki, GitRepo, str, GitDaemon]:
    """Certificates for the nodes, a repository with the counter NF at 1.0.0 (c1) and the
    Git daemon serving it on the hub."""
    pki = Pki(tmp_path / "pki", topo, list(NODES))
    repo = GitRepo(tmp_path / "git" / "nfs-repo")
    repo.add_library_nf("counter")
    c1 = repo.commit("counter 1.0.0")
    git = GitDaemon(tmp_path / "git", topo.hub, topo.hub_ip)
    git.start()
    return pki, repo, c1, git


def stream_ends(agent: NodeAgent) -> int:
    """How often the agent has seen its controller stream end or fail to open (logged at
    each attempt while the controller is away)."""
    return agent.log_path.read_text(errors="replace").count("controller stream ended")


def wait_stream_ends(agents: list[NodeAgent], before: list[int], what: str) -> None:
    wait_until(
        lambda: all(stream_ends(a) > b for a, b in zip(agents, before, strict=True)),
        30,
        every=0.05,
        what=what,
    )


def connected(topo: Topology, pki: Pki) -> bool:
    nodes = operator(topo, pki, "get", "nodes", "-o", "json")
    return len(nodes) == len(NODES) and all(n["connected"] for n in nodes)


def bump(repo: GitRepo, version: str) -> str:
    text = repo.read("nfs/counter/nf.yaml")
    current = next(line for line in text.splitlines() if line.strip().startswith("version:"))
    repo.write("nfs/counter/nf.yaml", text.replace(current, f"  version: {version}"))
    return repo.commit(f"counter {version}")


def test_events_survive_controller_kills_exactly_once(topo: Topology, tmp_path: Path) -> None:
    pki, repo, c1, git = counter_fleet_source(topo, tmp_path)
    db = tmp_path / "ctl" / "controller.db"
    controller = ControllerProcess(topo, pki, db, "--stale-after", "30").start()
    agents = [
        NodeAgent(topo, n, pki, git.url("nfs-repo"), tmp_path, "--interval", "300").start()
        for n in NODES
    ]
    try:
        wait_until(
            lambda: all(a.status().get("lastAppliedRevision") == c1 for a in agents),
            90,
            what="agents at c1",
        )
        wait_until(lambda: all_stored(topo, pki, agents), 30, what="first events stored")
        baseline_threads: list[int] | None = None
        rounds = [
            (signal.SIGKILL, "quiet"),
            (signal.SIGTERM, "quiet"),
            (signal.SIGKILL, "kill-during-resend"),
            (signal.SIGKILL, "quiet"),
        ]
        for number, (signum, kind) in enumerate(rounds, start=2):
            before = [stream_ends(a) for a in agents]
            kill(controller, signum)
            wait_stream_ends(agents, before, "the agents see the controller gone")
            revision = bump(repo, f"1.0.{number}")
            for agent in agents:
                reconcile_locally(agent)
            wait_until(
                lambda rev=revision: all(  # type: ignore[misc]
                    a.status().get("lastAppliedRevision") == rev for a in agents
                ),
                60,
                what=f"agents apply {revision[:8]} while the controller is down",
            )
            # reconnects from a backlog: each agent has failed once more since applying
            wait_stream_ends(
                agents, [stream_ends(a) for a in agents], "the agents retry with events queued"
            )
            controller = ControllerProcess(topo, pki, db, "--stale-after", "30").start()
            if kind == "kill-during-resend":
                # the agents reconnect and resend their backlog: kill the controller as
                # soon as they are connected, while what they sent may be half stored
                wait_until(lambda: connected(topo, pki), 30, every=0.05, what="reconnect")
                kill(controller, signal.SIGKILL)
                controller = ControllerProcess(topo, pki, db, "--stale-after", "30").start()
            wait_until(lambda: connected(topo, pki), 30, what="agents reconnected")
            wait_until(
                lambda: all_stored(topo, pki, agents),
                30,
                what=f"round {number}: every recorded event stored exactly once, in order",
            )
            counts = [threads(a) for a in agents]
            if baseline_threads is None:
                baseline_threads = counts
            else:
                assert all(c <= b for c, b in zip(counts, baseline_threads, strict=True)), (
                    f"agent threads grew across reconnects: {baseline_threads} -> {counts}"
                )
        for agent in agents:
            stored = stored_events(topo, pki, agent.node)
            sequences = [s for s, _, _ in stored]
            assert sequences == sorted(set(sequences)), "duplicated or out of order"
            assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
            assert any(reason == "Applied" for _, reason, _ in stored)
    finally:
        for agent in agents:
            agent.teardown()
        controller.stop()
        git.stop()


def nodes_by_name(topo: Topology, pki: Pki) -> dict[str, dict[str, Any]]:
    return {n["status"]["node"]: n for n in operator(topo, pki, "get", "nodes", "-o", "json")}


def run_in(netns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, *args], check=True, capture_output=True)


def counter_on(status: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in status.get("functions", []) if f["name"] == "counter")


def test_interface_flap_shows_in_status_and_events(topo: Topology, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki", topo, list(NODES))
    repo = GitRepo(tmp_path / "git" / "nfs-repo")
    repo.add_library_nf("counter")  # tc-ingress on eth* and veth*
    c1 = repo.commit("counter 1.0.0")
    git = GitDaemon(tmp_path / "git", topo.hub, topo.hub_ip)
    git.start()
    netns = topo.node("node1").netns
    run_in(netns, "ip", "link", "add", "vethflap", "type", "veth", "peer", "name", "xflap")
    run_in(netns, "ip", "link", "set", "vethflap", "up")
    controller = ControllerProcess(topo, pki, tmp_path / "ctl" / "controller.db").start()
    agent = NodeAgent(topo, "node1", pki, git.url("nfs-repo"), tmp_path, "--interval", "300")
    agent.start()
    try:
        wait_until(lambda: agent.status().get("lastAppliedRevision") == c1, 90, what="at c1")
        points = {p["interface"] for p in counter_on(agent.status())["attachPoints"]}
        assert points == {"eth0", "vethflap"}

        run_in(netns, "ip", "link", "del", "vethflap")
        status = wait_until(
            lambda: (s := agent.status()) and counter_on(s)["state"] == "Degraded" and s,
            30,
            what="counter degraded once its interface vanished",
        )
        [gone] = [p for p in counter_on(status)["attachPoints"] if p["interface"] == "vethflap"]
        assert gone["missingSince"] > 0 and "vanished" in gone["error"]
        attached = condition(status, "Attached")
        assert attached["status"] is False and attached["reason"] == "InterfaceMissing"
        assert condition(status, "Ready")["status"] is False
        lost = [e for e in agent_events(agent) if e["reason"] == "InterfaceLost"]
        assert len(lost) == 1 and "vethflap" in lost[0]["message"]
        # the controller shows the same, and has the event
        wait_until(
            lambda: counter_on(nodes_by_name(topo, pki)["node1"]["status"])["state"] == "Degraded",
            30,
            what="controller sees counter degraded",
        )
        wait_until(
            lambda: reasons_at_controller(topo, pki).count("InterfaceLost") == 1,
            30,
            what="InterfaceLost stored by the controller",
        )

        run_in(netns, "ip", "link", "add", "vethflap", "type", "veth", "peer", "name", "xflap")
        run_in(netns, "ip", "link", "set", "vethflap", "up")
        status = wait_until(
            lambda: (s := agent.status()) and counter_on(s)["state"] == "Applied" and s,
            30,
            what="counter applied again on the restored interface",
        )
        by_interface = {p["interface"]: p for p in counter_on(status)["attachPoints"]}
        assert set(by_interface) == {"eth0", "vethflap"}
        assert not by_interface["vethflap"].get("error")
        assert condition(status, "Attached")["status"] is True
        assert condition(status, "Ready")["status"] is True
        restored = [e for e in agent_events(agent) if e["reason"] == "InterfaceRestored"]
        assert len(restored) == 1 and "vethflap" in restored[0]["message"]
        wait_until(
            lambda: reasons_at_controller(topo, pki).count("InterfaceRestored") == 1,
            30,
            what="InterfaceRestored stored by the controller",
        )
        wait_until(
            lambda: counter_on(nodes_by_name(topo, pki)["node1"]["status"])["state"] == "Applied",
            30,
            what="controller sees counter applied again",
        )
    finally:
        agent.teardown()
        controller.stop()
        git.stop()


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def agent_events(agent: NodeAgent) -> list[dict[str, Any]]:
    text = (agent.state_dir / "events.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def reasons_at_controller(topo: Topology, pki: Pki) -> list[str]:
    history = operator(topo, pki, "get", "history", "--limit", "10000", "-o", "json")
    return [e["reason"] for e in history]


HEALTH_PROBE = """
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as r
channel = grpc.insecure_channel("{address}")
print(health_pb2.HealthCheckResponse.ServingStatus.Name(
    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status))
for method in ("/nfctl.v1.FleetService/ListNodes", "/nfctl.v1.FleetService/GetHistory"):
    try:
        channel.unary_unary(method)(b"", timeout=10)
        print("ANSWERED")
    except grpc.RpcError as exc:
        print(exc.code().name)
for version in ("v1", "v1alpha"):
    call = channel.stream_stream(
        f"/grpc.reflection.{{version}}.ServerReflection/ServerReflectionInfo",
        request_serializer=r.ServerReflectionRequest.SerializeToString,
        response_deserializer=r.ServerReflectionResponse.FromString,
    )
    try:
        list(call(iter([r.ServerReflectionRequest(list_services="")]), timeout=10))
        print("ANSWERED")
    except grpc.RpcError as exc:
        print(exc.code().name)
"""

REFLECTION_LIST = """
import grpc
from grpc_reflection.v1alpha import reflection_pb2 as r
read = lambda p: open(p, "rb").read()
creds = grpc.ssl_channel_credentials(read("{ca}"), read("{key}"), read("{cert}"))
channel = grpc.secure_channel("{address}", creds)
for version in ("v1", "v1alpha"):
    call = channel.stream_stream(
        f"/grpc.reflection.{{version}}.ServerReflection/ServerReflectionInfo",
        request_serializer=r.ServerReflectionRequest.SerializeToString,
        response_deserializer=r.ServerReflectionResponse.FromString,
    )
    [answer] = call(iter([r.ServerReflectionRequest(list_services="")]), timeout=10)
    print(version, ",".join(s.name for s in answer.list_services_response.service))
"""

WEBHOOK_DOWN = """
import urllib.request
try:
    urllib.request.urlopen("http://{hub}:9080/hooks/github", data=b"{{}}", timeout=5)
    print("DELIVERED")
except OSError as exc:
    print("FAILED", exc)
"""


def test_health_without_client_certificate_and_reflection(topo: Topology, tmp_path: Path) -> None:
    """The health port answers health checks without a client certificate and nothing else;
    the API port lists its services through reflection v1 and v1alpha."""
    pki = Pki(tmp_path / "pki", topo, list(NODES))
    controller = ControllerProcess(topo, pki, tmp_path / "ctl" / "controller.db").start()
    try:
        probe = hub_python(topo, HEALTH_PROBE.format(address=f"{topo.hub_ip}:9444"))
        assert probe.split() == ["SERVING"] + ["UNIMPLEMENTED"] * 4, probe
        ca, cert, key = (pki.dir / f for f in ("ca.crt", "operator.crt", "operator.key"))
        listing = hub_python(
            topo,
            REFLECTION_LIST.format(ca=ca, cert=cert, key=key, address=controller.address),
        )
        for line in listing.splitlines():
            version, names = line.split()
            assert {"nfctl.v1.FleetService", "grpc.health.v1.Health"} <= set(names.split(","))
            assert f"grpc.reflection.{version}.ServerReflection" in names
    finally:
        controller.stop()


@dataclass
class Channel:
    """A controller, its agents and their Git server, an operator's `nfctl events --watch`,
    and the revisions the phases commit."""

    topo: Topology
    pki: Pki
    repo: GitRepo
    git: GitDaemon
    db: Path
    c1: str
    controller: ControllerProcess | None = None
    agents: list[NodeAgent] = field(default_factory=list)
    watcher: subprocess.Popen[str] | None = None

    @property
    def watch_out(self) -> Path:
        return self.db.parent / "watch.jsonl"

    def start_controller(self) -> ControllerProcess:
        # heartbeat 1.3 s (stale-after / 3)
        self.controller = ControllerProcess(self.topo, self.pki, self.db, "--stale-after", "4")
        return self.controller.start()

    def all_at(self, revision: str) -> bool:
        return all(a.status().get("lastAppliedRevision") == revision for a in self.agents)


def test_liveness_watch_push_and_agent_kill(topo: Topology, tmp_path: Path) -> None:
    """A fleet through its phases: each is a function below, run in this order because
    each starts from the state the one before left (the watch spans them all)."""
    pki, repo, c1, git = counter_fleet_source(topo, tmp_path)
    channel = Channel(topo, pki, repo, git, tmp_path / "ctl" / "controller.db", c1)
    try:
        channel.start_controller()
        # the agents fetch Git only every 60 s
        channel.agents = [
            NodeAgent(topo, n, pki, git.url("nfs-repo"), tmp_path, "--interval", "60").start()
            for n in NODES
        ]
        agents_connect_and_watch_starts(channel)
        quiet_nodes_are_never_stale(channel)
        push_during_outage_is_fetched_on_reconnect(channel)
        agent_kill_loses_nothing(channel)
        watch_printed_every_event_once(channel)
    finally:
        if channel.watcher is not None and channel.watcher.poll() is None:
            channel.watcher.kill()
            channel.watcher.wait()
        for agent in channel.agents:
            agent.teardown()
        if channel.controller is not None:
            channel.controller.stop()
        git.stop()


def agents_connect_and_watch_starts(channel: Channel) -> None:
    topo, pki = channel.topo, channel.pki
    wait_until(lambda: channel.all_at(channel.c1), 90, what="agents at c1")
    wait_until(lambda: connected(topo, pki), 30, what="agents connected")
    assert channel.controller is not None
    channel.watcher = watch_events(
        topo, pki, channel.controller.address, channel.watch_out.open("w"), subprocess.PIPE
    )


def quiet_nodes_are_never_stale(channel: Channel) -> None:
    """No commits, status unchanged: heartbeats keep them fresh. 12 s is 3 stale periods."""
    topo, pki = channel.topo, channel.pki
    deadline = time.monotonic() + 12
    samples = 0
    while time.monotonic() < deadline:
        nodes = operator(topo, pki, "get", "nodes", "-o", "json")
        assert all(n["connected"] and not n["stale"] for n in nodes), nodes
        assert operator(topo, pki, "get", "nodes", "--stale", "-o", "json") == []
        samples += 1
    assert samples >= 3


def push_during_outage_is_fetched_on_reconnect(channel: Channel) -> None:
    """A push while the controller is down: the webhook cannot be delivered, and the agents
    fetch when they reconnect instead of at their next 60 s tick."""
    assert channel.controller is not None
    kill(channel.controller, signal.SIGKILL)
    c2 = bump(channel.repo, "1.0.1")
    assert hub_python(channel.topo, WEBHOOK_DOWN.format(hub=channel.topo.hub_ip)).startswith(
        "FAILED"
    )
    # nothing fetches c2 without the webhook: every agent has been through its reconnect
    # loop since the push and still runs c1
    wait_stream_ends(
        channel.agents,
        [stream_ends(a) for a in channel.agents],
        "the agents retry after the push",
    )
    assert channel.all_at(channel.c1)
    channel.start_controller()
    back = time.monotonic()
    wait_until(
        lambda: channel.all_at(c2),
        30,
        every=0.05,
        what="the push made during the outage applied",
    )
    applied_after = time.monotonic() - back
    print(f"push during outage applied {applied_after:.2f} s after the controller returned")
    assert applied_after < 10, applied_after


def agent_kill_loses_nothing(channel: Channel) -> None:
    """Agent kill -9, a commit while it is dead, restart: nothing lost, nothing twice."""
    agents = channel.agents
    assert agents[0].proc is not None
    agents[0].proc.kill()
    agents[0].proc.wait(timeout=15)
    agents[0].proc = None
    c3 = bump(channel.repo, "1.0.2")
    reconcile_locally(agents[1])
    agents[0].start()
    wait_until(lambda: channel.all_at(c3), 60, what="both at c3 after the agent restart")
    wait_until(
        lambda: all_stored(channel.topo, channel.pki, agents), 30, what="every event stored once"
    )


def watch_printed_every_event_once(channel: Channel) -> None:
    """The watch reconnected across the controller's restart and printed every event
    exactly once."""
    watcher = channel.watcher
    assert watcher is not None
    stored = {
        (a.node, seq)
        for a in channel.agents
        for seq, _, _ in stored_events(channel.topo, channel.pki, a.node)
    }

    def printed() -> list[tuple[str, int]]:
        lines = channel.watch_out.read_text().splitlines()
        # the last line may still be being written
        events = [json.loads(line) for line in lines[:-1] if line.strip()]
        if lines and lines[-1].endswith("}"):
            events.append(json.loads(lines[-1]))
        return [(e["node"], int(e["sequence"])) for e in events]

    wait_until(lambda: set(printed()) >= stored, 30, what="the watch printed every stored event")
    watcher.terminate()
    _, err = watcher.communicate(timeout=15)
    keys = printed()
    assert len(keys) == len(set(keys)), "the watch printed an event twice"
    assert set(keys) == stored, f"missing {stored - set(keys)}; stderr: {err}"
    assert "reconnecting" in err
