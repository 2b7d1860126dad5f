"""`nfctl diff` against the state dir of a real agent that applied real NFs, for each kind of
change; plus the pure rules that a kernel-less run cannot reach (another node's toolchain)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nfctl.diagnostics import Diagnostic
from nfctl.diff import AppliedView, Change, DesiredNF, NodeView, Program, diff_node
from nfctl.manifest.model import NetworkFunction
from nfctl.netns import VethPair
from tests.agent_harness import REPO_ROOT, AgentProcess, GitRepo, set_blocked_v4

NFCTL = [str(Path(sys.executable).parent / "nfctl")]


def nfctl_diff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NFCTL, "diff", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "250"},
        check=False,
    )


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {nf["name"]: nf for nf in report["nfs"]}


def select(repo: GitRepo, nf: str, role: str) -> None:
    path = f"nfs/{nf}/nf.yaml"
    text = repo.read(path)
    if "nodeSelector" in text:
        text = text.replace(text[text.index("  nodeSelector:") : text.index("  attach:")], "")
    repo.write(path, text.replace("  attach:\n", f"  nodeSelector:\n    role: {role}\n  attach:\n"))


@pytest.mark.kernel
def test_diff_against_a_real_node_state(veth: VethPair, bpffs_root: Path, tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "nfs-repo")
    for nf in ("counter", "blocklist", "ratelimit", "dscp"):
        repo.add_library_nf(nf)
    select(repo, "dscp", "core")  # not for this node
    c1 = repo.commit("counter, blocklist, ratelimit; dscp on core nodes")
    state = tmp_path / "state"
    agent = AgentProcess(
        veth, f"file://{repo.path}", state, bpffs_root, "--once", "--labels", "role=edge"
    )
    try:
        agent.start()
        assert agent.wait(timeout=180) == 0, agent.output()[-3000:]
        assert agent.status()["lastAppliedRevision"] == c1

        # the node state against its own revision: nothing to do, exit 0
        same = nfctl_diff(
            str(repo.path), "--node-state", str(state), "--revision", c1, "-o", "json"
        )
        assert same.returncode == 0, same.stdout + same.stderr
        report = json.loads(same.stdout)
        assert report["node"] == "node-a" and report["revision"] == c1 and not report["changed"]
        nfs = by_name(report)
        assert {n: nf["change"] for n, nf in nfs.items()} == {
            "counter": "unchanged",
            "blocklist": "unchanged",
            "ratelimit": "unchanged",
            "dscp": "not-selected",
        }
        # the hash computed here from the node's checkout equals the node's own build hash
        assert all(nfs[n]["program"] == "same" for n in ("counter", "blocklist", "ratelimit"))
        assert any(p.endswith("/tc-ingress") for p in nfs["counter"]["attached"])

        # a working tree with one change of each kind
        repo.write("nfs/counter/counter.c", repo.read("nfs/counter/counter.c") + "\n// v2\n")
        set_blocked_v4(repo, ["198.51.100.9"])
        manifest = repo.read("nfs/blocklist/nf.yaml").replace("priority: 100", "priority: 150")
        repo.write("nfs/blocklist/nf.yaml", manifest)
        select(repo, "ratelimit", "core")
        select(repo, "dscp", "edge")
        repo.write(
            "nfs/broken/nf.yaml",
            "apiVersion: nfctl.io/v1alpha1\nkind: NetworkFunction\nmetadata:\n  name: broken\n"
            "spec:\n  version: 1.0.0\n  program: {source: x.c, function: f}\n"
            "  attach:\n    hook: xdp\n    interfaces: [eth0]\n    priority: -4\n",
        )
        before = {p: p.stat().st_mtime_ns for p in state.rglob("*") if p.is_file()}
        proc = nfctl_diff(str(repo.path), "--node-state", str(state), "-o", "json")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        report = json.loads(proc.stdout)
        assert report["changed"] and report["target"].startswith("working tree")
        nfs = by_name(report)

        counter = nfs["counter"]
        assert counter["change"] == "rebuilt" and counter["program"] == "changed"
        assert counter["entries"] == {} and counter["attach"] == {}

        blocklist = nfs["blocklist"]
        assert blocklist["change"] == "updated" and blocklist["program"] == "same"
        assert blocklist["attach"] == {"priority": {"old": 100, "new": 150}}
        assert blocklist["entries"] == {
            "blocked_v4": {
                "added": [{"key": "198.51.100.9", "value": 1}],
                "changed": [],
                "removed": [{"key": "203.0.113.7", "value": 1}],
            }
        }

        ratelimit = nfs["ratelimit"]
        assert ratelimit["change"] == "removed" and "deselected" in ratelimit["notes"][0]
        assert ratelimit["attached"], "where it runs now"

        dscp = nfs["dscp"]
        assert dscp["change"] == "added" and "newly selected" in dscp["notes"][0]

        broken = nfs["nfs/broken/nf.yaml"]  # it did not parse: named by its file
        assert broken["change"] == "refused"
        [error] = broken["errors"]
        assert error["file"] == "nfs/broken/nf.yaml" and error["line"] == 11
        assert "priority" in error["field"]

        # people get the same in a table, and the node's state dir was only read
        text = nfctl_diff(str(repo.path), "--node-state", str(state))
        assert text.returncode == 1, text.stderr
        for expected in (
            "rebuilt",
            "blocked_v4 + 198.51.100.9: 1",
            "blocked_v4 - 203.0.113.7: 1",
            "attach priority: 100 → 150",
            "nfs/broken/nf.yaml:11",
            "Checked without compiling",
        ):
            assert expected in text.stdout, (expected, text.stdout)
        after = {p: p.stat().st_mtime_ns for p in state.rglob("*") if p.is_file()}
        assert after == before
    finally:
        agent.stop()
        from nfctl.datapath.datapath import Datapath

        Datapath(bpffs_root, state, netns=veth.ns_a).teardown()


def test_diff_refuses_a_folder_without_agent_state(tmp_path: Path) -> None:
    proc = nfctl_diff(str(tmp_path), "--node-state", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "status.json is missing" in proc.stderr
    assert not (tmp_path / "nowhere").exists()


# -- pure rules --------------------------------------------------------------------------------


def nf(version: str = "1.0.0", entries: list[dict[str, Any]] | None = None) -> NetworkFunction:
    return NetworkFunction.model_validate(
        {
            "apiVersion": "nfctl.io/v1alpha1",
            "kind": "NetworkFunction",
            "metadata": {"name": "fw"},
            "spec": {
                "version": version,
                "program": {"source": "fw.c", "function": "xdp_fw"},
                "attach": {"hook": "xdp", "interfaces": ["eth*"]},
                "maps": {"rules": {"managed": True, "entries": entries or []}},
            },
        }
    )


def node(applied: AppliedView) -> NodeView:
    return NodeView("edge-1", {"role": "edge"}, "6.1.0-node", {"fw": applied}, revision="a" * 40)


def test_other_toolchain_without_checkout_says_a_node_build_decides() -> None:
    applied = AppliedView("fw", "a" * 40, "hash-on-node", nf(), "nfs/fw/nf.yaml")
    result = diff_node(node(applied), [DesiredNF("nfs/fw/nf.yaml", nf(), "hash-here")], "HEAD")
    [fw] = result.nfs
    assert fw.program is Program.UNKNOWN and fw.change is Change.UPDATED
    assert "a build on the node" in fw.notes[0] and "6.1.0-node" in fw.notes[0]


def test_entry_value_change_and_version_bump_without_rebuild() -> None:
    old = nf("1.0.0", [{"key": 80, "value": 1}, {"key": 22, "value": 1}])
    new = nf("1.0.1", [{"key": 80, "value": 2}, {"key": 22, "value": 1}])
    applied = AppliedView("fw", "a" * 40, "h", old, "nfs/fw/nf.yaml", local_build_hash="h")
    [fw] = diff_node(node(applied), [DesiredNF("nfs/fw/nf.yaml", new, "h")], "HEAD").nfs
    assert fw.change is Change.UPDATED and fw.program is Program.SAME
    assert fw.version == ("1.0.0", "1.0.1")
    assert fw.entries["rules"].changed == [{"key": 80, "old": 1, "new": 2}]
    assert not fw.entries["rules"].added and not fw.entries["rules"].removed


def test_a_manifest_that_stops_parsing_fails_its_nf_which_keeps_running() -> None:
    applied = AppliedView("fw", "a" * 40, "h", nf(), "nfs/fw/nf.yaml", local_build_hash="h")
    broken = Diagnostic(file="nfs/fw/nf.yaml", line=3, message="mapping values are not allowed")
    desired = [DesiredNF("nfs/fw/nf.yaml", None, errors=(broken,))]
    [fw] = diff_node(node(applied), desired, "HEAD").nfs
    assert fw.name == "fw" and fw.change is Change.REFUSED
    assert "keeps running version 1.0.0" in fw.notes[0] and fw.errors == [broken]


# -- fleet-wide, through a real controller -------------------------------------------------------


@pytest.mark.kernel
def test_fleet_diff_through_the_controller(tmp_path: Path) -> None:
    from nfctl.lab.topology import Topology
    from tests.agent_harness import GitDaemon, wait_until
    from tests.conftest import require_kernel
    from tests.controller_harness import ControllerProcess, NodeAgent, Pki, new_topology, operator

    require_kernel()
    topo: Topology = new_topology(2)
    pki = Pki(tmp_path / "pki", topo, ["node1", "node2"])
    gitdir = tmp_path / "git"
    repo = GitRepo(gitdir / "nfs-repo")
    repo.add_library_nf("counter")
    repo.add_library_nf("blocklist")
    select(repo, "blocklist", "edge")
    c1 = repo.commit("counter everywhere, blocklist on edge nodes")
    git = GitDaemon(gitdir, topo.hub, topo.hub_ip)
    git.start()
    controller = ControllerProcess(topo, pki, tmp_path / "ctl" / "controller.db").start()
    agents = [
        NodeAgent(topo, n, pki, git.url("nfs-repo"), tmp_path, "--labels", f"role={role}").start()
        for n, role in (("node1", "edge"), ("node2", "core"))
    ]
    try:
        wait_until(
            lambda: all(a.status().get("lastAppliedRevision") == c1 for a in agents),
            180,
            what="both nodes at c1",
        )
        wait_until(
            lambda: (
                all(
                    n["status"].get("lastAppliedRevision") == c1
                    for n in operator(topo, pki, "get", "nodes", "-o", "json")
                )
                and len(operator(topo, pki, "get", "nodes", "-o", "json")) == 2
            ),
            60,
            what="the controller sees both at c1",
        )
        repo.write("nfs/counter/counter.c", repo.read("nfs/counter/counter.c") + "\n// v2\n")
        set_blocked_v4(repo, ["198.51.100.9"])
        repo.add_library_nf("ratelimit")
        select(repo, "ratelimit", "core")

        proc = operator(topo, pki, "diff", str(repo.path), "-o", "json", check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        report = json.loads(proc.stdout)
        assert report["changed"] and report["target"].startswith("working tree")
        nodes = {n["node"]: by_name(n) for n in report["nodes"]}
        changes = {
            node: {name: nf["change"] for name, nf in nfs.items()} for node, nfs in nodes.items()
        }
        assert changes == {
            "node1": {"counter": "rebuilt", "blocklist": "updated", "ratelimit": "not-selected"},
            "node2": {"counter": "rebuilt", "blocklist": "not-selected", "ratelimit": "added"},
        }
        assert nodes["node1"]["blocklist"]["entries"]["blocked_v4"]["added"] == [
            {"key": "198.51.100.9", "value": 1}
        ]
        assert nodes["node1"]["blocklist"]["program"] == "same"

        # the NF folder itself, as a user gives it (`nfctl diff path/to/nfs`): the same report
        nf_folder = operator(topo, pki, "diff", str(repo.path / "nfs"), "-o", "json", check=False)
        assert nf_folder.returncode == 1, nf_folder.stdout + nf_folder.stderr
        assert json.loads(nf_folder.stdout)["nodes"] == report["nodes"]
        # a folder that is not the one the nodes follow: said, not blamed on a missing fetch
        inner = operator(topo, pki, "diff", str(repo.path / "nfs" / "counter"), check=False)
        assert inner.returncode == 2, inner.stdout + inner.stderr
        message = " ".join(inner.stderr.split())
        assert "is not in 'nfs/counter' at that revision" in message, message

        # only the core nodes; and the revision the fleet runs changes nothing
        core = operator(
            topo, pki, "diff", str(repo.path), "-l", "role=core", "-o", "json", check=False
        )
        assert [n["node"] for n in json.loads(core.stdout)["nodes"]] == ["node2"]
        # exit 0 (operator() parses the JSON only then): the fleet runs c1 already
        same = operator(topo, pki, "diff", str(repo.path), "-r", c1, "-o", "json")
        assert not same["changed"] and len(same["nodes"]) == 2
    finally:
        for a in agents:
            a.teardown()
        controller.stop()
        git.stop()
        topo.destroy()
