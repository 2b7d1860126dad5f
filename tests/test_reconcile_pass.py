"""Whole reconcile passes in-process: the real Reconciler and state store, Git and the
datapath replaced by the fakes in reconcile_fakes (no kernel, no subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nfctl.agent.plan import AttachPoint
from nfctl.agent.reconciler import AgentSettings, Reconciler
from nfctl.agent.store import StateStore
from nfctl.manifest.model import Hook
from nfctl.wire.status import ConditionType, NFState, NodeStatus
from tests.reconcile_fakes import FakeGit, FakeKernel, nf_files, program

ETH0_XDP = AttachPoint("eth0", Hook.XDP)


class Node:
    """One agent's reconciler over a fake repository and kernel, with a real state dir."""

    def __init__(self, tmp: Path, drift: str = "correct", labels: dict[str, str] | None = None):
        self.git = FakeGit(tmp / "git")
        self.kernel = FakeKernel()
        self.store = StateStore(tmp / "state")
        self.settings = AgentSettings(
            node="node-a",
            labels=labels or {"role": "edge"},
            repo_url="https://git.example/nfs.git",
            ref="main",
            path="nfs",
            drift_mode=drift,
            verify_signatures=True,
        )
        self.reconciler = self.restart()

    def restart(self) -> Reconciler:
        self.reconciler = Reconciler(self.settings, self.kernel, self.kernel, self.git, self.store)
        return self.reconciler

    def sync(self) -> bool:
        return self.reconciler.sync()

    @property
    def status(self) -> NodeStatus:
        return self.reconciler.status

    def nf(self, name: str) -> NFState:
        return next(s.state for s in self.status.functions if s.name == name)

    def reasons(self, since: int = 0) -> list[str]:
        return [e.reason for e in self.store.events(since)]

    def last_event(self) -> int:
        events = self.store.events()
        return events[-1].sequence if events else 0


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


def two_nfs(**blocklist: object) -> dict[str, str]:
    return {
        **nf_files("blocklist", priority=10, entries={1: 1, 2: 1}, **blocklist),  # type: ignore[arg-type]
        **nf_files("counter", priority=20),
    }


def test_first_pass_attaches_in_priority_order_with_entries_and_reports_ready(node: Node) -> None:
    rev = node.git.commit(two_nfs())
    assert node.sync()
    assert node.kernel.chain("eth0") == ["blocklist", "counter"]
    assert node.kernel.chain("eth1") == ["blocklist", "counter"]
    assert node.kernel.chain("lo") == []  # never loopback
    assert node.kernel.entries("blocklist", "rules") == {1: 1, 2: 1}
    assert node.status.last_applied_revision == rev.sha
    assert node.nf("blocklist") is NFState.APPLIED and node.nf("counter") is NFState.APPLIED
    assert node.reasons().count("Applied") >= 2
    # the status file a user reads says the same
    saved = node.store.load_status()
    assert saved is not None and saved.ready and saved.last_applied_revision == rev.sha


def test_entry_only_change_updates_the_map_without_a_compile(node: Node) -> None:
    node.git.commit(two_nfs())
    node.sync()
    ids = {s.name: s.program_id for s in node.status.functions}
    compiled = list(node.kernel.compiled)
    rev = node.git.commit({**two_nfs(), **nf_files("blocklist", priority=10, entries={2: 5, 3: 1})})
    assert node.sync()
    assert node.kernel.compiled == compiled  # nothing recompiled
    assert node.kernel.entries("blocklist", "rules") == {2: 5, 3: 1}
    assert {s.name: s.program_id for s in node.status.functions} == ids
    assert node.status.last_applied_revision == rev.sha
    applied = [e for e in node.store.events() if e.reason == "Applied" and e.nf == "blocklist"]
    assert "map rules: +1 ~1 -1" in applied[-1].message


def test_a_compile_error_keeps_the_last_good_build_and_names_file_and_line(node: Node) -> None:
    good = node.git.commit(two_nfs())
    node.sync()
    before = node.kernel.chains[ETH0_XDP]
    broken = program(extra="#error missing semicolon\n")
    bad = node.git.commit({**two_nfs(), **nf_files("counter", source=broken, priority=20)})
    assert not node.sync()
    assert node.kernel.chains[ETH0_XDP] == before  # the old counter still runs
    status = next(s for s in node.status.functions if s.name == "counter")
    assert status.state is NFState.FAILED
    assert status.last_error is not None
    assert (status.last_error.file, status.last_error.line) == ("nfs/counter/prog.c", 2)
    assert status.last_error.revision == bad.sha
    assert node.status.last_applied_revision == good.sha
    assert node.status.last_attempted_revision == bad.sha
    failed = [e for e in node.store.events() if e.reason == "Failed"]
    assert len(failed) == 1 and "keeping version 1.0.0" in failed[0].message
    # the next pass retries but does not repeat the event
    node.sync()
    assert [e.reason for e in node.store.events()].count("Failed") == 1


