"""The reconcile plan (nfctl.agent.reconcile.plan) as pure functions: no kernel, no Git."""

from __future__ import annotations

from pathlib import Path

import yaml

from nfctl.agent.plan import AttachPoint, ChainEntry
from nfctl.agent.reconcile.plan import (
    EntryIntent,
    Observation,
    desired_chains,
    plan_chains,
    plan_entries,
    read_observation,
    releases,
    swaps_ready,
)
from nfctl.agent.reconcile.state import Applied, entries_digest, spec_dump
from nfctl.agent.store import AppliedNF
from nfctl.datapath.datapath import LoadedBuild
from nfctl.datapath.observe import AttachPointState, ProgramRef
from nfctl.datapath.records import BuildRecord
from nfctl.manifest.model import Hook, NetworkFunction
from tests.reconcile_fakes import manifest

ETH0, ETH1 = AttachPoint("eth0", Hook.XDP), AttachPoint("eth1", Hook.XDP)


def applied(name: str, build: str = "b", position: str = "", **kwargs: object) -> Applied:
    text = manifest(name, **kwargs)  # type: ignore[arg-type]
    if position:
        text = text.replace("priority:", f"position: {position}, priority:")
    nf = NetworkFunction.model_validate(yaml.safe_load(text))
    record = AppliedNF(
        name,
        f"nfs/{name}/nf.yaml",
        build * 64,
        "1.0.0",
        "c" * 40,
        spec_dump(nf),
        0.0,
        entries_digest(nf),
    )
    return Applied(record, nf)


def loaded(item: Applied) -> LoadedBuild:
    record = BuildRecord(item.name, "xdp", item.build_hash, "p", [])
    return LoadedBuild(record, Path("/pins") / item.name, 1, "t", False)


def kernel_runs(*chains: tuple[AttachPoint, list[ChainEntry]]) -> Observation:
    states = []
    for point, entries in chains:
        state = AttachPointState(point.ifname, 1, point.hook, ProgramRef(1, "d", "t"), ours=True)
        state.chain = [ProgramRef(5, e.nf, "t", e.nf, e.build_hash[:32]) for e in entries]
        states.append(state)
    return read_observation(states)


def nfs(*items: Applied) -> dict[str, Applied]:
    return {a.name: a for a in items}


def test_added_nfs_are_attached_in_order_on_matching_interfaces() -> None:
    want = nfs(applied("fw", priority=10), applied("count", priority=20, interfaces=("eth0",)))
    target = desired_chains(want, ["lo", "eth0", "eth1"])
    plan = plan_chains(target, Observation(), want, set(), None, correct=True)
    steps = {s.point: [e.nf for e in s.entries] for s in plan.chains}
    assert steps == {ETH0: ["fw", "count"], ETH1: ["fw"]}
    assert plan.clear == [] and plan.drift_found == []


def test_nothing_to_do_when_the_kernel_runs_the_target() -> None:
    want = nfs(applied("fw"))
    target = desired_chains(want, ["eth0"])
    plan = plan_chains(target, kernel_runs(*target.items()), want, set(), target, True)
    assert plan.chains == [] and plan.clear == []


def test_a_new_build_is_swapped_in_and_a_removed_nf_cleared() -> None:
    old = nfs(applied("fw", "1"), applied("gone", interfaces=("eth1",)))
    before = desired_chains(old, ["eth0", "eth1"])
    new = nfs(applied("fw", "2"))
    target = desired_chains(new, ["eth0", "eth1"])
    plan = plan_chains(target, kernel_runs(*before.items()), new, set(), before, True)
    assert [(s.point, s.entries[0].build_hash[0]) for s in plan.chains] == [
        (ETH0, "2"),
        (ETH1, "2"),
    ]
    assert all(not s.drift for s in plan.chains)  # a change, not drift
    # eth1 still has fw: nothing to clear; a point no NF wants any more is cleared
    only_eth0 = nfs(applied("fw", "2", interfaces=("eth0",)))
    target = desired_chains(only_eth0, ["eth0", "eth1"])
    plan = plan_chains(target, kernel_runs(*before.items()), only_eth0, set(), before, True)
    assert plan.clear == [ETH1]


def test_a_reorder_is_a_change() -> None:
    before = desired_chains(nfs(applied("a", priority=1), applied("b", priority=2)), ["eth0"])
    want = nfs(applied("a", priority=3), applied("b", priority=2))
    target = desired_chains(want, ["eth0"])
    plan = plan_chains(target, kernel_runs(*before.items()), want, set(), before, True)
    assert [[e.nf for e in s.entries] for s in plan.chains] == [["b", "a"]]
    assert plan.chains[0].drift == () and plan.drift_found == []


