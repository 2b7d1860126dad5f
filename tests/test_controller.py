"""The controller with real agents over mTLS on a lab topology (namespaces on a bridge)."""

from __future__ import annotations

import hashlib
import hmac
import json
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


@pytest.fixture
def topo() -> Iterator[Topology]:
    with kernel_topology(2) as topology:
        yield topology


def nodes_by_name(topo: Topology, pki: Pki) -> dict[str, dict[str, Any]]:
    return {n["status"]["node"]: n for n in operator(topo, pki, "get", "nodes", "-o", "json")}


def applied_at(topo: Topology, pki: Pki, node: str, revision: str) -> bool:
    entry = nodes_by_name(topo, pki).get(node)
    return bool(entry and entry["status"].get("lastAppliedRevision") == revision)


def webhook(
    topo: Topology, secret: bytes, payload: dict[str, Any], signature: str | None = None
) -> tuple[int, str]:
    body = json.dumps(payload).encode()
    sig = signature or "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    code = f"""
import urllib.request, urllib.error
headers = {{"X-Hub-Signature-256": {sig!r}, "X-GitHub-Event": "push",
           "Content-Type": "application/json"}}
req = urllib.request.Request("http://{topo.hub_ip}:9080/hooks/github", data={body!r},
                             method="POST", headers=headers)
try:
    r = urllib.request.urlopen(req, timeout=10); print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""
    status, _, text = hub_python(topo, code).partition("\n")
    return int(status), text


def controller_metrics(topo: Topology) -> str:
    return hub_python(
        topo,
        f"import urllib.request; print(urllib.request.urlopen('http://{topo.hub_ip}:9102/metrics').read().decode())",
    )


@dataclass
class Fleet:
    """A controller, two agents and the Git server they follow, and what the phases record
    for the ones after them (revisions, the event stream)."""

    topo: Topology
    pki: Pki
    tmp: Path
    repo: GitRepo
    git: GitDaemon
    secret: bytes
    c1: str
    controller: ControllerProcess | None = None
    agents: list[NodeAgent] = field(default_factory=list)
    watcher: subprocess.Popen[str] | None = None
    c2: str = ""
    c3: str = ""

    def start_controller(self) -> None:
        self.controller = ControllerProcess(
            self.topo,
            self.pki,
            self.tmp / "ctl" / "controller.db",
            "--webhook-secret-file",
            str(self.tmp / "hook.secret"),
            "--stale-after",
            "3",
        ).start()

    def applied_at(self, node: str, revision: str) -> bool:
        return applied_at(self.topo, self.pki, node, revision)

    def nodes(self) -> dict[str, dict[str, Any]]:
        return nodes_by_name(self.topo, self.pki)

    def bump(self, old: str, new: str, message: str) -> str:
        path = "nfs/counter/nf.yaml"
        self.repo.write(path, self.repo.read(path).replace(f"version: {old}", f"version: {new}"))
        return self.repo.commit(message)


@pytest.mark.slow
def test_fleet_status_events_and_commands(topo: Topology, tmp_path: Path) -> None:
    """A fleet through its phases: each is a function below, run in this order because
    each starts from the state the one before left."""
    pki = Pki(tmp_path / "pki", topo, ["node1", "node2"])
    secret = b"hook-secret-123"
    (tmp_path / "hook.secret").write_bytes(secret)
    gitdir = tmp_path / "git"
    repo = GitRepo(gitdir / "nfs-repo")
    repo.add_library_nf("counter")
    c1 = repo.commit("counter 1.0.0")
    git = GitDaemon(gitdir, topo.hub, topo.hub_ip)
    git.start()
    fleet = Fleet(topo, pki, tmp_path, repo, git, secret, c1)
    try:
        fleet.start_controller()
        fleet.agents = [
            NodeAgent(topo, n, pki, git.url("nfs-repo"), tmp_path, "--interval", "300").start()
            for n in ("node1", "node2")
        ]
        registration_status_and_fleet_view(fleet)
        start_event_stream(fleet)
        reconcile_now_for_one_node(fleet)
        github_webhook_checks_its_signature(fleet)
        suspended_node_applies_nothing_until_resumed(fleet)
        event_stream_saw_the_changes(fleet)
        controller_restart_loses_nothing(fleet)
        silent_agent_becomes_stale_and_is_kept(fleet)
    finally:
        if fleet.watcher is not None and fleet.watcher.poll() is None:
            fleet.watcher.kill()
            fleet.watcher.wait()
        for agent in fleet.agents:
            agent.teardown()
        if fleet.controller is not None:
            fleet.controller.stop()
        git.stop()


