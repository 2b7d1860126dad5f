"""Which write a chain change needs, and the program fds live chains hold.

The commonest change is a version swap of ONE NF at the same position (same NFs in the
same order, one build differs). It is written into the live slot with one prog-array
update: a packet sees the old or the new version of that NF and the same programs
everywhere else, the guarantee the head switch gives (old chain or new). Everything
else (two NFs changed, add, remove, reorder, the same chain set again to repair drift)
is written into a fresh range and made live by the head switch (ChainTable.install):
two in-place writes would let a packet see a mix.

What a swap may skip, and why: the slot keeps its counter label (same NF, same attach
point, same counter id), no NF departed (no counter release), no range is allocated or
quarantined (the live range stays live; the kernel drops the old program's reference at
the update, packets running it finish under RCU).

The live chains remembered here are what this process wrote. A restarted agent starts
with none, so its first change on each attach point goes through a fresh range; the
head is read before every swap, so a chain another writer replaced is never patched.
What a swap needs is held open: program fds of every version a chain has used, until
the version is unpinned (a version swapped out is the likeliest to come back: a
rollback), and our link of each attach point, whose info says with one query whether
the dispatcher still runs there (another tool's detach shows as ifindex 0).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nfctl.bpf.syscall import obj_get
from nfctl.datapath.links import PinnedLink, link_info
from nfctl.manifest.model import Hook

Point = tuple[int, Hook]  # (ifindex, hook)


@dataclass(frozen=True)
class LiveChain:
    """A chain this process made live: its range, (NF, program pin) per slot in order,
    and the attach mode set_chain reported for it."""

    base: int
    slots: tuple[tuple[str, Path], ...]
    mode: str


def swap_offset(live: LiveChain | None, wanted: Sequence[tuple[str, Path]]) -> int | None:
    """The slot of the one NF whose version changes, if wanted is a one-NF version swap
    of live (same NFs, same order); None for any other change, or no change at all."""
    if live is None or len(wanted) != len(live.slots):
        return None
    if [nf for nf, _ in wanted] != [nf for nf, _ in live.slots]:
        return None
    changed = [i for i, (now, new) in enumerate(zip(live.slots, wanted, strict=True)) if now != new]
    return changed[0] if len(changed) == 1 else None


class ProgramFds:
    """Open fds of the program pins chains have used, so a chain write opens only pins it
    has not opened yet. A pin is only ever replaced by unpinning it first (a discarded or
    released version), which goes through forget()."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, pin: Path) -> int:
        if pin not in self._fds:
            self._fds[pin] = obj_get(str(pin))
        return self._fds[pin]

    def pins(self) -> list[Path]:
        return list(self._fds)

    def forget(self, pins: Iterable[Path]) -> None:
        for pin in pins:
            fd = self._fds.pop(pin, None)
            if fd is not None:
                os.close(fd)

    def close(self) -> None:
        self.forget(list(self._fds))


class LiveChains:
    """The chains this process made live, per attach point, our link there (when attached
    through one), and the programs' fds."""

    def __init__(self) -> None:
        self._live: dict[Point, LiveChain] = {}
        self._links: dict[Point, PinnedLink] = {}
        self.fds = ProgramFds()

    def get(self, point: Point) -> LiveChain | None:
        return self._live.get(point)

    def record(self, point: Point, chain: LiveChain) -> None:
        self._live[point] = chain

    def hold_link(self, point: Point, link: PinnedLink | None) -> None:
        """Keep our link on point open (None: attached over netlink), replacing the one held."""
        old = self._links.pop(point, None)
        if old is not None:
            old.close()
        if link is not None:
            self._links[point] = link

    def linked_prog_id(self, point: Point) -> int:
        """The program our held link on point runs, or 0 if we hold none or it was
        detached (its interface gone, or `bpftool link detach`)."""
        link = self._links.get(point)
        if link is None:
            return 0
        info = link_info(link.fd)
        return info.prog_id if info.ifindex == point[0] else 0

    def forget(self, point: Point) -> None:
        self._live.pop(point, None)
        self.hold_link(point, None)

    def forget_pins(self, unpinned: Callable[[Path], bool]) -> None:
        """Pins were removed (a discarded, released or removed version): a chain holding
        one is no longer known, and its fd is closed, so a version pinned again at the
        same path is opened afresh."""
        for point, chain in list(self._live.items()):
            if any(unpinned(pin) for _, pin in chain.slots):
                self.forget(point)
        self.fds.forget([pin for pin in self.fds.pins() if unpinned(pin)])

    def close(self) -> None:
        for point in list(self._links):
            self.hold_link(point, None)
        self._live.clear()
        self.fds.close()
