"""Node status derived as a pure step (nfctl.agent.reconcile.node_status)."""

from __future__ import annotations

from pathlib import Path

import yaml

from nfctl.agent.attachments import LostPoint
from nfctl.agent.plan import AttachPoint, ChainEntry
from nfctl.agent.reconcile.node_status import (
    Outlook,
    StatusInputs,
    nf_statuses,
    settle,
)
from nfctl.agent.reconcile.state import Applied, NFRuntime, entries_digest, spec_dump
from nfctl.agent.store import AppliedNF
from nfctl.compiler.build import MapInfo
from nfctl.datapath.datapath import LoadedBuild
from nfctl.datapath.observe import AttachPointState, ProgramRef
from nfctl.datapath.records import BuildRecord
from nfctl.manifest.model import Hook, NetworkFunction
from nfctl.wire.status import ConditionType, ErrorInfo, NFState, NFStatus, NodeStatus
from tests.reconcile_fakes import manifest

ETH0, ETH1 = AttachPoint("eth0", Hook.XDP), AttachPoint("eth1", Hook.XDP)
REV = "a" * 40


def applied(name: str, **kwargs: object) -> Applied:
    nf = NetworkFunction.model_validate(yaml.safe_load(manifest(name, **kwargs)))  # type: ignore[arg-type]
    record = AppliedNF(
        name, f"nfs/{name}/nf.yaml", "b" * 64, "1.0.0", REV, spec_dump(nf), 5.0, entries_digest(nf)
    )
    return Applied(record, nf)


def build(name: str) -> LoadedBuild:
    info = MapInfo("rules", "hash", 1, 4, 4, 64, 0, "unsigned int", "unsigned int")
    return LoadedBuild(BuildRecord(name, "xdp", "b" * 64, "p", [info]), Path("/p"), 42, "tg", False)


def running(*names: str, **extra: object) -> StatusInputs:
    """NFs applied and attached on eth0 and eth1."""
    items = {n: applied(n, entries={1: 1}) for n in names}
    chain = [ChainEntry(n, "b" * 64) for n in names]
    view = StatusInputs(
        applied=items,
        runtime={n: NFRuntime(in_git=True) for n in names},
        loaded={n: build(n) for n in names},
        map_counts={n: {"rules": 1} for n in names},
        target={ETH0: chain, ETH1: chain},
        modes={ETH0: "native", ETH1: "generic"},
    )
    for key, value in extra.items():
        setattr(view, key, value)
    return view


def by_name(view: StatusInputs) -> dict[str, NFStatus]:
    return {s.name: s for s in nf_statuses(view)}


def test_a_running_nf_reports_program_attach_points_and_maps() -> None:
    fw = by_name(running("fw"))["fw"]
    assert fw.state is NFState.APPLIED
    assert (fw.program_id, fw.program_tag, fw.revision, fw.hook) == (42, "tg", REV, "xdp")
    assert [(p.interface, p.mode) for p in fw.attach_points] == [
        ("eth0", "native"),
        ("eth1", "generic"),
    ]
    assert [(m.name, m.entries, m.managed) for m in fw.maps] == [("rules", 1, True)]
    assert fw.mode == "enforce" and not fw.suspended


def test_states_follow_errors_selection_and_suspension() -> None:
    view = running("fw", "count", "audit", "wanted")
    view.runtime["count"].attach_errors = {ETH1: "device busy"}
    view.runtime["audit"].error = ErrorInfo(message="verifier says no")
    view.suspended = {"wanted"}
    view.runtime = {**view.runtime, "elsewhere": NFRuntime(in_git=True, selected=False)}
    view.runtime = {**view.runtime, "new": NFRuntime(in_git=True)}
    states = {n: s.state for n, s in by_name(view).items()}
    assert states == {
        "fw": NFState.APPLIED,
        "count": NFState.DEGRADED,
        "audit": NFState.FAILED,
        "wanted": NFState.SUSPENDED,
        "elsewhere": NFState.NOT_SELECTED,
        "new": NFState.PENDING,
    }
    count = by_name(view)["count"]
    assert count.last_error is not None and count.last_error.message == "eth1/xdp: device busy"


def test_a_vanished_interface_degrades_its_nfs() -> None:
    view = running("fw")
    view.target = {ETH0: view.target[ETH0]}
    view.lost = {ETH1: LostPoint(100.0, ("fw",))}
    fw = by_name(view)["fw"]
    assert fw.state is NFState.DEGRADED
    assert [(p.interface, p.missing_since) for p in fw.attach_points] == [
        ("eth0", None),
        ("eth1", 100.0),
    ]
    assert fw.last_error is not None and "vanished" in fw.last_error.message


def test_ready_only_when_everything_runs_the_revision() -> None:
    status = NodeStatus(node="n")
    view = running("fw")
    settle(status, nf_statuses(view), Outlook(), REV, view)
    assert status.ready and status.last_applied_revision == REV
    ready = status.condition(ConditionType.READY)
    assert ready is not None and ready.message == f"applied revision {REV[:12]}"
    view.runtime["fw"].error = ErrorInfo(message="boom")
    settle(status, nf_statuses(view), Outlook(), "f" * 40, view)
    assert not status.ready and status.last_applied_revision == REV
    ready = status.condition(ConditionType.READY)
    assert ready is not None and ready.message == "fw (Failed)"


def test_stalled_and_source_errors_and_unreadable_manifests_say_why() -> None:
    view = running("fw")
    cases = [
        (Outlook(stalled=("UntrustedRevision", "not signed")), "UntrustedRevision"),
        (Outlook(source_error="connection refused"), "SourceUnavailable"),
        (Outlook(unparsed=("nfs/x/nf.yaml",)), "ReconciliationFailed"),
    ]
    for outlook, reason in cases:
        status = NodeStatus(node="n")
        settle(status, nf_statuses(view), outlook, REV, view)
        ready = status.condition(ConditionType.READY)
        assert ready is not None and not ready.status and ready.reason == reason
    stalled = status.condition(ConditionType.STALLED)
    assert stalled is not None and not stalled.status


def test_attached_and_shadowed_conditions() -> None:
    view = running("fw")
    state = AttachPointState("eth0", 1, Hook.XDP, None, ours=True)
    state.shadowed_by = [ProgramRef(9, "cilium", "t")]
    view.observed = {ETH0: state}
    view.lost = {ETH1: LostPoint(100.0, ("fw",))}
    status = NodeStatus(node="n")
    settle(status, nf_statuses(view), Outlook(), REV, view)
    attached = status.condition(ConditionType.ATTACHED)
    shadowed = status.condition(ConditionType.SHADOWED)
    assert attached is not None and not attached.status and "eth1/xdp (fw)" in attached.message
    assert shadowed is not None and shadowed.status and "cilium (id 9)" in shadowed.message