def registration_status_and_fleet_view(fleet: Fleet) -> None:
    """Both agents register and report; the controller's view of nodes, NFs and history."""
    topo, pki, c1 = fleet.topo, fleet.pki, fleet.c1
    wait_until(
        lambda: all(fleet.applied_at(n, c1) for n in ("node1", "node2")),
        60,
        what="both nodes at c1",
    )
    nodes = fleet.nodes()
    assert all(n["connected"] and not n["stale"] for n in nodes.values())
    assert nodes["node1"]["status"]["functions"][0]["state"] == "Applied"
    assert "btf" in nodes["node1"]["bpfFeatures"]
    timings = nodes["node1"]["status"]["lastReconcile"]
    assert timings["revision"] == c1 and timings["totalSeconds"] > 0
    assert timings["totalSeconds"] >= timings["fetchSeconds"] + timings["applySeconds"]
    [counter] = operator(topo, pki, "get", "functions", "-o", "json")
    assert counter["name"] == "counter" and counter["nodes"] == 2
    assert counter["versions"][0]["revision"] == c1 and counter["versions"][0]["states"] == {
        "Applied": 2
    }
    history = operator(topo, pki, "get", "history", "--nf", "counter", "-o", "json")
    applied = [e for e in history if e["reason"] == "Applied"]
    assert {e["node"] for e in applied} == {"node1", "node2"}
    assert all(
        e["revision"] == c1 and e["author"] == "Alice Operator <alice@example.org>" for e in applied
    )


def start_event_stream(fleet: Fleet) -> None:
    """A live event stream, to see what happens next (read in event_stream_saw_the_changes)."""
    fleet.watcher = watch_events(
        fleet.topo, fleet.pki, f"{fleet.topo.hub_ip}:9443", subprocess.PIPE
    )


def reconcile_now_for_one_node(fleet: Fleet) -> None:
    """`nfctl reconcile --nodes node1`: the other node keeps its 300 s interval."""
    fleet.c2 = fleet.bump("1.0.0", "1.0.1", "counter 1.0.1")
    out = operator(fleet.topo, fleet.pki, "reconcile", "--nodes", "node1")
    assert "node1" in out.stdout
    wait_until(lambda: fleet.applied_at("node1", fleet.c2), 30, what="node1 at c2")
    assert fleet.applied_at("node2", fleet.c1)


def github_webhook_checks_its_signature(fleet: Fleet) -> None:
    """A GitHub push webhook: a bad signature does nothing, a good one reaches node2."""
    topo, secret = fleet.topo, fleet.secret
    push = {"ref": "refs/heads/main", "after": fleet.c2, "repository": {"name": "nfs-repo"}}
    status, _ = webhook(topo, secret, push, signature="sha256=" + "0" * 64)
    assert status == 401
    refused = controller_metrics(topo)  # the controller has judged it: refused, not sent
    assert 'result="bad_signature"} 1.0' in refused and 'result="delivered"' not in refused
    assert fleet.applied_at("node2", fleet.c1)
    status, text = webhook(topo, secret, push)
    assert status == 200 and sorted(json.loads(text)["nodes"]) == ["node1", "node2"]
    wait_until(lambda: fleet.applied_at("node2", fleet.c2), 30, what="node2 at c2 via webhook")
    hooks = controller_metrics(topo)
    deliveries = 'nfctl_controller_webhook_deliveries_total{provider="github",result='
    assert deliveries + '"bad_signature"} 1.0' in hooks
    assert deliveries + '"delivered"} 1.0' in hooks


