"""Which attach points lost their interface, and when they came back (pure logic)."""

from __future__ import annotations

from nfctl.agent.attachments import AttachmentTracker, LostPoint
from nfctl.agent.plan import AttachPoint, ChainEntry, Placement
from nfctl.manifest.model import Hook


def placement(nf: str, *interfaces: str, exclude: tuple[str, ...] = ()) -> Placement:
    return Placement(nf, "h" * 64, Hook.TC_INGRESS, 100, tuple(interfaces), exclude)


ETH0 = AttachPoint("eth0", Hook.TC_INGRESS)
ETH1 = AttachPoint("eth1", Hook.TC_INGRESS)
CHAIN = [ChainEntry("fw", "h" * 64)]


def test_vanished_interface_is_lost_until_it_returns() -> None:
    tracker = AttachmentTracker()
    places = [placement("fw", "eth*")]
    both = {ETH0: CHAIN, ETH1: CHAIN}
    lost, restored = tracker.update(both, {ETH0: CHAIN}, {"eth0"}, places, now=100.0)
    assert lost == [(ETH1, LostPoint(100.0, ("fw",)))] and restored == []
    assert tracker.of("fw") == {ETH1: LostPoint(100.0, ("fw",))}
    # still gone at the next converge: no second event
    assert tracker.update({ETH0: CHAIN}, {ETH0: CHAIN}, {"eth0"}, places, 101.0) == ([], [])
    # back and targeted again
    lost, restored = tracker.update({ETH0: CHAIN}, both, {"eth0", "eth1"}, places, 105.0)
    assert lost == [] and restored == [(ETH1, LostPoint(100.0, ("fw",)))]
    assert tracker.lost == {}


def test_interface_no_longer_selected_is_forgotten_not_lost() -> None:
    tracker = AttachmentTracker()
    both = {ETH0: CHAIN, ETH1: CHAIN}
    tracker.update(both, {ETH0: CHAIN}, {"eth0"}, [placement("fw", "eth*")], 100.0)
    # the manifest now excludes eth1: nothing is missing any more
    changed = [placement("fw", "eth*", exclude=("eth1",))]
    assert tracker.update({ETH0: CHAIN}, {ETH0: CHAIN}, {"eth0"}, changed, 101.0) == ([], [])
    assert tracker.lost == {}
    # an interface removed together with its NF (pruned) is not lost either
    assert tracker.update(both, {}, {"eth0"}, [], 102.0) == ([], [])
