"""Attach points whose interface vanished: which ones, since when, and when they came back.

Planning only follows the interfaces that exist, so without this an NF whose interface was
deleted would simply have fewer attach points and still look Applied. An attach point is
lost when it ran NFs at the last converge, its interface is gone, and those NFs still
select that interface name; it is restored once the interface is back and targeted again,
and forgotten (without an event) when no NF selects the name any more."""

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
class AttachmentTracker:
    lost: dict[AttachPoint, LostPoint] = field(default_factory=dict)

    def update(
        self,
        previous: Mapping[AttachPoint, list[ChainEntry]],
        target: Mapping[AttachPoint, list[ChainEntry]],
        present: set[str],
        placements: list[Placement],
        now: float,
    ) -> tuple[list[tuple[AttachPoint, LostPoint]], list[tuple[AttachPoint, LostPoint]]]:
        """Fold one converge in; returns (newly lost, restored) attach points."""
        lost_now = []
        for point, entries in previous.items():
            if point.ifname in present or point in self.lost:
                continue
            nfs = selecting(point, (e.nf for e in entries), placements)
            if nfs:
                self.lost[point] = LostPoint(now, tuple(nfs))
                lost_now.append((point, self.lost[point]))
        restored = []
        for point, lost in list(self.lost.items()):
            if point.ifname in present and point in target:
                restored.append((point, self.lost.pop(point)))
            elif not selecting(point, lost.nfs, placements):
                del self.lost[point]
        return lost_now, restored

    def of(self, nf: str) -> dict[AttachPoint, LostPoint]:
        return {p: lost for p, lost in self.lost.items() if nf in lost.nfs}
