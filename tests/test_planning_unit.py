"""Pure planning logic: no kernel, no Git."""

from __future__ import annotations

from nfctl.agent.plan import (
    AttachPoint,
    ChainEntry,
    Placement,
    match_interfaces,
    plan_chain_changes,
    prune_candidates,
    selects_node,
    target_chains,
)
from nfctl.datapath.entries import plan_entries
from nfctl.manifest.model import Hook


def placement(
    nf: str,
    hook: Hook = Hook.XDP,
    priority: int = 100,
    globs: tuple[str, ...] = ("eth*",),
    exclude: tuple[str, ...] = (),
) -> Placement:
    return Placement(nf, f"{nf}-build", hook, priority, globs, exclude)


def test_node_selector_needs_every_label() -> None:
    assert selects_node({}, {"role": "edge"})
    assert selects_node({"role": "edge"}, {"role": "edge", "zone": "a"})
    assert not selects_node({"role": "edge", "zone": "b"}, {"role": "edge", "zone": "a"})
    assert not selects_node({"role": "edge"}, {})


def test_interface_globs_include_exclude_and_never_loopback() -> None:
    names = ["lo", "eth0", "eth1", "eth10", "veth3", "bond0"]
    assert match_interfaces(["eth*"], [], names) == ["eth0", "eth1", "eth10"]
    assert match_interfaces(["eth[0-1]"], [], names) == ["eth0", "eth1"]
    assert match_interfaces(["*"], ["eth1*", "bond?"], names) == ["eth0", "veth3"]
    assert match_interfaces(["l*"], [], names) == []


def test_chains_are_ordered_by_priority_then_name_per_attach_point() -> None:
    chains = target_chains(
        [
            placement("ratelimit", priority=200),
            placement("blocklist", priority=100),
            placement("audit", priority=100),
            placement("counter", Hook.TC_INGRESS),
            placement("only-eth1", globs=("eth1",), priority=50),
        ],
        ["eth0", "eth1", "lo"],
    )
    assert [e.nf for e in chains[AttachPoint("eth0", Hook.XDP)]] == [
        "audit",
        "blocklist",
        "ratelimit",
    ]
    assert [e.nf for e in chains[AttachPoint("eth1", Hook.XDP)]] == [
        "only-eth1",
        "audit",
        "blocklist",
        "ratelimit",
    ]
    assert [e.nf for e in chains[AttachPoint("eth0", Hook.TC_INGRESS)]] == ["counter"]
    assert AttachPoint("lo", Hook.XDP) not in chains


def test_chain_changes_set_what_differs_and_clear_what_is_gone() -> None:
    a = ChainEntry("a", "1" * 64)
    b = ChainEntry("b", "2" * 64)
    b2 = ChainEntry("b", "3" * 64)
    eth0, eth1, eth2 = (AttachPoint(f"eth{i}", Hook.XDP) for i in range(3))
    target = {eth0: [a, b2], eth1: [a]}
    actual = {eth0: [a, b], eth1: [ChainEntry("a", "1" * 32)], eth2: [a]}
    changes = plan_chain_changes(target, actual)
    assert changes.set == {eth0: [a, b2]}  # eth1 matches on the 32-character pin prefix
    assert changes.clear == [eth2]
    # a hook we hold no longer (foreign program: None) is set again
    assert plan_chain_changes({eth0: [a]}, {eth0: None}).set == {eth0: [a]}
    # frozen points (suspended NFs) are left alone either way
    frozen = plan_chain_changes(target, actual, frozen=[eth0, eth2])
    assert eth0 not in frozen.set and frozen.clear == []


def test_a_manifest_that_fails_to_parse_never_prunes_its_nf() -> None:
    applied = ["blocklist", "counter", "old"]
    in_git = ["counter"]
    assert prune_candidates(applied, in_git, failing_paths_owners=["blocklist"]) == ["old"]


def test_entry_plan_adds_updates_deletes_and_zeroes_arrays() -> None:
    cur = {b"k1": b"\x01", b"k2": b"\x02", b"k3": b"\x03"}
    want = {b"k1": b"\x01", b"k2": b"\x09", b"k4": b"\x04"}
    plan = plan_entries(cur, want, "hash", 1)
    assert plan.upserts == {b"k2": b"\x09", b"k4": b"\x04"}
    assert plan.deletes == [b"k3"] and (plan.added, plan.updated) == (1, 1)
    array = plan_entries({b"i0": b"\x05", b"i1": b"\x00"}, {}, "array", 1)
    assert array.upserts == {b"i0": b"\x00"} and array.deletes == []
    assert plan_entries(want, dict(want), "hash", 1).empty
