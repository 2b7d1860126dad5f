"""The controller with real agents over mTLS on a lab topology (namespaces on a bridge)."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfctl.lab.topology import Topology, nsenter
from tests.agent_harness import GitDaemon, GitRepo, wait_until
from tests.conftest import require_kernel
from tests.controller_harness import (
    PY,
    REPO_ROOT,
    ControllerProcess,
    NodeAgent,
    Pki,
    hub_python,
    new_topology,
    operator,
)

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_kernel()
    topology = new_topology(2)
    try:
        yield topology
    finally:
        topology.destroy()


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


@pytest.mark.slow
def test_fleet_status_events_and_commands(topo: Topology, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki", topo, ["node1", "node2"])
    secret = b"hook-secret-123"
    (tmp_path / "hook.secret").write_bytes(secret)
    gitdir = tmp_path / "git"
    repo = GitRepo(gitdir / "nfs-repo")
    repo.add_library_nf("counter")
    c1 = repo.commit("counter 1.0.0")
    git = GitDaemon(gitdir, topo.hub, topo.hub_ip)
    git.start()
    controller = ControllerProcess(
        topo,
        pki,
        tmp_path / "ctl" / "controller.db",
        "--webhook-secret-file",
        str(tmp_path / "hook.secret"),
        "--stale-after",
        "3",
    ).start()
    agents = [
        NodeAgent(topo, n, pki, git.url("nfs-repo"), tmp_path, "--interval", "300").start()
        for n in ("node1", "node2")
    ]
    try:
        # registration, status, fleet view of the NF
        wait_until(
            lambda: all(applied_at(topo, pki, n, c1) for n in ("node1", "node2")),
            60,
            what="both nodes at c1",
        )
        nodes = nodes_by_name(topo, pki)
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
            e["revision"] == c1 and e["author"] == "Alice Operator <alice@example.org>"
            for e in applied
        )

        # a live event stream sees what happens next
        watcher = subprocess.Popen(
            [
                *nsenter(topo.hub),
                PY,
                "-m",
                "nfctl",
                "events",
                "--watch",
                "-o",
                "json",
                "--controller",
                f"{topo.hub_ip}:9443",
                *pki.tls("operator"),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
        )

        # reconcile now, for one node: the other keeps its 300 s interval
        repo.write(
            "nfs/counter/nf.yaml",
            repo.read("nfs/counter/nf.yaml").replace("version: 1.0.0", "version: 1.0.1"),
        )
        c2 = repo.commit("counter 1.0.1")
        out = operator(topo, pki, "reconcile", "--nodes", "node1")
        assert "node1" in out.stdout
        wait_until(lambda: applied_at(topo, pki, "node1", c2), 30, what="node1 at c2")
        assert applied_at(topo, pki, "node2", c1)

        # a GitHub push webhook: a bad signature does nothing, a good one reaches node2
        push = {"ref": "refs/heads/main", "after": c2, "repository": {"name": "nfs-repo"}}
        status, _ = webhook(topo, secret, push, signature="sha256=" + "0" * 64)
        assert status == 401
        refused = controller_metrics(topo)  # the controller has judged it: refused, not sent
        assert 'result="bad_signature"} 1.0' in refused and 'result="delivered"' not in refused
        assert applied_at(topo, pki, "node2", c1)
        status, text = webhook(topo, secret, push)
        assert status == 200 and sorted(json.loads(text)["nodes"]) == ["node1", "node2"]
        wait_until(lambda: applied_at(topo, pki, "node2", c2), 30, what="node2 at c2 via webhook")
        hooks = controller_metrics(topo)
        deliveries = 'nfctl_controller_webhook_deliveries_total{provider="github",result='
        assert deliveries + '"bad_signature"} 1.0' in hooks
        assert deliveries + '"delivered"} 1.0' in hooks

        # suspend node1 through the controller: a new commit reaches only node2
        operator(topo, pki, "suspend", "--nodes", "node1")
        wait_until(
            lambda: nodes_by_name(topo, pki)["node1"]["status"].get("suspended"),
            20,
            what="node1 suspended",
        )
        repo.write(
            "nfs/counter/nf.yaml",
            repo.read("nfs/counter/nf.yaml").replace("version: 1.0.1", "version: 1.0.2"),
        )
        c3 = repo.commit("counter 1.0.2")
        node1 = next(a for a in agents if a.node == "node1")
        told = node1.output().count("controller: reconcile now")
        operator(topo, pki, "reconcile")
        wait_until(lambda: applied_at(topo, pki, "node2", c3), 30, what="node2 at c3")
        # node1 got the command too, and has published its status since: it looked, and
        # being suspended, applied nothing
        wait_until(lambda: node1.output().count("controller: reconcile now") > told, 30)
        received = time.time()
        wait_until(lambda: node1.status().get("observedAt", 0) > received, 30, what="node1")
        assert node1.status()["lastAppliedRevision"] == c2
        assert applied_at(topo, pki, "node1", c2)
        operator(topo, pki, "resume", "--nodes", "node1")
        operator(topo, pki, "reconcile", "--nodes", "node1")
        wait_until(lambda: applied_at(topo, pki, "node1", c3), 30, what="node1 at c3 after resume")

        # the event stream saw the changes as they happened
        watcher.terminate()
        streamed = [
            json.loads(line)
            for line in (watcher.communicate(timeout=10)[0] or "").splitlines()
            if line.strip()
        ]
        assert any(e["reason"] == "Applied" and e.get("revision") == c3 for e in streamed)
        assert any(e["reason"] == "Suspended" and e["node"] == "node1" for e in streamed)

        # controller restart: agents keep working, reconnect, and resend what it missed
        controller.stop()
        repo.write(
            "nfs/counter/nf.yaml",
            repo.read("nfs/counter/nf.yaml").replace("version: 1.0.2", "version: 1.0.3"),
        )
        c4 = repo.commit("counter 1.0.3 while the controller is down")
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
        controller = ControllerProcess(
            topo,
            pki,
            tmp_path / "ctl" / "controller.db",
            "--webhook-secret-file",
            str(tmp_path / "hook.secret"),
            "--stale-after",
            "3",
        ).start()
        assert set(nodes_by_name(topo, pki)) == {"node1", "node2"}  # known from the database
        wait_until(
            lambda: applied_at(topo, pki, "node1", c4), 60, what="node1 reports c4 after reconnect"
        )
        history = operator(topo, pki, "get", "history", "--limit", "1000", "-o", "json")
        assert any(e["revision"] == c4 and e["node"] == "node1" for e in history)
        keys = [(e["node"], e["sequence"]) for e in history]
        assert len(keys) == len(set(keys)), "events duplicated after the agents resent them"

        # node2 was idle through the outage: it fetched on reconnect (a push the controller
        # missed is not lost) instead of waiting for its 300 s interval
        wait_until(lambda: applied_at(topo, pki, "node2", c4), 30, what="node2 fetched c4")

        # an agent that stops reporting becomes stale, and is kept
        agents[1].stop()
        wait_until(lambda: nodes_by_name(topo, pki)["node2"]["stale"], 20, what="node2 stale")
        node2 = nodes_by_name(topo, pki)["node2"]
        assert not node2["connected"] and node2["status"]["lastAppliedRevision"] == c4
        stale = operator(topo, pki, "get", "nodes", "--stale", "-o", "json")
        assert [n["status"]["node"] for n in stale] == ["node2"]

        metrics = controller_metrics(topo)
        assert "nfctl_controller_agents_connected 1.0" in metrics
        assert "nfctl_controller_agents_stale 1.0" in metrics
        assert 'nfctl_controller_functions{nf="counter"' in metrics
    finally:
        for agent in agents:
            agent.teardown()
        controller.stop()
        git.stop()