def test_an_nf_removed_from_git_is_detached_and_unpinned(node: Node) -> None:
    node.git.commit(two_nfs())
    node.sync()
    node.git.commit(nf_files("counter", priority=20))
    assert node.sync()
    assert node.kernel.chain("eth0") == ["counter"]
    assert node.kernel.removed == ["blocklist"]
    assert not any(k[0] == "blocklist" for k in node.kernel.builds)
    assert "Pruned" in node.reasons()
    assert [s.name for s in node.status.functions] == ["counter"]


def test_a_manifest_that_stops_parsing_keeps_its_nf_attached(node: Node) -> None:
    node.git.commit(two_nfs())
    node.sync()
    files = two_nfs()
    files["nfs/blocklist/nf.yaml"] = "apiVersion: nfctl.io/v1alpha1\nkind: [\n"
    node.git.commit(files)
    assert not node.sync()
    assert node.kernel.chain("eth0") == ["blocklist", "counter"]
    assert node.kernel.removed == []
    assert node.nf("blocklist") is NFState.FAILED


def test_every_chain_write_follows_the_pass_observation_of_its_point(node: Node) -> None:
    """The datapath's one-NF swap trusts the pass's observation (a dispatcher another tool
    removed is seen there and attached again), so no pass may set a chain it did not
    observe first: a first pass, a version swap, drift, an added NF."""
    node.git.commit(two_nfs())
    node.sync()
    changed = program(extra="// 2\n")
    node.git.commit({**two_nfs(), **nf_files("counter", priority=20, source=changed)})
    node.sync()
    del node.kernel.chains[ETH0_XDP]
    node.reconciler.check_drift()
    node.git.commit({**two_nfs(), **nf_files("dscp", priority=30)})
    node.sync()
    seen: frozenset[AttachPoint] = frozenset()
    written = 0
    for kind, points in node.kernel.calls:
        if kind == "observe":
            seen = points
        else:
            assert points <= seen, (points, seen)
            written += 1
    assert written == 2 + 2 + 1 + 2  # both interfaces per change, the drifted point alone


def test_chain_drift_is_corrected_in_correct_mode(node: Node) -> None:
    node.git.commit(two_nfs())
    node.sync()
    mark = node.last_event()
    del node.kernel.chains[ETH0_XDP]  # someone detached us
    found = node.reconciler.check_drift()
    assert found and "eth0/xdp" in found[0]
    assert node.kernel.chain("eth0") == ["blocklist", "counter"]
    assert node.reasons(mark) == ["DriftCorrected"]


def test_drift_is_only_reported_in_warn_mode_and_only_once(tmp_path: Path) -> None:
    node = Node(tmp_path, drift="warn")
    node.git.commit(two_nfs())
    node.sync()
    mark = node.last_event()
    node.kernel.foreign.add(ETH0_XDP)
    node.kernel.maps[("blocklist", "rules")].clear()
    assert node.reconciler.check_drift()
    assert ETH0_XDP in node.kernel.foreign  # left alone
    assert node.kernel.entries("blocklist", "rules") == {}
    assert sorted(node.reasons(mark)) == ["DriftDetected", "DriftDetected"]
    node.reconciler.check_drift()
    assert len(node.reasons(mark)) == 2


def test_entry_drift_is_restored(node: Node) -> None:
    node.git.commit(two_nfs())
    node.sync()
    mark = node.last_event()
    node.kernel.maps[("blocklist", "rules")].clear()
    assert node.reconciler.check_drift() == ["blocklist/rules"]
    assert node.kernel.entries("blocklist", "rules") == {1: 1, 2: 1}
    events = node.store.events(mark)
    assert [e.reason for e in events] == ["DriftCorrected"]
    assert "restored to match Git" in events[0].message


def test_a_changed_target_is_not_drift(node: Node) -> None:
    node.git.commit(two_nfs())
    node.sync()
    mark = node.last_event()
    node.git.commit({**two_nfs(), **nf_files("counter", priority=5)})  # reorder
    assert node.sync()
    assert node.kernel.chain("eth0") == ["counter", "blocklist"]
    assert "DriftCorrected" not in node.reasons(mark)


def test_a_suspended_nf_freezes_its_attach_points(node: Node) -> None:
    node.git.commit(two_nfs())
    node.sync()
    before = dict(node.kernel.chains)
    node.store.set_suspended("counter", True)
    node.git.commit({**two_nfs(), **nf_files("counter", priority=5, version="2.0.0")})
    node.sync()
    assert node.kernel.chains == before
    assert node.nf("counter") is NFState.SUSPENDED
    node.store.set_suspended("counter", False)
    node.sync()
    assert node.kernel.chain("eth0") == ["counter", "blocklist"]


