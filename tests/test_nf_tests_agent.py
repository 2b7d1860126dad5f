"""The agent's test gate: a new build whose tests.yaml fails is refused like a verifier
error, and the running version keeps forwarding (and blocking) traffic."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfctl.netns import VethPair
from tests.agent_harness import (
    AgentProcess,
    GitDaemon,
    GitRepo,
    events_of,
    set_blocked_v4,
    wait_until,
    xdp_prog_id,
)

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]


@pytest.fixture
def daemon(tmp_path: Path, veth: VethPair) -> Iterator[GitDaemon]:
    (tmp_path / "git").mkdir()
    server = GitDaemon(tmp_path / "git", veth.ns_b, veth.b_ip)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _line(text: str, needle: str) -> int:
    return next(i + 1 for i, line in enumerate(text.splitlines()) if needle in line)


def test_failing_tests_refuse_the_version_and_keep_the_old_one_under_traffic(
    veth: VethPair, daemon: GitDaemon, tmp_path: Path, bpffs_root: Path
) -> None:
    repo = GitRepo(tmp_path / "git" / "nfs-repo")
    repo.add_library_nf("blocklist")  # with the library's tests.yaml
    blocked = veth.b_ip.rsplit(".", 1)[0] + ".66"
    veth.add_b_address(blocked)
    set_blocked_v4(repo, ["203.0.113.7", blocked])
    c1 = repo.commit("blocklist with its tests")
    agent = AgentProcess(veth, daemon.url("nfs-repo"), tmp_path / "state", bpffs_root).start()
    try:
        agent.wait_ready(c1, timeout=180)  # the gate ran on this first build and passed
        good = agent.nf("blocklist")
        assert good["state"] == "Applied" and good.get("lastError") is None
        assert veth.ping(veth.ns_b, veth.a_ip, 2, source=blocked, timeout_s=0.3) == 0
        assert veth.ping_a_from_b(2) == 2
        live_prog = xdp_prog_id(veth)

        # A new version that no longer drops listed IPv4 sources: compiles and verifies,
        # but the library test "drops a listed IPv4 source" fails.
        source = repo.read("nfs/blocklist/blocklist.c")
        broken = source.replace("return count_drop(0);", "return XDP_PASS;")
        assert broken != source
        repo.write("nfs/blocklist/blocklist.c", broken)
        repo.write(
            "nfs/blocklist/nf.yaml",
            repo.read("nfs/blocklist/nf.yaml").replace("version: 1.0.0", "version: 1.1.0"),
        )
        replies: list[int] = []
        traffic = threading.Thread(
            target=lambda: replies.append(veth.ping_a_from_b(300, interval=0.02)), daemon=True
        )
        traffic.start()
        c2 = repo.commit("blocklist 1.1.0 (broken)")
        wait_until(
            lambda: (
                agent.status().get("lastAttemptedRevision") == c2
                and agent.nf("blocklist").get("state") == "Failed"
            ),
            180,
            what=f"refused by the test gate\n{agent.output()[-3000:]}",
        )
        nf = agent.nf("blocklist")
        assert (nf["version"], nf["revision"], nf["programId"]) == (
            "1.0.0",
            c1,
            good["programId"],
        )
        error = nf["lastError"]
        tests_text = repo.read("nfs/blocklist/tests.yaml")
        assert error["reason"] == "TestsFailed"
        assert error["file"] == "nfs/blocklist/tests.yaml"
        assert error["line"] == _line(tests_text, "verdict: drop")
        assert error["message"].startswith(
            "test 'drops a listed IPv4 source' failed: expected verdict drop, got pass"
        )
        assert error["revision"] == c2
        refused = events_of(agent, "TestsFailed", "blocklist")
        assert refused and refused[-1]["revision"] == c2
        assert "keeping version 1.0.0" in refused[-1]["message"]
        assert agent.status()["lastAppliedRevision"] == c1
        # both versions were tested on a private copy of their live build: no test build
        output = agent.output()
        assert output.count("tests of blocklist ran on the live build's private copy") >= 2
        assert "on a test build of their own" not in output

        # the old version is still attached and still enforcing
        assert xdp_prog_id(veth) == live_prog
        assert veth.ping(veth.ns_b, veth.a_ip, 3, source=blocked, timeout_s=0.3) == 0
        traffic.join(timeout=60)
        assert replies == [300]  # no packet lost while the new version was built and refused
    finally:
        agent.stop(timeout=120)  # SIGTERM waits for a retry's compile on a busy machine