def test_an_unchanged_target_the_kernel_lost_is_drift() -> None:
    want = nfs(applied("fw"))
    target = desired_chains(want, ["eth0"])
    gone = AttachPointState("eth0", 1, Hook.XDP, None, ours=False, drift=["nothing attached"])
    seen = read_observation([gone])
    corrected = plan_chains(target, seen, want, set(), target, correct=True)
    assert [s.drift for s in corrected.chains] == [("nothing attached",)]
    assert corrected.drift_found == ["eth0/xdp: nothing attached"]
    warned = plan_chains(target, seen, want, set(), target, correct=False)
    assert warned.chains == [] and warned.drift_left == {ETH0: ["nothing attached"]}
    # before the first pass there is no drift: only the work to do
    first = plan_chains(target, seen, want, set(), None, correct=False)
    assert [s.drift for s in first.chains] == [()]


def test_a_vanished_interface_is_not_drift() -> None:
    state = AttachPointState("eth0", None, Hook.XDP, None, ours=False)
    state.drift = ["interface eth0 is gone"]
    assert read_observation([state]).drift == {ETH0: []}


def test_attach_points_of_a_suspended_nf_are_frozen() -> None:
    before = desired_chains(nfs(applied("fw", "1"), applied("count", "1")), ["eth0"])
    want = nfs(applied("fw", "2"), applied("count", "1"))
    target = desired_chains(want, ["eth0"])
    plan = plan_chains(target, kernel_runs(*before.items()), want, {"count"}, before, True)
    assert plan.frozen == {ETH0} and plan.chains == []
    # a point where the frozen NF does not run yet is not frozen (nothing to keep there)
    plan = plan_chains(target, Observation(), want, {"count"}, None, True)
    assert plan.frozen == set() and [s.point for s in plan.chains] == [ETH0]


def test_xdp_mode_and_tcx_position_come_from_the_first_nf_that_sets_one() -> None:
    a = applied("a", hook="tc-ingress", priority=1)
    b = applied("b", hook="tc-ingress", priority=2, position="last")
    want = nfs(a, b)
    plan = plan_chains(desired_chains(want, ["eth0"]), Observation(), want, set(), None, True)
    assert [(s.position, s.xdp_mode) for s in plan.chains] == [("last", "auto")]


def test_entries_are_applied_once_then_checked_as_drift() -> None:
    fw = applied("fw", entries={1: 1})
    count = applied("count")
    running = {"fw": loaded(fw), "count": loaded(count)}
    first = plan_entries(nfs(fw, count), running, set(), {}, correct=True)
    assert [(e.nf, e.intent, [m.map_name for m in e.maps]) for e in first] == [
        ("fw", EntryIntent.APPLY, ["rules"]),
        ("count", EntryIntent.APPLY, []),
    ]
    assert first[0].maps[0].entries == [(1, 1)]
    synced = {e.nf: e.synced_as for e in first}
    again = plan_entries(nfs(fw, count), running, set(), synced, correct=True)
    assert {e.intent for e in again} == {EntryIntent.RESTORE}
    warn = plan_entries(nfs(fw, count), running, set(), synced, correct=False)
    assert {e.intent for e in warn} == {EntryIntent.CHECK}
    # new entries in Git: applied again, in either mode
    fw2 = applied("fw", entries={1: 2})
    assert plan_entries(nfs(fw2), running, set(), synced, False)[0].intent is EntryIntent.APPLY
    # suspended or not running: left alone
    assert plan_entries(nfs(fw), running, {"fw"}, {}, True) == []
    assert plan_entries(nfs(fw), {}, set(), {}, True) == []


def test_map_swaps_wait_for_every_attach_point() -> None:
    pending = {"fw": loaded(applied("fw")), "count": loaded(applied("count"))}
    assert swaps_ready(pending, {"fw": {ETH1: "boom"}}) == ["count"]
    assert swaps_ready(pending, {}) == ["fw", "count"]


def test_old_builds_go_unless_a_chain_may_still_run_them_or_a_swap_waits() -> None:
    fw, count = applied("fw", "2"), applied("count", "3")
    in_kernel = {ETH0: [ChainEntry("fw", "1" * 64), ChainEntry("count", "3" * 64)]}
    keep = releases(nfs(fw, count), in_kernel, pending=["count"])
    assert keep == {"fw": {"2" * 64, "1" * 32}}
