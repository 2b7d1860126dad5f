"""Attach points whose interface vanished: which ones, since when, and when they came back.

Planning only follows the interfaces that exist, so without this an NF whose interface was
deleted would simply have fewer attach points and still look Applied. An attach point is
lost when it ran NFs at the last converge, its interface is gone, and those NFs still
select that interface name; it is restored once the interface is back and targeted again,
and forgotten (without an event) when no NF selects the name any more. An NF whose
interfaces come and go by design (`onInterfaceRemoved: forget`, e.g. pods' veths) loses
nothing when one vanishes: that is reported as removed, once, and the NF stays Applied."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nfctl.agent.plan import AttachPoint, ChainEntry, Placement, match_interfaces


@dataclass(frozen=True)
class LostPoint:
    since: float
    nfs: tuple[str, ...]


def selecting(point: AttachPoint, nfs: Iterable[str], placements: Iterable[Placement]) -> list[str]:
    """Those of `nfs` whose placement still selects this interface name and hook."""
    wanted = set(nfs)
    return sorted(
        p.nf
        for p in placements
        if p.nf in wanted
        and p.hook is point.hook
        and match_interfaces(p.interfaces, p.exclude, [point.ifname])
    )


@dataclass
class AttachmentChanges:
    """What one converge changed: attach points newly lost, restored, and those whose
    interface vanished under NFs that forget removed interfaces (NF names)."""

    lost: list[tuple[AttachPoint, LostPoint]] = field(default_factory=list)
    restored: list[tuple[AttachPoint, LostPoint]] = field(default_factory=list)
    removed: list[tuple[AttachPoint, tuple[str, ...]]] = field(default_factory=list)


@dataclass
class AttachmentTracker:
    lost: dict[AttachPoint, LostPoint] = field(default_factory=dict)

    def update(
        self,
        previous: Mapping[AttachPoint, list[ChainEntry]],
        target: Mapping[AttachPoint, list[ChainEntry]],
        present: set[str],
        placements: list[Placement],
        now: float,
    ) -> AttachmentChanges:
        """Fold one converge in."""
        changes = AttachmentChanges()
        forgetting = {p.nf for p in placements if p.forget_removed}
        expected = [p for p in placements if not p.forget_removed]
        for point, entries in previous.items():
            if point.ifname in present or point in self.lost:
                continue
            ran = [e.nf for e in entries]
            nfs = selecting(point, ran, expected)
            if nfs:
                self.lost[point] = LostPoint(now, tuple(nfs))
                changes.lost.append((point, self.lost[point]))
            removed = selecting(point, (nf for nf in ran if nf in forgetting), placements)
            if removed:
                changes.removed.append((point, tuple(removed)))
        for point, lost in list(self.lost.items()):
            if point.ifname in present and point in target:
                changes.restored.append((point, self.lost.pop(point)))
            elif not selecting(point, lost.nfs, expected):
                del self.lost[point]
        return changes

    def of(self, nf: str) -> dict[AttachPoint, LostPoint]:
        return {p: lost for p, lost in self.lost.items() if nf in lost.nfs}
