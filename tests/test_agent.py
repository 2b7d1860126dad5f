"""The node agent end to end: real Git (git daemon over the veth), real agent processes,
real traffic through the NFs it attaches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest

from nfctl.datapath import links
from nfctl.datapath.datapath import Datapath
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair, run
from nfctl.nftest.build import STALE_SCRATCH_SECONDS, reap_stale_scratch
from tests.agent_harness import (
    AgentProcess,
    GitDaemon,
    GitRepo,
    PingStream,
    events_of,
    metric_samples,
    set_blocked_v4,
    tc_filter_present,
    wait_until,
    xdp_prog_id,
)
from tests.foreign import delete_tc_filter, detach_links, force_foreign_xdp

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]


@pytest.fixture
def gitdir(tmp_path: Path) -> Path:
    base = tmp_path / "git"
    base.mkdir()
    return base


@pytest.fixture
def daemon(gitdir: Path, veth: VethPair) -> Iterator[GitDaemon]:
    server = GitDaemon(gitdir, veth.ns_b, veth.b_ip)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Lifecycle:
    """One agent following one repository through the lifecycle phases, and what the
    phases record for the ones after them (program ids, revisions)."""

    veth: VethPair
    daemon: GitDaemon
    repo: GitRepo
    agent: AgentProcess
    bpffs_root: Path
    state_dir: Path
    blocked: str
    source: str = ""  # the library blocklist.c
    p1: int = 0  # blocklist 1.0.0
    p2: int = 0  # blocklist 1.1.0, the last good version through the failure phases
    good: str = ""  # the revision the failure phases leave applied

    @cached_property
    def kernel(self) -> Datapath:
        """The chains as the kernel runs them (opened once the agent has built them)."""
        return Datapath(self.bpffs_root, self.state_dir, netns=self.veth.ns_a)

    def ping_blocked(self, count: int = 2) -> int:
        return self.veth.ping(
            self.veth.ns_b, self.veth.a_ip, count, source=self.blocked, timeout_s=0.3
        )

    def wait_failed(self, revision: str, what: str) -> None:
        wait_until(
            lambda: (
                self.agent.status().get("lastAttemptedRevision") == revision
                and self.agent.nf("blocklist")["state"] == "Failed"
            ),
            60,
            what=what,
        )


def test_gitops_lifecycle(
    veth: VethPair, daemon: GitDaemon, gitdir: Path, tmp_path: Path, bpffs_root: Path
) -> None:
    """One agent through a revision's whole life: each phase is a function below, run in
    this order because each starts from the state the one before left."""
    repo = GitRepo(gitdir / "nfs-repo")
    repo.add_library_nf("blocklist")
    repo.add_library_nf("counter")
    blocked = veth.b_ip.rsplit(".", 1)[0] + ".66"
    veth.add_b_address(blocked)
    agent = AgentProcess(veth, daemon.url("nfs-repo"), tmp_path / "state", bpffs_root)
    life = Lifecycle(veth, daemon, repo, agent, bpffs_root, tmp_path / "state", blocked)
    try:
        deploy(life)
        map_only_change_is_enforced_live(life)
        new_program_version_replaces_live_and_keeps_entries(life)
        compile_error_keeps_last_good_version(life)
        revert_adopts_the_good_build(life)
        verifier_rejection_keeps_running_version(life)
        broken_yaml_keeps_running_version(life)
        drift_is_corrected(life)
        git_unreachable_keeps_last_revision(life)
        restart_recompiles_nothing(life)
        sigkill_mid_apply_never_leaves_traffic_unfiltered(life)
        removed_nf_is_pruned(life)
    finally:
        agent.stop(signal.SIGTERM)
        Datapath(bpffs_root, tmp_path / "state", netns=veth.ns_a).teardown()


def deploy(life: Lifecycle) -> None:
    agent, veth = life.agent, life.veth
    c1 = life.repo.commit("add blocklist and counter")
    agent.start()
    status = agent.wait_ready(c1)
    assert {nf["name"]: nf["state"] for nf in status["functions"]} == {
        "blocklist": "Applied",
        "counter": "Applied",
    }
    life.p1 = agent.nf("blocklist")["programId"]
    assert agent.nf("blocklist")["revision"] == c1
    assert veth.ping(veth.ns_b, veth.a_ip, 3, source=life.blocked) == 3
    applied = events_of(agent, "Applied", "blocklist")
    assert applied and applied[0]["revision"] == c1
    assert applied[0]["author"] == "Alice Operator <alice@example.org>"


def map_only_change_is_enforced_live(life: Lifecycle) -> None:
    """Same program, new entries."""
    agent, veth = life.agent, life.veth
    set_blocked_v4(life.repo, ["203.0.113.7", life.blocked])
    c2 = life.repo.commit("block a noisy source")
    agent.wait_ready(c2)
    assert life.ping_blocked(3) == 0
    assert veth.ping_a_from_b(2) == 2
    assert agent.nf("blocklist")["programId"] == life.p1
    assert xdp_prog_id(veth) != 0


def new_program_version_replaces_live_and_keeps_entries(life: Lifecycle) -> None:
    """Replaced live; blocklist entries and counters kept."""
    agent, repo = life.agent, life.repo
    life.source = repo.read("nfs/blocklist/blocklist.c")
    repo.write(
        "nfs/blocklist/blocklist.c",
        life.source.replace("#ifndef MAX_RULES", "#define REV 3\n#ifndef MAX_RULES"),
    )
    repo.write(
        "nfs/blocklist/nf.yaml",
        repo.read("nfs/blocklist/nf.yaml").replace("version: 1.0.0", "version: 1.1.0"),
    )
    c3 = repo.commit("blocklist 1.1.0")
    agent.wait_ready(c3)
    life.p2 = agent.nf("blocklist")["programId"]
    life.good = c3
    assert life.p2 != life.p1 and agent.nf("blocklist")["version"] == "1.1.0"
    assert life.ping_blocked() == 0
    drops = next(m for m in agent.nf("blocklist")["maps"] if m["name"] == "blocked_v4")
    assert drops["entries"] == 2


def compile_error_keeps_last_good_version(life: Lifecycle) -> None:
    """Refused, the last good version keeps running, the error located."""
    agent, repo = life.agent, life.repo
    repo.write(
        "nfs/blocklist/blocklist.c",
        life.source.replace("return XDP_PASS;\n}", "return XDP_PASS\n}"),
    )
    c4 = repo.commit("oops: syntax error")
    life.wait_failed(c4, "failed")
    nf = agent.nf("blocklist")
    assert nf["programId"] == life.p2 and nf["version"] == "1.1.0" and nf["revision"] == life.good
    assert nf["lastError"]["file"] == "nfs/blocklist/blocklist.c" and nf["lastError"]["line"]
    assert "expected ';'" in nf["lastError"]["message"]
    status = agent.status()
    assert status["lastAppliedRevision"] == life.good
    assert not next(c for c in status["conditions"] if c["type"] == "Ready")["status"]
    failed = events_of(agent, "Failed", "blocklist")
    assert failed and failed[-1]["revision"] == c4
    assert life.ping_blocked() == 0


def revert_adopts_the_good_build(life: Lifecycle) -> None:
    """`git revert` brings the good version back: same build, adopted, not recompiled."""
    agent = life.agent
    life.repo.git("revert", "--no-edit", "HEAD")
    agent.wait_ready(life.repo.head())
    assert agent.nf("blocklist")["programId"] == life.p2
    assert agent.nf("blocklist").get("lastError") is None


def verifier_rejection_keeps_running_version(life: Lifecycle) -> None:
    agent, repo = life.agent, life.repo
    bad = life.source.replace(
        "if ((void *)(eth + 1) > data_end)\n        return XDP_PASS;\n\n    if (eth->h_proto",
        "if (eth->h_proto",
        1,
    )
    assert bad != life.source
    repo.write(
        "nfs/blocklist/blocklist.c",
        bad.replace("#ifndef MAX_RULES", "#define REV 3\n#ifndef MAX_RULES"),
    )
    c6 = repo.commit("unchecked packet access")
    life.wait_failed(c6, "verifier failure")
    assert "verifier" in agent.nf("blocklist")["lastError"]["message"]
    assert agent.nf("blocklist")["programId"] == life.p2
    repo.git("revert", "--no-edit", "HEAD")
    agent.wait_ready(repo.head())


def broken_yaml_keeps_running_version(life: Lifecycle) -> None:
    """A typo never detaches: not pruned, the running version stays."""
    agent, repo = life.agent, life.repo
    repo.write(
        "nfs/blocklist/nf.yaml",
        repo.read("nfs/blocklist/nf.yaml").replace("  attach:\n", "  attach: [\n", 1),
    )
    c7 = repo.commit("broken yaml")
    life.wait_failed(c7, "yaml failure")
    error = agent.nf("blocklist")["lastError"]
    assert error["file"] == "nfs/blocklist/nf.yaml" and error["line"] and "YAML" in error["message"]
    assert agent.nf("blocklist")["programId"] == life.p2
    assert life.ping_blocked() == 0
    repo.git("revert", "--no-edit", "HEAD")
    life.good = repo.head()
    agent.wait_ready(life.good)


def drift_is_corrected(life: Lifecycle) -> None:
    """Someone deletes our tc filter (or detaches our TCX link), another tool replaces our
    XDP program (or, against our XDP link, is refused): the agent puts ours back."""
    veth = life.veth
    if links.kernel_has_tcx():
        assert detach_links(life.bpffs_root, "tc-ingress") == 1
    else:
        delete_tc_filter(veth.ns_a, veth.a_if)
    drifts = 2
    if links.kernel_has_xdp_links():
        with pytest.raises(Exception, match="busy"):
            force_foreign_xdp(veth.ns_a, veth.a_if)
        drifts = 1
    else:
        force_foreign_xdp(veth.ns_a, veth.a_if)
    wait_until(lambda: tc_filter_present(veth), 15, what="tc filter restored")
    wait_until(
        lambda: len(events_of(life.agent, "DriftCorrected")) >= drifts, 15, what="drift events"
    )
    wait_until(lambda: life.ping_blocked(1) == 0, 15, what="XDP restored")


def git_unreachable_keeps_last_revision(life: Lifecycle) -> None:
    """Keeps running the last revision, reports it, recovers."""
    agent = life.agent
    life.daemon.stop()
    wait_until(lambda: events_of(agent, "SourceUnavailable"), 30, what="source unavailable")
    ready = next(c for c in agent.status()["conditions"] if c["type"] == "Ready")
    assert not ready["status"] and ready["reason"] == "SourceUnavailable"
    assert life.ping_blocked() == 0
    life.daemon.start()
    agent.wait_ready(life.good, timeout=60)


def restart_recompiles_nothing(life: Lifecycle) -> None:
    """SIGTERM leaves everything attached; the new agent recompiles nothing."""
    agent, veth = life.agent, life.veth
    ids_before = {nf["name"]: nf["programId"] for nf in agent.status()["functions"]}
    chains_before = chain_ids(life.kernel, veth)
    assert agent.stop(signal.SIGTERM) == 0
    assert life.ping_blocked() == 0
    assert tc_filter_present(veth) and xdp_prog_id(veth) != 0
    restart = time.monotonic()
    started_at = time.time()
    agent.start()
    # a status the new process wrote (the stopped one's can be less than a second old)
    wait_until(
        lambda: agent.status().get("observedAt", 0) > started_at and agent.ready_at(life.good),
        30,
        what="ready after restart",
    )
    assert time.monotonic() - restart < 10
    assert {nf["name"]: nf["programId"] for nf in agent.status()["functions"]} == ids_before
    # a recompile, even of the same build, would put a new program id into the chain
    assert chain_ids(life.kernel, veth) == chains_before


def sigkill_mid_apply_never_leaves_traffic_unfiltered(life: Lifecycle) -> None:
    """SIGKILL in the middle of applying a new version: packets keep going through the old
    version of each NF until the new one takes over, never through none."""
    agent, repo, veth = life.agent, life.repo, life.veth
    counter_old = agent.nf("counter")["programId"]
    counted_before = counted_packets(agent)
    with ChainWatch(life.kernel, veth) as watch:
        allowed = PingStream(veth.ns_b, veth.a_ip)
        dropped = PingStream(veth.ns_b, veth.a_ip, source=life.blocked)
        repo.write(
            "nfs/counter/counter.c",
            repo.read("nfs/counter/counter.c").replace(
                "struct proto_key {", "#define REV 11\nstruct proto_key {"
            ),
        )
        repo.write(
            "nfs/blocklist/blocklist.c",
            repo.read("nfs/blocklist/blocklist.c").replace("#define REV 3", "#define REV 11"),
        )
        workers = agent.compile_workers()  # the warm standby
        c11 = repo.commit("new versions of both")
        # a compile has begun once a worker other than the idle standby runs
        wait_until(lambda: agent.compile_workers() - workers, 30, every=0.02, what="compile")
        agent.stop(signal.SIGKILL)
        agent.start()
        agent.wait_ready(c11, timeout=90)
        # the killed agent's test-gate scratch pins: its next start reaps them only once
        # they are 10 min old; a test leaves nothing pinned
        reap_stale_scratch(now=time.time() + STALE_SCRATCH_SECONDS + 1)
        sent, received = allowed.stop()
        sent_blocked, received_blocked = dropped.stop()
    p3 = agent.nf("blocklist")["programId"]
    counter_new = agent.nf("counter")["programId"]
    assert p3 not in (life.p1, life.p2) and counter_new != counter_old
    assert sent >= 50 and received == sent, f"{sent - received} of {sent} packets lost"
    assert sent_blocked >= 50 and received_blocked == 0, "the blocklist let packets by"
    # every packet that got through was counted, by the old counter or by the new one
    assert counted_packets(agent) - counted_before >= received
    assert watch.versions(Hook.XDP) == [[life.p2], [p3]]
    assert watch.versions(Hook.TC_INGRESS) == [[counter_old], [counter_new]]
    assert chain_ids(life.kernel, veth) == {Hook.XDP: [p3], Hook.TC_INGRESS: [counter_new]}


def removed_nf_is_pruned(life: Lifecycle) -> None:
    """An NF removed from Git is detached and its pins removed."""
    agent, veth = life.agent, life.veth
    life.repo.remove("nfs/counter")
    c12 = life.repo.commit("retire the counter")
    agent.wait_ready(c12)
    assert [nf["name"] for nf in agent.status()["functions"]] == ["blocklist"]
    wait_until(lambda: not tc_filter_present(veth), 10, what="counter detached")
    assert not (life.bpffs_root / "nfs" / "counter").exists()
    assert events_of(agent, "Pruned", "counter")
    assert "clsact" not in run("tc", "qdisc", "show", "dev", veth.a_if, netns=veth.ns_a)


def chain_ids(kernel: Datapath, veth: VethPair) -> dict[Hook, list[int] | None]:
    """The program ids in the chains on a's veth, in order, as the kernel runs them."""
    return {hook: kernel.chain_prog_ids(veth.a_if, hook) for hook in (Hook.XDP, Hook.TC_INGRESS)}


