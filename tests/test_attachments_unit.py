"""Which attach points lost their interface, and when they came back (pure logic)."""

from __future__ import annotations

from nfctl.agent.attachments import AttachmentChanges, AttachmentTracker, LostPoint
from nfctl.agent.plan import AttachPoint, ChainEntry, Placement
from nfctl.manifest.model import Hook


def placement(
    nf: str, *interfaces: str, exclude: tuple[str, ...] = (), forget: bool = False
) -> Placement:
    return Placement(
        nf, "h" * 64, Hook.TC_INGRESS, 100, tuple(interfaces), exclude, forget_removed=forget
    )


ETH0 = AttachPoint("eth0", Hook.TC_INGRESS)
ETH1 = AttachPoint("eth1", Hook.TC_INGRESS)
CHAIN = [ChainEntry("fw", "h" * 64)]
NOTHING = AttachmentChanges()


def test_vanished_interface_is_lost_until_it_returns() -> None:
    tracker = AttachmentTracker()
    places = [placement("fw", "eth*")]
    both = {ETH0: CHAIN, ETH1: CHAIN}
    changes = tracker.update(both, {ETH0: CHAIN}, {"eth0"}, places, now=100.0)
    assert changes == AttachmentChanges(lost=[(ETH1, LostPoint(100.0, ("fw",)))])
    assert tracker.of("fw") == {ETH1: LostPoint(100.0, ("fw",))}
    # still gone at the next converge: no second event
    assert tracker.update({ETH0: CHAIN}, {ETH0: CHAIN}, {"eth0"}, places, 101.0) == NOTHING
    # back and targeted again
    changes = tracker.update({ETH0: CHAIN}, both, {"eth0", "eth1"}, places, 105.0)
    assert changes == AttachmentChanges(restored=[(ETH1, LostPoint(100.0, ("fw",)))])
    assert tracker.lost == {}


def test_interface_no_longer_selected_is_forgotten_not_lost() -> None:
    tracker = AttachmentTracker()
    both = {ETH0: CHAIN, ETH1: CHAIN}
    tracker.update(both, {ETH0: CHAIN}, {"eth0"}, [placement("fw", "eth*")], 100.0)
    # the manifest now excludes eth1: nothing is missing any more
    changed = [placement("fw", "eth*", exclude=("eth1",))]
    assert tracker.update({ETH0: CHAIN}, {ETH0: CHAIN}, {"eth0"}, changed, 101.0) == NOTHING
    assert tracker.lost == {}
    # an interface removed together with its NF (pruned) is not lost either
    assert tracker.update(both, {}, {"eth0"}, [], 102.0) == NOTHING


def test_nf_that_forgets_removed_interfaces_loses_nothing() -> None:
    """onInterfaceRemoved: forget (pods' veths): a vanished interface is reported removed
    once and never lost; an NF beside it on the same attach point that expects its
    interfaces still loses it."""
    tracker = AttachmentTracker()
    counted = [ChainEntry("fw", "h" * 64), ChainEntry("count", "c" * 64)]
    both = {ETH0: counted, ETH1: counted}
    forgetting = [placement("count", "eth*", forget=True)]
    changes = tracker.update(both, {ETH0: counted}, {"eth0"}, forgetting, 100.0)
    assert changes == AttachmentChanges(removed=[(ETH1, ("count",))])
    assert tracker.lost == {}
    # gone at the next converge too: reported once
    assert tracker.update({ETH0: counted}, {ETH0: counted}, {"eth0"}, forgetting, 101.0) == NOTHING
    # back: attached again by planning, nothing to restore
    assert tracker.update({ETH0: counted}, both, {"eth0", "eth1"}, forgetting, 102.0) == NOTHING

    mixed = [placement("fw", "eth*"), *forgetting]
    changes = tracker.update(both, {ETH0: counted}, {"eth0"}, mixed, 103.0)
    assert changes.lost == [(ETH1, LostPoint(103.0, ("fw",)))]
    assert changes.removed == [(ETH1, ("count",))]
    assert tracker.of("count") == {} and ETH1 in tracker.of("fw")
