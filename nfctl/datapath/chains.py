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

The live chains remembered here are what this process wrote, and what a swap trusts: an
observation (Datapath.observe, which every reconcile pass runs before it changes
anything) forgets an attach point whose dispatcher is gone or replaced, whose interface
is gone or has another index, or whose head is another range, so the next change there
takes the full path and attaches again. The swap itself checks only the head packets
take (ChainTable.live_head, a memory read below ifindex 16,384): a second writer or a
restarted agent that moved the chain to another range is never patched behind its back.
It does not ask the kernel again whether our dispatcher still runs on the hook: the
pass's observation asked a few milliseconds before (a check right before the write would
narrow that window, not close it: another tool can detach the dispatcher just after
either), and the next observation repairs a detach that falls in between. A restarted
agent starts with no live chains, so its first change on each attach point goes through
a fresh range. Program fds of every version a chain has used stay open until the version
is unpinned (a version swapped out is the likeliest to come back: a rollback).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nfctl.bpf.syscall import obj_get
from nfctl.datapath.observe import AttachPointState
from nfctl.manifest.model import Hook


@dataclass(frozen=True)
class LiveChain:
    """A chain this process made live: the interface index it was made live on, its
    range, (NF, program pin) per slot in order, and the attach mode set_chain reported."""

    ifindex: int
    base: int
    slots: tuple[tuple[str, Path], ...]
    mode: str


def swap_offset(live: LiveChain | None, wanted: Sequence[tuple[str, Path]]) -> int | None:
    """The slot of the one NF whose version changes, if wanted is a one-NF version swap
    of live (same NFs, same order); None for any other change, or no change at all."""
    if live is None or len(wanted) != len(live.slots):
        return None
    changed = None
    for offset, ((nf, pin), (new_nf, new_pin)) in enumerate(zip(live.slots, wanted, strict=True)):
        if nf != new_nf:
            return None
        if pin != new_pin:
            if changed is not None:
                return None
            changed = offset
    return changed


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
    """The chains this process made live, per (interface name, hook), and the programs'
    fds."""

    def __init__(self) -> None:
        self._live: dict[tuple[str, Hook], LiveChain] = {}
        self.fds = ProgramFds()

    def get(self, ifname: str, hook: Hook) -> LiveChain | None:
        return self._live.get((ifname, hook))

    def record(self, ifname: str, hook: Hook, chain: LiveChain) -> None:
        self._live[(ifname, hook)] = chain

    def confirm(self, states: Iterable[AttachPointState]) -> None:
        """Forget each live chain an observation shows is not what packets run: our
        dispatcher not on the hook, the interface gone or another index, another head."""
        for state in states:
            chain = self.get(state.ifname, state.hook)
            if chain is None:
                continue
            if state.ifindex != chain.ifindex or not state.ours or state.head != chain.base:
                self.forget(state.ifname, state.hook)

    def forget(self, ifname: str, hook: Hook) -> None:
        self._live.pop((ifname, hook), None)

    def forget_pins(self, unpinned: Callable[[Path], bool]) -> None:
        """Pins were removed (a discarded, released or removed version): a chain holding
        one is no longer known, and its fd is closed, so a version pinned again at the
        same path is opened afresh."""
        for key, chain in list(self._live.items()):
            if any(unpinned(pin) for _, pin in chain.slots):
                del self._live[key]
        self.fds.forget([pin for pin in self.fds.pins() if unpinned(pin)])

    def close(self) -> None:
        self._live.clear()
        self.fds.close()
