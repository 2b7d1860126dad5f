"""The node agent beyond the lifecycle test: signed commits, refs, interfaces that appear
later, suspend/resume, metrics and health, --once and config files, nodeSelector, drift in
warn mode, `nfctl status`, and credentials kept out of every output.

Real Git repositories (git daemon, smart HTTP with authentication), real agent processes,
real traffic through the NFs they attach. Nothing is mocked."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from nfctl.netns import VethPair
from tests.agent_harness import (
    AgentProcess,
    GitDaemon,
    GitHttpServer,
    GitRepo,
    GpgKey,
    condition,
    delete_tc_filter,
    events_of,
    metric_samples,
    nfctl,
    run_in,
    set_blocked_v4,
    ssh_signing_key,
    tc_filter_present,
    wait_until,
    xdp_prog_id,
)

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]

os.environ.setdefault("PYTHONUNBUFFERED", "1")

# the library counter's key for IPv4 ICMP (ethertype 0x0800, protocol 1)
ICMP_V4_KEY = "ethertype=2048,proto=1,pad=0"


@dataclass
class Lab:
    """One veth pair, a Git repository served over git:// from namespace b, and the
    agents a test starts in namespace a (all stopped, and everything they attached
    removed, at the end)."""

    veth: VethPair
    tmp: Path
    bpffs_root: Path
    repo: GitRepo
    daemon: GitDaemon
    state_dir: Path
    agents: list[AgentProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.daemon.url("nfs-repo")

    def agent(self, *extra: str, url: str | None = None, start: bool = True) -> AgentProcess:
        agent = AgentProcess(self.veth, url or self.url, self.state_dir, self.bpffs_root, *extra)
        # a distinct log per process (the harness names logs by start time in ms)
        time.sleep(0.002)
        self.agents.append(agent)
        return agent.start() if start else agent

    def blocked_source(self) -> str:
        ip = self.veth.b_ip.rsplit(".", 1)[0] + ".66"
        self.veth.add_b_address(ip)
        return ip

    def ping_from(self, source: str | None, count: int = 2) -> int:
        return self.veth.ping(self.veth.ns_b, self.veth.a_ip, count, source=source, timeout_s=0.3)


@pytest.fixture
def lab(veth: VethPair, tmp_path: Path, bpffs_root: Path) -> Iterator[Lab]:
    gitdir = tmp_path / "git"
    repo = GitRepo(gitdir / "nfs-repo")
    daemon = GitDaemon(gitdir, veth.ns_b, veth.b_ip)
    daemon.start()
    state_dir = tmp_path / "state"
    lab = Lab(veth, tmp_path, bpffs_root, repo, daemon, state_dir)
    try:
        yield lab
    finally:
        for agent in lab.agents:
            try:
                agent.stop(signal.SIGTERM)
            except Exception:
                agent.stop(signal.SIGKILL)
        daemon.stop()
        from nfctl.datapath.datapath import Datapath

        Datapath(bpffs_root, state_dir, netns=veth.ns_a).teardown()


def with_node_selector(repo: GitRepo, nf: str, selector: dict[str, str]) -> None:
    path = f"nfs/{nf}/nf.yaml"
    lines = "".join(f"    {k}: {v}\n" for k, v in selector.items())
    repo.write(path, repo.read(path).replace("  attach:\n", f"  nodeSelector:\n{lines}  attach:\n"))


def with_spec_suspend(repo: GitRepo, nf: str, suspend: bool) -> None:
    path = f"nfs/{nf}/nf.yaml"
    text = repo.read(path).replace("  suspend: true\n", "")
    if suspend:
        text = text.replace("  attach:\n", "  suspend: true\n  attach:\n")
    repo.write(path, text)


def counter_icmp_packets(agent: AgentProcess) -> float:
    code, body = agent.http_get("/metrics")
    assert code == 200
    samples = [
        value
        for labels, value in metric_samples(body, "nfctl_nf_counter_packets_total")
        if labels == {"nf": "counter", "map": "proto_stats", "key": ICMP_V4_KEY}
    ]
    return samples[0] if samples else 0.0


def wait_refused(agent: AgentProcess, sha: str) -> dict[str, Any]:
    def refused() -> dict[str, Any]:
        found = [e for e in events_of(agent, "RevisionRefused") if e.get("revision") == sha]
        done = agent.status().get("lastAttemptedRevision") == sha
        return found[-1] if found and done else {}

    return wait_until(refused, 30, what=f"{sha[:12]} refused\n{agent.output()[-2000:]}")


# -- 1. commit signatures -----------------------------------------------------------------------


@dataclass
class Signing:
    """The keys of the signature test: alice's OpenPGP and SSH keys are trusted (in the
    folder given to --trusted-keys); mallory's, with alice's name and email, are not. And
    what the phases record for the ones after them."""

    lab: Lab
    alice: GpgKey
    mallory: GpgKey
    alice_ssh: Path
    mallory_ssh: Path
    trusted: Path
    blocked: str
    agent: AgentProcess | None = None
    program_id: int = 0
    applied: list[str] = field(default_factory=list)  # in order; the last is running
    refused: list[str] = field(default_factory=list)

    def running(self) -> AgentProcess:
        assert self.agent is not None, "no agent started"
        return self.agent

    def start_agent(self) -> AgentProcess:
        self.agent = self.lab.agent("--verify-signatures", "--trusted-keys", str(self.trusted))
        return self.agent

    def refuse(self, revision: str) -> dict[str, Any]:
        """The RevisionRefused event for revision, once the agent has tried it."""
        self.refused.append(revision)
        return wait_refused(self.running(), revision)


@pytest.fixture
def signing(lab: Lab) -> Iterator[Signing]:
    alice = GpgKey.generate(lab.tmp / "gnupg-alice", "Alice Operator", "alice@example.org")
    mallory = GpgKey.generate(lab.tmp / "gnupg-mallory", "Alice Operator", "alice@example.org")
    try:
        trusted = lab.tmp / "trusted"
        trusted.mkdir()
        alice.export(trusted / "alice.asc")
        alice_ssh = ssh_signing_key(lab.tmp / "alice_ssh", "alice")
        mallory_ssh = ssh_signing_key(lab.tmp / "mallory_ssh", "mallory")
        pub = (lab.tmp / "alice_ssh.pub").read_text().strip()
        (trusted / "allowed_signers").write_text(f"alice@example.org {pub}\n")
        blocked = lab.blocked_source()
        yield Signing(lab, alice, mallory, alice_ssh, mallory_ssh, trusted, blocked)
    finally:
        alice.stop_agent()
        mallory.stop_agent()


def test_signed_commits_only(signing: Signing) -> None:
    """--verify-signatures: commits signed by a trusted OpenPGP or SSH key are applied;
    unsigned commits, commits signed by another key, and commits signed by a key the
    operator removed from the trusted folder are refused while the last good revision
    keeps running, even across a restart with Git unreachable.

    Each phase is a function below, run in this order because each starts from the state
    the one before left: the last restarts on a mirror holding every commit refused before,
    so as independent tests each would replay the ones before it."""
    openpgp_signed_commit_is_applied(signing)
    unsigned_commit_is_refused(signing)
    openpgp_signature_by_another_key_is_refused(signing)
    ssh_signature_by_listed_key_is_applied(signing)
    ssh_signature_by_unlisted_key_is_refused(signing)
    withdrawn_trust_refuses_the_next_commit(signing)
    refused_commits_stay_refused_across_a_restart_without_git(signing)


def openpgp_signed_commit_is_applied(signing: Signing) -> None:
    repo = signing.lab.repo
    repo.add_library_nf("blocklist")
    c1 = repo.commit_gpg_signed("blocklist, signed", signing.alice)
    agent = signing.start_agent()
    agent.wait_ready(c1)
    signing.applied.append(c1)
    signing.program_id = agent.nf("blocklist")["programId"]
    assert signing.lab.ping_from(signing.blocked) == 2


def unsigned_commit_is_refused(signing: Signing) -> None:
    """Refused, reported with the refused commit; nothing changes."""
    lab, agent, blocked = signing.lab, signing.running(), signing.blocked
    c1 = signing.applied[-1]
    set_blocked_v4(lab.repo, ["203.0.113.7", blocked])
    event = signing.refuse(lab.repo.commit("block a source, unsigned"))
    assert "not signed" in event["message"]
    assert event["author"] == "Alice Operator <alice@example.org>"
    status = agent.status()
    assert status["lastAppliedRevision"] == c1
    stalled = condition(status, "Stalled")
    assert stalled["status"] is True and stalled["reason"] == "UntrustedRevision"
    ready = condition(status, "Ready")
    assert ready["status"] is False and ready["reason"] == "UntrustedRevision"
    assert agent.nf("blocklist")["revision"] == c1
    assert agent.nf("blocklist")["programId"] == signing.program_id
    assert xdp_prog_id(lab.veth) != 0
    assert lab.ping_from(blocked) == 2


def openpgp_signature_by_another_key_is_refused(signing: Signing) -> None:
    """Signed by a key that is not in the trusted folder (same name and email)."""
    lab = signing.lab
    event = signing.refuse(
        lab.repo.commit_gpg_signed("block a source, signed by another key", signing.mallory)
    )
    assert "not among the trusted keys" in event["message"]
    assert signing.running().status()["lastAppliedRevision"] == signing.applied[-1]
    assert lab.ping_from(signing.blocked) == 2


def ssh_signature_by_listed_key_is_applied(signing: Signing) -> None:
    """Signed with a key listed in allowed_signers: applied, and the stall is over."""
    lab, agent = signing.lab, signing.running()
    c4 = lab.repo.commit_ssh_signed("block a source, ssh-signed", signing.alice_ssh)
    agent.wait_ready(c4)
    signing.applied.append(c4)
    assert condition(agent.status(), "Stalled")["status"] is False
    assert agent.nf("blocklist")["programId"] == signing.program_id  # map change only
    assert lab.ping_from(signing.blocked) == 0


def ssh_signature_by_unlisted_key_is_refused(signing: Signing) -> None:
    lab = signing.lab
    set_blocked_v4(lab.repo, ["203.0.113.7"])
    c5 = lab.repo.commit_ssh_signed("unblock, ssh-signed by another key", signing.mallory_ssh)
    event = signing.refuse(c5)
    assert event["message"].startswith(f"commit {c5[:12]} refused: ")
    assert "signed" not in event["message"]  # it is signed, just not by a trusted key
    assert signing.running().status()["lastAppliedRevision"] == signing.applied[-1]
    assert lab.ping_from(signing.blocked) == 0


def withdrawn_trust_refuses_the_next_commit(signing: Signing) -> None:
    """The operator removes alice's OpenPGP key from the trusted folder: her next commit
    is refused."""
    lab = signing.lab
    (signing.trusted / "alice.asc").unlink()
    event = signing.refuse(
        lab.repo.commit_gpg_signed("unblock, signed by a key no longer trusted", signing.alice)
    )
    assert "not among the trusted keys" in event["message"]
    assert lab.ping_from(signing.blocked) == 0


def refused_commits_stay_refused_across_a_restart_without_git(signing: Signing) -> None:
    """Restart with Git unreachable: the mirror holds the refused commit, which must not be
    applied just because it was fetched; refused again once Git is back."""
    lab, good = signing.lab, signing.applied[-1]
    assert signing.running().stop() == 0
    lab.daemon.stop()
    before = len(signing.running().events())
    restarted = signing.start_agent()
    wait_until(
        lambda: (
            any(e["reason"] == "SourceUnavailable" for e in restarted.events()[before:])
            and restarted.status().get("observedAt", 0) > time.time() - 2
        ),
        30,
        what=f"source unavailable after restart\n{restarted.output()[-2000:]}",
    )
    status = restarted.wait_passes(1)
    assert status["lastAppliedRevision"] == good
    assert restarted.nf("blocklist")["revision"] == good
    applied = {e["revision"] for e in events_of(restarted, "Applied")}
    assert len(signing.refused) == 4 and not applied & set(signing.refused)
    assert lab.ping_from(signing.blocked) == 0
    lab.daemon.start()
    wait_until(
        lambda: condition(restarted.status(), "Stalled").get("reason") == "UntrustedRevision",
        30,
        what="refused again once Git is back",
    )
    assert restarted.status()["lastAppliedRevision"] == good
    assert lab.ping_from(signing.blocked) == 0


# -- 2. refs --------------------------------------------------------------------------------


def test_refs_tag_commit_and_force_reset(lab: Lab) -> None:
    """--ref follows an annotated tag (also when it is moved), pins a full commit SHA, and a
    branch force-reset to an older commit brings that older revision back."""
    repo = lab.repo
    blocked = lab.blocked_source()
    other = lab.veth.b_ip.rsplit(".", 1)[0] + ".67"
    lab.veth.add_b_address(other)
    repo.add_library_nf("blocklist")
    c1 = repo.commit("blocklist")
    repo.git("tag", "-a", "v1", "-m", "release 1")
    set_blocked_v4(repo, ["203.0.113.7", blocked])
    c2 = repo.commit("block one source")
    set_blocked_v4(repo, ["203.0.113.7", blocked, other])
    c3 = repo.commit("block another source")

    # a tag: main has moved on, the agent stays on the tagged commit
    agent = lab.agent("--ref", "v1")
    status = agent.wait_ready(c1)
    assert status["source"]["ref"] == "v1"
    events = events_of(agent, "Applied", "blocklist")
    assert events[0]["revision"] == c1
    prog = agent.nf("blocklist")["programId"]
    agent.wait_passes(2)  # two more fetches of the tag: nothing else is applied
    assert agent.status()["lastAppliedRevision"] == c1
    assert lab.ping_from(blocked) == 2 and lab.ping_from(other) == 2

    # the tag is moved (re-released): the agent follows it
    repo.git("tag", "-f", "-a", "v1", "-m", "release 1, again", c2)
    agent.wait_ready(c2)
    assert lab.ping_from(blocked) == 0 and lab.ping_from(other) == 2
    assert agent.stop() == 0

    # a full commit SHA (not a branch tip)
    agent = lab.agent("--ref", c1)
    wait_until(
        lambda: agent.status().get("source", {}).get("ref") == c1 and agent.ready_at(c1),
        60,
        what=f"ready at the pinned commit\n{agent.output()[-2000:]}",
    )
    assert agent.nf("blocklist")["programId"] == prog  # adopted, not recompiled
    assert lab.ping_from(blocked) == 2
    assert agent.stop() == 0

    # a branch, then force-reset to an older commit (a force-push in the real world)
    agent = lab.agent("--ref", "main")
    wait_until(
        lambda: agent.status().get("source", {}).get("ref") == "main" and agent.ready_at(c3),
        60,
        what=f"ready at main\n{agent.output()[-2000:]}",
    )
    assert lab.ping_from(blocked) == 0 and lab.ping_from(other) == 0
    repo.git("reset", "--hard", c2)
    agent.wait_ready(c2)
    assert agent.nf("blocklist")["revision"] == c2
    assert lab.ping_from(blocked) == 0 and lab.ping_from(other) == 2
    assert agent.nf("blocklist")["programId"] == prog


# -- 3. interfaces that appear later ------------------------------------------------------------


def test_interface_added_later_is_attached_at_once(lab: Lab) -> None:
    """A veth created after the NF was applied (name matching its glob) gets the NF without
    a commit and without waiting for a timer (netlink link events); traffic on it is
    counted; removing it updates the status."""
    veth, repo = lab.veth, lab.repo
    repo.add_library_nf("counter")
    c1 = repo.commit("counter")
    # timers far away: only the link watcher can react within the test's deadlines
    agent = lab.agent("--interval", "120", "--drift-interval", "120")
    agent.wait_ready(c1)
    assert [p["interface"] for p in agent.nf("counter")["attachPoints"]] == [veth.a_if]

    octet = veth.a_ip.split(".")[2]
    new_a, new_b = f"10.78.{octet}.1", f"10.78.{octet}.2"
    created = time.monotonic()
    run_in(veth.ns_a, "ip", "link", "add", "veth7", "type", "veth", "peer", "name", "xp7")
    run_in(veth.ns_a, "ip", "link", "set", "xp7", "netns", veth.ns_b)
    run_in(veth.ns_a, "ip", "addr", "add", f"{new_a}/24", "dev", "veth7")
    run_in(veth.ns_a, "ip", "link", "set", "veth7", "up")
    run_in(veth.ns_b, "ip", "addr", "add", f"{new_b}/24", "dev", "xp7")
    run_in(veth.ns_b, "ip", "link", "set", "xp7", "up")
    wait_until(lambda: tc_filter_present(veth, "veth7"), 5, every=0.05, what="attached to veth7")
    elapsed = time.monotonic() - created
    assert elapsed < 5, elapsed
    wait_until(
        lambda: (
            {p["interface"] for p in agent.nf("counter")["attachPoints"]} == {veth.a_if, "veth7"}
        ),
        5,
        what="veth7 in status",
    )
    assert agent.status()["lastAppliedRevision"] == c1  # no new commit involved
    assert agent.nf("counter")["state"] == "Applied"

    before = counter_icmp_packets(agent)
    assert veth.ping(veth.ns_b, new_a, 6, timeout_s=1.0) == 6
    assert counter_icmp_packets(agent) - before == 6

    # deleted: the NF no longer runs everywhere it should, and the status says so (#18)
    run_in(veth.ns_a, "ip", "link", "del", "veth7")
    wait_until(
        lambda: agent.nf("counter")["state"] == "Degraded", 5, what="veth7 missing in status"
    )
    points = {p["interface"]: p for p in agent.nf("counter")["attachPoints"]}
    assert set(points) == {veth.a_if, "veth7"} and points["veth7"]["missingSince"] > 0
    assert not points[veth.a_if]["error"]
    tracked = json.loads((lab.state_dir / "datapath" / "interfaces.json").read_text())
    assert "veth7" not in tracked
    assert tc_filter_present(veth)
    [lost] = events_of(agent, "InterfaceLost")
    assert "veth7" in lost["message"]
    assert not events_of(agent, "InternalError")


def test_interfaces_that_come_and_go_by_design_degrade_nothing(lab: Lab) -> None:
    """onInterfaceRemoved: forget (an NF on pods' veths): a matching interface is attached
    when it appears, and when it is deleted the NF stays Applied and the node Ready, with an
    InterfaceRemoved event instead of InterfaceLost."""
    veth, repo = lab.veth, lab.repo
    repo.add_library_nf("counter")
    manifest = repo.read("nfs/counter/nf.yaml")
    assert "    priority: 100\n" in manifest
    repo.write(
        "nfs/counter/nf.yaml",
        manifest.replace(
            "    priority: 100\n", "    priority: 100\n    onInterfaceRemoved: forget\n"
        ),
    )
    c1 = repo.commit("counter on interfaces that come and go")
    agent = lab.agent("--interval", "120", "--drift-interval", "120")
    agent.wait_ready(c1)
    run_in(veth.ns_a, "ip", "link", "add", "veth9", "type", "veth", "peer", "name", "xp9")
    run_in(veth.ns_a, "ip", "link", "set", "xp9", "netns", veth.ns_b)
    run_in(veth.ns_a, "ip", "link", "set", "veth9", "up")
    wait_until(
        lambda: (
            {p["interface"] for p in agent.nf("counter")["attachPoints"]} == {veth.a_if, "veth9"}
        ),
        5,
        what="veth9 attached",
    )
    assert tc_filter_present(veth, "veth9")

    run_in(veth.ns_a, "ip", "link", "del", "veth9")
    wait_until(lambda: events_of(agent, "InterfaceRemoved"), 5, what="InterfaceRemoved event")
    [removed] = events_of(agent, "InterfaceRemoved")
    assert "veth9" in removed["message"] and "onInterfaceRemoved: forget" in removed["message"]
    wait_until(
        lambda: [p["interface"] for p in agent.nf("counter")["attachPoints"]] == [veth.a_if],
        5,
        what="veth9 gone from the status",
    )
    status = agent.status()
    counter = next(nf for nf in status["functions"] if nf["name"] == "counter")
    assert counter["state"] == "Applied", counter
    assert [p["interface"] for p in counter["attachPoints"]] == [veth.a_if]
    assert not any(p.get("missingSince") for p in counter["attachPoints"])
    assert condition(status, "Attached")["status"] is True
    assert condition(status, "Ready")["status"] is True
    assert not events_of(agent, "InterfaceLost") and not events_of(agent, "InternalError")
    assert tc_filter_present(veth)


# -- 4. suspend and resume --------------------------------------------------------------------


def test_suspend_and_resume(lab: Lab) -> None:
    """`nfctl suspend` (node and --nf) freezes what runs while commits pile up; `resume`
    applies them. spec.suspend in a manifest freezes that NF the same way."""
    repo, state = lab.repo, str(lab.state_dir)
    blocked = lab.blocked_source()
    repo.add_library_nf("blocklist")
    repo.add_library_nf("counter")
    c1 = repo.commit("blocklist and counter")
    agent = lab.agent()
    agent.wait_ready(c1)

    # the whole node
    out = nfctl("suspend", "--state-dir", state)
    assert out.returncode == 0, out.stderr
    assert "node suspended" in out.stdout
    wait_until(lambda: agent.status().get("suspended") is True, 10, what="node suspended")
    assert condition(agent.status(), "Reconciling")["reason"] == "Suspended"
    set_blocked_v4(repo, ["203.0.113.7", blocked])
    c2 = repo.commit("block a source")
    status = agent.wait_published(3)  # suspended: the loop runs but fetches nothing
    assert status["suspended"] is True
    assert status["lastAppliedRevision"] == c1 and status["lastAttemptedRevision"] == c1
    assert lab.ping_from(blocked) == 2
    text = nfctl("status", "--state-dir", state)
    assert "SUSPENDED" in text.stdout
    out = nfctl("resume", "--state-dir", state)
    assert out.returncode == 0 and "node resumed" in out.stdout
    agent.wait_ready(c2, timeout=15)
    assert agent.status()["suspended"] is False
    assert lab.ping_from(blocked) == 0

    # one NF
    assert nfctl("suspend", "--nf", "blocklist", "--state-dir", state).returncode == 0
    wait_until(lambda: agent.nf("blocklist").get("state") == "Suspended", 10, what="suspended")
    assert agent.nf("blocklist")["suspended"] is True
    assert agent.nf("counter")["state"] == "Applied"
    set_blocked_v4(repo, ["203.0.113.7"])
    c3 = repo.commit("unblock")
    wait_until(lambda: agent.status().get("lastAttemptedRevision") == c3, 10, what="c3 attempted")
    agent.wait_passes(1)
    assert agent.nf("blocklist")["state"] == "Suspended"
    assert agent.nf("blocklist")["revision"] == c2
    assert lab.ping_from(blocked) == 0  # still blocked: frozen as it was
    table = nfctl("status", "--state-dir", state).stdout
    assert "Suspended" in table
    assert nfctl("resume", "--nf", "blocklist", "--state-dir", state).returncode == 0
    wait_until(
        lambda: (
            agent.nf("blocklist").get("revision") == c3
            and agent.nf("blocklist").get("state") == "Applied"
        ),
        15,
        what="blocklist resumed at c3",
    )
    assert lab.ping_from(blocked) == 2

    # spec.suspend in Git
    set_blocked_v4(repo, ["203.0.113.7", blocked])
    with_spec_suspend(repo, "blocklist", True)
    c4 = repo.commit("freeze the blocklist (and block a source, not applied)")
    wait_until(
        lambda: (
            agent.status().get("lastAttemptedRevision") == c4
            and agent.nf("blocklist").get("state") == "Suspended"
        ),
        15,
        what=f"blocklist suspended by spec\n{agent.output()[-2000:]}",
    )
    assert agent.nf("blocklist")["revision"] == c3
    assert agent.nf("counter")["state"] == "Applied"
    assert condition(agent.status(), "Ready")["status"] is True
    assert lab.ping_from(blocked) == 2
    with_spec_suspend(repo, "blocklist", False)
    c5 = repo.commit("unfreeze the blocklist")
    agent.wait_ready(c5)
    wait_until(lambda: agent.nf("blocklist").get("state") == "Applied", 10, what="unfrozen")
    assert agent.nf("blocklist")["revision"] == c5
    assert lab.ping_from(blocked) == 0


# -- 5. metrics and health ------------------------------------------------------------------------


def test_metrics_and_health(lab: Lab) -> None:
    """/healthz and /readyz on the local health port (readiness: the datapath is adopted;
    an NF failure shows in conditions and metrics, not in readiness), agent metrics, and
    the NF counters the manifests export, equal to the packets sent."""
    repo = lab.repo
    blocked = lab.blocked_source()
    repo.add_library_nf("blocklist")
    repo.add_library_nf("counter")
    set_blocked_v4(repo, ["203.0.113.7", blocked])
    c1 = repo.commit("blocklist and counter")
    agent = lab.agent()
    agent.wait_ready(c1)

    code, body = agent.http_get("/healthz", port=9103)
    assert code == 200 and "reconcile loop advanced" in body
    code, body = agent.http_get("/readyz", port=9103)
    assert code == 200 and "datapath adopted" in body and "ReconciliationSucceeded" in body
    assert agent.http_get("/healthz")[0] == 404  # the metrics port serves metrics only

    assert lab.ping_from(None, 7) == 7  # counted at tc ingress
    assert lab.ping_from(blocked, 4) == 0  # dropped at XDP before tc sees them
    code, text = agent.http_get("/metrics")
    assert code == 200
    packets = metric_samples(text, "nfctl_nf_counter_packets_total")
    icmp = [v for labels, v in packets if labels["key"] == ICMP_V4_KEY]
    assert icmp == [7.0], packets
    assert all(
        labels["nf"] == "counter" and labels["map"] == "proto_stats" for labels, _ in packets
    )
    assert metric_samples(text, "nfctl_nf_counter_bytes_total")
    drops = metric_samples(text, "nfctl_nf_blocklist_dropped_packets_total")
    assert ({"nf": "blocklist", "map": "drops", "key": "0"}, 4.0) in drops

    functions = dict(
        (labels["state"], v) for labels, v in metric_samples(text, "nfctl_agent_functions")
    )
    assert functions["Applied"] == 2 and functions["Failed"] == 0
    info = {labels["nf"]: labels for labels, _ in metric_samples(text, "nfctl_agent_function_info")}
    assert info["counter"]["revision"] == c1[:12] and info["counter"]["version"] == "1.0.0"
    assert info["counter"]["hook"] == "tc-ingress" and info["counter"]["state"] == "Applied"
    assert info["blocklist"]["hook"] == "xdp" and info["blocklist"]["revision"] == c1[:12]
    reconciles = metric_samples(text, "nfctl_agent_reconcile_duration_seconds_count")
    assert any(labels == {"result": "ready"} and v >= 1 for labels, v in reconciles)
    assert metric_samples(text, "nfctl_agent_git_fetch_duration_seconds_count")[0][1] >= 1
    assert metric_samples(text, "nfctl_agent_compile_duration_seconds_count")[0][1] >= 2
    assert metric_samples(text, "nfctl_agent_ready") == [({}, 1.0)]

    # one NF fails: not ready (503), still healthy
    path = "nfs/counter/nf.yaml"
    good = repo.read(path)
    repo.write(path, good.replace("  attach:\n", "  attach: [\n", 1))
    c2 = repo.commit("broken counter manifest")
    wait_until(
        lambda: (
            agent.status().get("lastAttemptedRevision") == c2
            and agent.nf("counter").get("state") == "Failed"
        ),
        30,
        what="counter failed",
    )
    code, body = agent.http_get("/readyz", port=9103)
    assert code == 200 and "Ready=False" in body and "counter" in body, body
    assert agent.http_get("/healthz", port=9103)[0] == 200
    text = agent.http_get("/metrics")[1]
    functions = dict(
        (labels["state"], v) for labels, v in metric_samples(text, "nfctl_agent_functions")
    )
    assert functions["Failed"] == 1 and functions["Applied"] == 1
    assert metric_samples(text, "nfctl_agent_ready") == [({}, 0.0)]
    assert counter_icmp_packets(agent) == 7  # the running version keeps counting

    repo.write(path, good)
    c3 = repo.commit("fix the counter manifest")
    agent.wait_ready(c3)
    assert "Ready=True" in agent.http_get("/readyz", port=9103)[1]


# -- 6. --once and --config ------------------------------------------------------------------------


def test_once_and_config_file(lab: Lab) -> None:
    """`nfctl agent --once` reconciles once and says by its exit code whether the node is
    Ready; a YAML config file with the same settings is equivalent to the flags."""
    veth, repo = lab.veth, lab.repo
    repo.add_library_nf("counter")
    c1 = repo.commit("counter")
    once = lab.agent("--once")
    assert once.wait(90) == 0, once.output()[-3000:]
    assert once.ready_at(c1)
    assert "counter" in once.output() and "Applied" in once.output()
    assert tc_filter_present(veth)  # --once leaves the datapath running
    prog = once.nf("counter")["programId"]

    source = repo.read("nfs/counter/counter.c")
    repo.write(
        "nfs/counter/counter.c", source.replace("return TC_ACT_OK;\n}", "return TC_ACT_OK\n}")
    )
    c2 = repo.commit("syntax error")
    once = lab.agent("--once")
    assert once.wait(90) == 1, once.output()[-3000:]
    status = once.status()
    assert status["lastAttemptedRevision"] == c2 and status["lastAppliedRevision"] == c1
    assert once.nf("counter")["state"] == "Failed" and once.nf("counter")["programId"] == prog
    assert "Failed" in once.output()
    assert tc_filter_present(veth)

    repo.git("revert", "--no-edit", "HEAD")
    c3 = repo.head()
    config = lab.tmp / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "repo": lab.url,
                "ref": "main",
                "path": "nfs",
                "node": "node-from-config",
                "labels": {"zone": "lab"},
                "stateDir": str(lab.state_dir),
                "bpffsDir": str(lab.bpffs_root),
                "interval": 0.5,
                "timeout": 10,
                "drift": "warn",
                "metricsAddr": "",
            }
        )
    )
    result = nfctl("agent", "--config", str(config), "--once", netns=veth.ns_a, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads((lab.state_dir / "status.json").read_text())
    assert status["node"] == "node-from-config" and status["labels"] == {"zone": "lab"}
    assert status["driftMode"] == "warn" and status["source"]["path"] == "nfs"
    assert status["lastAppliedRevision"] == c3
    assert {nf["name"]: nf["programId"] for nf in status["functions"]} == {"counter": prog}

    # a flag overrides the file; an unknown key is refused
    result = nfctl(
        "agent", "--config", str(config), "--node", "node-flag", "--once", netns=veth.ns_a
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((lab.state_dir / "status.json").read_text())["node"] == "node-flag"
    bad = lab.tmp / "bad.yaml"
    bad.write_text(config.read_text() + "colour: blue\n")
    result = nfctl("agent", "--config", str(bad), "--once", netns=veth.ns_a)
    assert result.returncode == 2 and "invalid agent configuration" in result.stderr


# -- 7. nodeSelector, and `nfctl status` --------------------------------------------------------


def test_node_selector_and_status_command(lab: Lab) -> None:
    """NFs whose nodeSelector does not match the node's labels are NotSelected and not
    attached; a restart with other labels prunes what no longer matches. `nfctl status`
    shows it all (table and JSON)."""
    veth, repo = lab.veth, lab.repo
    repo.add_library_nf("blocklist")
    repo.add_library_nf("counter")
    with_node_selector(repo, "counter", {"zone": "a"})
    with_node_selector(repo, "blocklist", {"zone": "b"})
    c1 = repo.commit("counter for zone a, blocklist for zone b")
    agent = lab.agent("--labels", "zone=a,role=edge")
    agent.wait_ready(c1)
    assert agent.nf("counter")["state"] == "Applied"
    assert agent.nf("blocklist")["state"] == "NotSelected"
    assert agent.nf("blocklist").get("programId") is None
    assert xdp_prog_id(veth) == 0 and tc_filter_present(veth)
    assert not (lab.bpffs_root / "nfs" / "blocklist").exists()
    assert not events_of(agent, "Applied", "blocklist")

    # nfctl status -o json
    result = nfctl("status", "--state-dir", str(lab.state_dir), "-o", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["node"] == "node-a" and data["labels"] == {"zone": "a", "role": "edge"}
    assert data["lastAppliedRevision"] == c1 and data["lastAttemptedRevision"] == c1
    assert data["source"] == {
        "url": lab.url,
        "ref": "main",
        "path": "nfs",
        "lastFetchedRevision": c1,
        "lastFetchError": None,
    }
    assert condition(data, "Ready")["status"] is True
    assert condition(data, "Ready")["reason"] == "ReconciliationSucceeded"
    assert condition(data, "Stalled")["status"] is False
    nfs = {nf["name"]: nf for nf in data["functions"]}
    assert nfs["blocklist"]["state"] == "NotSelected"
    counter = nfs["counter"]
    assert counter["state"] == "Applied" and counter["revision"] == c1
    assert counter["version"] == "1.0.0" and counter["hook"] == "tc-ingress"
    assert counter["programId"] > 0 and len(counter["programTag"]) == 16
    assert len(counter["buildHash"]) >= 32
    [point] = counter["attachPoints"]
    assert (point["interface"], point["hook"], point["error"]) == (veth.a_if, "tc-ingress", None)
    # a TCX link where the kernel has TCX (the dispatcher and link ids as bpftool shows)
    assert point["mode"] in ("tcx", "tc") and point["dispatcherId"] > 0
    assert point["shadowedBy"] == [] and bool(point["linkId"]) == (point["mode"] == "tcx")
    assert point["missingSince"] is None
    assert [m["name"] for m in counter["maps"]] == ["proto_stats"]
    assert counter["lastError"] is None

    # nfctl status (table)
    result = nfctl("status", "--state-dir", str(lab.state_dir))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for column in ("NF", "STATE", "VERSION", "REVISION", "PROG ID", "ATTACHED", "MAPS"):
        assert column in text
    row = next(line for line in text.splitlines() if line.strip().startswith("counter"))
    assert "Applied" in row and c1[:12] in row and str(counter["programId"]) in row
    assert f"{veth.a_if}/tc-ingress" in row and "proto_stats:" in row
    row = next(line for line in text.splitlines() if line.strip().startswith("blocklist"))
    assert "NotSelected" in row
    assert "Ready=True" in text and "node-a" in text
    assert re.search(r"lastReconcile .*fetch \d+\.\d+s .*total \d+\.\d+s", text, re.S), text

    # other labels (from a file): the counter is pruned, the blocklist now applies
    assert agent.stop() == 0
    labels = lab.tmp / "labels.yaml"
    labels.write_text("zone: b\n")
    agent = lab.agent("--labels-file", str(labels))
    wait_until(
        lambda: (
            agent.nf("blocklist").get("state") == "Applied"
            and agent.nf("counter").get("state") == "NotSelected"
            and agent.ready_at(c1)
        ),
        60,
        what=f"relabelled\n{agent.output()[-2000:]}",
    )
    assert events_of(agent, "Pruned", "counter")
    assert agent.nf("counter").get("programId") is None
    wait_until(lambda: not tc_filter_present(veth), 10, what="counter detached")
    assert not (lab.bpffs_root / "nfs" / "counter").exists()
    assert xdp_prog_id(veth) != 0
    assert agent.status()["labels"] == {"zone": "b"}


# -- 8. drift: warn vs correct -----------------------------------------------------------------


def test_drift_warn_reports_without_correcting(lab: Lab) -> None:
    """--drift warn: a deleted tc filter is reported once (DriftDetected) and left alone;
    the default mode (correct) puts it back."""
    veth, repo = lab.veth, lab.repo
    repo.add_library_nf("counter")
    c1 = repo.commit("counter")
    agent = lab.agent("--drift", "warn")
    agent.wait_ready(c1)
    assert agent.status()["driftMode"] == "warn"
    delete_tc_filter(veth)
    detected = wait_until(
        lambda: events_of(agent, "DriftDetected"), 15, what=f"drift\n{agent.output()[-2000:]}"
    )
    assert detected[0]["type"] == "Warning" and f"{veth.a_if}/tc-ingress" in detected[0]["message"]
    agent.wait_passes(2)  # each pass converges too: warn mode leaves the drift alone
    assert not tc_filter_present(veth)
    assert len(events_of(agent, "DriftDetected")) == 1
    assert not events_of(agent, "DriftCorrected")
    drift = metric_samples(agent.http_get("/metrics")[1], "nfctl_agent_drift_total")
    assert ({"kind": "chain", "action": "detected"}, 1.0) in drift
    assert agent.stop() == 0
    assert not tc_filter_present(veth)

    agent = lab.agent()  # default: correct
    wait_until(lambda: tc_filter_present(veth), 30, what="restored by the agent in correct mode")
    wait_until(lambda: agent.status().get("driftMode") == "correct", 10, what="mode in status")
    agent.wait_ready(c1)
    delete_tc_filter(veth)
    wait_until(lambda: events_of(agent, "DriftCorrected"), 15, what="drift corrected")
    wait_until(lambda: tc_filter_present(veth), 5, what="tc filter back")


# -- 10. credentials --------------------------------------------------------------------------


def test_credentials_never_leak(lab: Lab) -> None:
    """A bearer token from --https-token-file and a password in the URL authenticate to a
    real smart-HTTP Git server, and appear in no log line, status or event, also when the
    server is down or refuses them, and for a git:// URL carrying user:password."""
    veth, repo = lab.veth, lab.repo
    token = "tok-3f9c2e7a41-SECRET"
    password = "pw-8d1b4c77e0-SECRET"
    wrong = "wrong-5a6b7c-SECRET"
    secrets = [token, password, wrong]
    token_file = lab.tmp / "token"
    token_file.write_text(token + "\n")
    http = GitHttpServer(
        lab.repo.path.parent, veth.ns_b, veth.b_ip, basic=("nfuser", password), token=token
    )
    http.start()
    try:
        repo.add_library_nf("counter")
        c1 = repo.commit("counter")

        # git:// with a token file (unused by that transport)
        agent = lab.agent("--https-token-file", str(token_file))
        agent.wait_ready(c1)
        assert agent.stop() == 0

        # http:// with user:password in the URL; the server checks it
        c2 = repo.commit("over http")
        agent = lab.agent(url=http.url("nfs-repo", f"nfuser:{password}"))
        agent.wait_ready(c2)
        shown = agent.status()["source"]["url"]
        assert shown.startswith("http://") and "***@" in shown and password not in shown
        http.stop()  # unreachable: the error names the URL
        wait_until(lambda: events_of(agent, "SourceUnavailable"), 30, what="http server down")
        http.start()
        wait_until(lambda: events_of(agent, "SourceAvailable"), 30, what="http server back")
        json_status = nfctl("status", "--state-dir", str(lab.state_dir), "-o", "json").stdout
        text_status = nfctl("status", "--state-dir", str(lab.state_dir)).stdout
        assert agent.stop() == 0

        # a wrong password: refused by the server, reported, not echoed
        before = len(agent.events())
        agent = lab.agent(url=http.url("nfs-repo", f"nfuser:{wrong}"))
        wait_until(
            lambda: any(e["reason"] == "SourceUnavailable" for e in agent.events()[before:]),
            30,
            what="authentication failure reported",
        )
        refused = [e for e in agent.events()[before:] if e["reason"] == "SourceUnavailable"]
        assert "Authentication failed" in refused[0]["message"], refused
        assert agent.stop() == 0

        # http:// with the bearer token from the file
        c3 = repo.commit("over http with a token")
        agent = lab.agent("--https-token-file", str(token_file), url=http.url("nfs-repo"))
        agent.wait_ready(c3)
        assert agent.stop() == 0

        # git:// with user:password in the URL: git cannot use it and says so
        before = len(agent.events())
        url = f"git://nfuser:{password}@{veth.b_ip}:{lab.daemon.port}/nfs-repo"
        agent = lab.agent(url=url)
        wait_until(
            lambda: any(e["reason"] == "SourceUnavailable" for e in agent.events()[before:]),
            30,
            what="git:// with userinfo reported",
        )
        agent.wait_passes(1)
        status_text = (lab.state_dir / "status.json").read_text()
        assert agent.stop() == 0
    finally:
        http.stop()

    outputs = [a.output() for a in lab.agents]
    assert all(outputs)
    places = {
        "status.json": (lab.state_dir / "status.json").read_text() + status_text,
        "events.jsonl": (lab.state_dir / "events.jsonl").read_text(),
        "nfctl status": json_status + text_status,
        **{f"agent log {i}": out for i, out in enumerate(outputs)},
    }
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"{secret} leaked into {where}"