def suspended_node_applies_nothing_until_resumed(fleet: Fleet) -> None:
    """Suspend node1 through the controller: a new commit reaches only node2."""
    topo, pki = fleet.topo, fleet.pki
    operator(topo, pki, "suspend", "--nodes", "node1")
    wait_until(
        lambda: fleet.nodes()["node1"]["status"].get("suspended"),
        20,
        what="node1 suspended",
    )
    c3 = fleet.c3 = fleet.bump("1.0.1", "1.0.2", "counter 1.0.2")
    node1 = next(a for a in fleet.agents if a.node == "node1")
    told = node1.output().count("controller: reconcile now")
    operator(topo, pki, "reconcile")
    wait_until(lambda: fleet.applied_at("node2", c3), 30, what="node2 at c3")
    # node1 got the command too, and has published its status since: it looked, and
    # being suspended, applied nothing
    wait_until(lambda: node1.output().count("controller: reconcile now") > told, 30)
    received = time.time()
    wait_until(lambda: node1.status().get("observedAt", 0) > received, 30, what="node1")
    assert node1.status()["lastAppliedRevision"] == fleet.c2
    assert fleet.applied_at("node1", fleet.c2)
    operator(topo, pki, "resume", "--nodes", "node1")
    operator(topo, pki, "reconcile", "--nodes", "node1")
    wait_until(lambda: fleet.applied_at("node1", c3), 30, what="node1 at c3 after resume")


def event_stream_saw_the_changes(fleet: Fleet) -> None:
    """The stream started before the reconcile showed the changes as they happened."""
    watcher = fleet.watcher
    assert watcher is not None
    watcher.terminate()
    streamed = [
        json.loads(line)
        for line in (watcher.communicate(timeout=10)[0] or "").splitlines()
        if line.strip()
    ]
    assert any(e["reason"] == "Applied" and e.get("revision") == fleet.c3 for e in streamed)
    assert any(e["reason"] == "Suspended" and e["node"] == "node1" for e in streamed)


def controller_restart_loses_nothing(fleet: Fleet) -> None:
    """Agents keep working without the controller, reconnect, and resend what it missed;
    a push it missed is not lost either."""
    topo, pki, agents = fleet.topo, fleet.pki, fleet.agents
    assert fleet.controller is not None
    fleet.controller.stop()
    c4 = fleet.bump("1.0.2", "1.0.3", "counter 1.0.3 while the controller is down")
    subprocess.run(
        [PY, "-m", "nfctl", "reconcile", "--local", "--state-dir", str(agents[0].state_dir)],
        check=True,
        cwd=REPO_ROOT,
        capture_output=True,
    )
    wait_until(
        lambda: agents[0].status().get("lastAppliedRevision") == c4,
        30,
        what="node1 applies c4 without controller",
    )
    fleet.start_controller()
    assert set(fleet.nodes()) == {"node1", "node2"}  # known from the database
    wait_until(lambda: fleet.applied_at("node1", c4), 60, what="node1 reports c4 after reconnect")
    history = operator(topo, pki, "get", "history", "--limit", "1000", "-o", "json")
    assert any(e["revision"] == c4 and e["node"] == "node1" for e in history)
    keys = [(e["node"], e["sequence"]) for e in history]
    assert len(keys) == len(set(keys)), "events duplicated after the agents resent them"
    # node2 was idle through the outage: it fetched on reconnect (a push the controller
    # missed is not lost) instead of waiting for its 300 s interval
    wait_until(lambda: fleet.applied_at("node2", c4), 30, what="node2 fetched c4")


def silent_agent_becomes_stale_and_is_kept(fleet: Fleet) -> None:
    """An agent that stops reporting becomes stale, and is kept with its last status."""
    topo, pki = fleet.topo, fleet.pki
    c4 = fleet.repo.head()
    fleet.agents[1].stop()
    wait_until(lambda: fleet.nodes()["node2"]["stale"], 20, what="node2 stale")
    node2 = fleet.nodes()["node2"]
    assert not node2["connected"] and node2["status"]["lastAppliedRevision"] == c4
    stale = operator(topo, pki, "get", "nodes", "--stale", "-o", "json")
    assert [n["status"]["node"] for n in stale] == ["node2"]

    metrics = controller_metrics(topo)
    assert "nfctl_controller_agents_connected 1.0" in metrics
    assert "nfctl_controller_agents_stale 1.0" in metrics
    assert 'nfctl_controller_functions{nf="counter"' in metrics