def counted_packets(agent: AgentProcess) -> float:
    """Packets the counter NF counted, as its exported metric says."""
    code, text = agent.http_get("/metrics")
    assert code == 200, text
    return sum(v for _, v in metric_samples(text, "nfctl_nf_counter_packets_total"))


class ChainWatch:
    """Samples the chains on a's veth every few ms: which programs packets would run."""

    def __init__(self, kernel: Datapath, veth: VethPair) -> None:
        self.kernel = kernel
        self.veth = veth
        self.seen: list[dict[Hook, list[int] | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen.append(chain_ids(self.kernel, self.veth))
            time.sleep(0.005)

    def versions(self, hook: Hook) -> list[list[int] | None]:
        """The distinct chains seen on hook, in the order they appeared."""
        out: list[list[int] | None] = []
        for sample in self.seen:
            if not out or out[-1] != sample[hook]:
                out.append(sample[hook])
        return out

    def __enter__(self) -> ChainWatch:
        chain_ids(self.kernel, self.veth)  # the chain maps are opened before the thread reads
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        assert len(self.seen) > 50


os.environ.setdefault("PYTHONUNBUFFERED", "1")


def test_failed_fetch_is_retried_soon_not_after_an_interval(
    veth: VethPair, daemon: GitDaemon, gitdir: Path, tmp_path: Path, bpffs_root: Path
) -> None:
    """A Git server that drops connections (busy, restarting) must not leave the node a
    whole interval behind: the agent retries a failed fetch within seconds."""
    repo = GitRepo(gitdir / "nfs-repo")
    repo.add_library_nf("counter")
    c1 = repo.commit("counter")
    agent = AgentProcess(
        veth, daemon.url("nfs-repo"), tmp_path / "state", bpffs_root, "--interval", "300"
    ).start()
    try:
        agent.wait_ready(c1, timeout=90)
        daemon.stop()
        repo.write(
            "nfs/counter/nf.yaml", repo.read("nfs/counter/nf.yaml").replace("1.0.0", "1.0.1")
        )
        c2 = repo.commit("counter 1.0.1")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "nfctl",
                "reconcile",
                "--local",
                "--state-dir",
                str(agent.state_dir),
            ],
            check=True,
            capture_output=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        wait_until(lambda: events_of(agent, "SourceUnavailable"), 30, what="fetch failure")
        daemon.start()
        start = time.monotonic()
        agent.wait_ready(c2, timeout=30)  # with a 300 s interval, only a quick retry gets here
        assert time.monotonic() - start < 15
        assert events_of(agent, "SourceAvailable")
    finally:
        agent.stop(signal.SIGTERM)
        from nfctl.datapath.datapath import Datapath

        Datapath(bpffs_root, tmp_path / "state", netns=veth.ns_a).teardown()