def test_node_selector_decides_what_runs(tmp_path: Path) -> None:
    node = Node(tmp_path, labels={"role": "core"})
    node.git.commit({**two_nfs(), **nf_files("edge-only", selector={"role": "edge"})})
    assert node.sync()
    assert "edge-only" not in node.kernel.chain("eth0")
    assert node.nf("edge-only") is NFState.NOT_SELECTED


def test_git_unreachable_keeps_the_datapath_and_says_so(node: Node) -> None:
    rev = node.git.commit(two_nfs())
    node.sync()
    node.git.down = "connection refused"
    seen: list[NodeStatus] = []
    node.reconciler.status_listeners.append(lambda s: seen.append(s.model_copy(deep=True)))
    assert not node.sync()
    assert node.kernel.chain("eth0") == ["blocklist", "counter"]
    ready = node.status.condition(ConditionType.READY)
    assert ready is not None and ready.reason == "SourceUnavailable"
    assert rev.sha in ready.message
    # the status said so before the event went out
    first = seen[0].condition(ConditionType.READY)
    assert first is not None and first.reason == "SourceUnavailable"
    assert node.reasons().count("SourceUnavailable") == 1
    node.git.down = None
    assert node.sync()
    assert "SourceAvailable" in node.reasons()


def test_an_unsigned_revision_is_refused_and_stalls(node: Node) -> None:
    good = node.git.commit(two_nfs())
    node.sync()
    bad = node.git.commit({**two_nfs(), **nf_files("counter", priority=5)})
    node.git.untrusted.add(bad.sha)
    assert not node.sync()
    assert node.kernel.chain("eth0") == ["blocklist", "counter"]
    stalled = node.status.condition(ConditionType.STALLED)
    assert stalled is not None and stalled.status and stalled.reason == "UntrustedRevision"
    assert node.status.last_applied_revision == good.sha
    assert node.status.last_attempted_revision == bad.sha
    refused = [e for e in node.store.events() if e.reason == "RevisionRefused"]
    assert len(refused) == 1 and refused[0].revision == bad.sha


def test_a_restart_adopts_without_compiling(node: Node) -> None:
    rev = node.git.commit(two_nfs())
    node.sync()
    compiled = list(node.kernel.compiled)
    sets = len(node.kernel.set_calls)
    node.restart()
    assert node.sync()
    assert node.kernel.compiled == compiled
    assert len(node.kernel.set_calls) == sets  # nothing re-attached either
    assert node.status.last_applied_revision == rev.sha


def test_new_maps_are_committed_only_once_live_everywhere(node: Node) -> None:
    node.git.commit(two_nfs())
    node.sync()
    node.kernel.swap_next.add("blocklist")
    node.kernel.failing.add(AttachPoint("eth1", Hook.XDP))
    new = nf_files("blocklist", source=program("return 1;"), priority=10, entries={1: 1, 2: 1})
    node.git.commit({**two_nfs(), **new})
    assert not node.sync()
    assert node.kernel.committed == []  # eth1 still runs the old build on the old maps
    assert node.nf("blocklist") is NFState.DEGRADED
    node.kernel.failing.clear()
    node.reconciler.check_drift()  # the retry on eth1
    assert node.kernel.chains[ETH0_XDP] == node.kernel.chains[AttachPoint("eth1", Hook.XDP)]
    assert node.kernel.committed == ["blocklist"]
    assert "MapsReplaced" in node.reasons()
    assert node.nf("blocklist") is NFState.APPLIED


def test_node_suspension_changes_nothing(node: Node) -> None:
    node.git.commit(two_nfs())
    node.sync()
    node.store.set_suspended(None, True)
    node.git.commit(nf_files("counter"))
    node.sync()
    assert node.kernel.chain("eth0") == ["blocklist", "counter"]
    assert node.kernel.removed == []
    reconciling = node.status.condition(ConditionType.RECONCILING)
    assert reconciling is not None and reconciling.reason == "Suspended"


def test_a_restart_with_git_down_keeps_the_last_fetched_revision(node: Node) -> None:
    rev = node.git.commit(two_nfs())
    node.sync()
    compiled = list(node.kernel.compiled)
    node.git.down = "connection refused"
    node.restart()
    assert not node.sync()  # not Ready: the source is unavailable
    assert node.kernel.chain("eth0") == ["blocklist", "counter"]
    assert node.kernel.compiled == compiled and node.kernel.removed == []
    assert node.status.last_applied_revision == rev.sha
    unavailable = [e for e in node.store.events() if e.reason == "SourceUnavailable"]
    assert len(unavailable) == 1 and "keeping nothing" in unavailable[0].message
