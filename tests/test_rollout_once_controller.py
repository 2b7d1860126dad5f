"""`nfctl agent --once` against the real controller driving a real rollout: a lab topology
(hub and two node namespaces), `nfctl controller --source` with its SQLite store, a
long-running agent on node1 (the canary) and `--once` runs on node2, real programs in the
kernel. node2 never runs a revision the controller did not approve for it: not while the
fleet is mid-rollout, not with the controller gone."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfctl.lab.topology import Topology
from tests.agent_harness import GitDaemon, GitRepo, wait_until
from tests.controller_harness import ControllerProcess, NodeAgent, Pki, kernel_topology, operator

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]

# the canary (node1, first by name) bakes long enough for the test to look at a fleet
# mid-rollout; an operator's promote ends it
POLICY = """\
apiVersion: nfctl.io/v1alpha1
kind: RolloutPolicy
metadata:
  name: fleet
spec:
  waves:
    - name: canary
      count: 1
      bake: 10m
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    with kernel_topology(2) as topology:
        yield topology


def rollout_of(topo: Topology, pki: Pki, revision: str) -> dict[str, Any]:
    found: dict[str, Any] = operator(topo, pki, "rollout", "status", "-o", "json", check=False)
    return found if isinstance(found, dict) and found.get("revision") == revision else {}


def once(agent: NodeAgent) -> tuple[int, dict[str, Any], str]:
    """One `--once` run: exit code, the status it left, its output (unwrapped)."""
    agent.start()
    code = agent.wait(180)
    return code, agent.status(), " ".join(agent.output().split())


def bump(repo: GitRepo, n: int) -> str:
    """A new revision of the same NF (a comment in its manifest)."""
    repo.write("nfs/counter/nf.yaml", repo.read("nfs/counter/nf.yaml") + f"# change {n}\n")
    return repo.commit(f"counter change {n}")


def test_once_mid_rollout_applies_only_what_the_real_controller_approved(
    topo: Topology, tmp_path: Path
) -> None:
    pki = Pki(tmp_path / "pki", topo, ["node1", "node2"])
    repo = GitRepo(tmp_path / "git" / "nfs-repo")
    repo.add_library_nf("counter")
    repo.write("nfs/rollout.yaml", POLICY)
    c1 = repo.commit("counter under a rollout policy")
    git = GitDaemon(tmp_path / "git", topo.hub, topo.hub_ip)
    git.start()
    url = git.url("nfs-repo")
    (tmp_path / "ctl").mkdir()
    controller = ControllerProcess(
        topo, pki, tmp_path / "ctl" / "controller.db",
        "--source", url, "--path", "nfs", "--source-interval", "1", "--rollout-tick", "0.5",
    )  # fmt: skip
    canary = NodeAgent(topo, "node1", pki, url, tmp_path, "--interval", "1")
    node2 = NodeAgent(topo, "node2", pki, url, tmp_path, "--once")
    node2.log_mode = "w"  # each run's own output
    controller.start()
    canary.start()
    try:
        # the first policy rolls out to the fleet (node1) at once
        wait_until(
            lambda: rollout_of(topo, pki, c1).get("state") == "Completed",
            90,
            what=f"c1 rollout completed\n{controller.output()[-2000:]}",
        )
        wait_until(lambda: canary.status().get("lastAppliedRevision") == c1, 90, what="c1")

        # 1. node2 joins with --once: the fleet's last completed revision is approved
        code, status, out = once(node2)
        assert code == 0, out[-3000:]
        assert status["lastAppliedRevision"] == c1 and status["approvedRevision"] == c1

        # 2. mid-rollout: c2 is on the canary and baking; node2 is not approved for it
        c2 = bump(repo, 2)
        wait_until(
            lambda: (
                rollout_of(topo, pki, c2).get("state") == "Progressing"
                and canary.status().get("lastAppliedRevision") == c2
            ),
            90,
            what=f"c2 on the canary\n{controller.output()[-2000:]}",
        )
        code, status, out = once(node2)
        assert code == 0, out[-3000:]
        assert status["source"]["lastFetchedRevision"] == c2
        assert status["lastAppliedRevision"] == c1 and status["approvedRevision"] == c1
        assert rollout_of(topo, pki, c2).get("state") == "Progressing"  # still mid-rollout

        # 3. the operator promotes: the rollout completes and node2 is approved for c2
        operator(topo, pki, "rollout", "promote", "--reason", "test")
        wait_until(
            lambda: rollout_of(topo, pki, c2).get("state") == "Completed",
            60,
            what=f"c2 rollout completed\n{controller.output()[-2000:]}",
        )
        code, status, out = once(node2)
        assert code == 0, out[-3000:]
        assert status["lastAppliedRevision"] == c2 and status["approvedRevision"] == c2

        # 4. the controller is gone and the branch moves on: node2 holds its persisted c2
        controller.stop()
        c3 = bump(repo, 3)
        code, status, out = once(node2)
        assert code == 0, out[-3000:]
        assert status["source"]["lastFetchedRevision"] == c3
        assert status["lastAppliedRevision"] == c2 and status["approvedRevision"] == c2
        assert re.search(r"controller \S+ did not answer", out), out[-3000:]
    finally:
        for agent in (canary, node2):
            agent.teardown()
        controller.stop()
        git.stop()
