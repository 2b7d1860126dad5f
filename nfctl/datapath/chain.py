"""Chains of NFs on one attach point, changed atomically.

The chain prog array of a hook type is cut into ranges of RANGE_SIZE slots. An attach
point's chain lives in one range; the heads map says which. To change a chain (replace
a version, add, remove, reorder), the new chain is written into a free range and the
head is switched with one map update: a packet sees the old chain or the new one, never
a mix and never none. The old range is cleared only after a quarantine, so packets
still walking it finish on the programs they started with. The one exception is a
version swap of a single NF, written into its live slot (replace_slot; when that is the
whole change is decided in nfctl.datapath.chains).

A head is kept in two maps. The hash (keyed by ifindex and hook) holds every head and is
what this side reads. The dispatcher reads the heads of ifindexes below
HEADS_INDEXED_IFINDEXES from an array instead (base + 1, 0 for none): an array lookup is
a direct access, ~30 ns per packet cheaper than hashing the key. Writes never put the
array ahead of the hash (a new head goes into the hash first, a removed one leaves the array
first), so one that finds them apart (a crash between the two writes, or an agent version
without the array that changed heads meanwhile) repairs the array from the hash (open()).
live_head() reads the head packets take through a mapping of the array where it covers the
ifindex: the check every version swap makes costs no syscall.
"""

from __future__ import annotations

import mmap
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nfctl.bpf import syscall
from nfctl.bpf.abi import (
    CHAIN_SLOTS,
    HEADS_INDEX_ENTRIES,
    HEADS_INDEX_FLAGS,
    HOOK_IDS,
    RANGE_SIZE,
    head_index,
)
from nfctl.bpf.syscall import BpfMap
from nfctl.manifest.model import Hook

MAX_CHAIN_LENGTH = RANGE_SIZE - 1  # the slot after the last NF must stay empty
QUARANTINE_SECONDS = 0.25
RANGE_COUNT = CHAIN_SLOTS // RANGE_SIZE


class ChainError(RuntimeError):
    pass


def head_key(ifindex: int, hook: Hook) -> bytes:
    return struct.pack("<II", ifindex, HOOK_IDS[hook])


def parse_head_key(raw: bytes) -> tuple[int, Hook]:
    ifindex, hook_id = struct.unpack("<II", raw[:8])
    hook = next(h for h, i in HOOK_IDS.items() if i == hook_id)
    return ifindex, hook


def ensure_heads_index(pin: Path) -> None:
    """Create and pin the heads array if absent (a root pinned by an agent before it
    existed), with the attributes the dispatcher declares, so its compile reuses the pin."""
    array = syscall.MAP_TYPE_IDS["array"]
    syscall.ensure_pinned_map(
        str(pin), array, 4, 4, HEADS_INDEX_ENTRIES, HEADS_INDEX_FLAGS, name="nfctl_headsidx"
    )


@dataclass
class ChainTable:
    """The chain prog array and heads maps of one hook type (xdp or tc)."""

    chain: BpfMap
    heads: BpfMap
    heads_index: BpfMap
    quarantine: dict[int, float] = field(default_factory=dict)  # base -> released at
    # How many leading slots of a range may be filled, per range this process wrote or
    # cleared. A range not listed may hold anything (written before a restart): it is
    # cleared in full. Clearing only these took ~30 failing deletes off each update.
    filled: dict[int, int] = field(default_factory=dict)
    next_range: int = 0  # where the search for a free range starts (round robin)
    _index_memory: mmap.mmap | None = field(default=None, init=False, repr=False)
    _slot_writer: syscall.U32Writer | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, chain_pin: Path, heads_pin: Path, heads_index_pin: Path) -> ChainTable:
        ensure_heads_index(heads_index_pin)
        table = cls(
            chain=BpfMap.from_pin(str(chain_pin)),
            heads=BpfMap.from_pin(str(heads_pin)),
            heads_index=BpfMap.from_pin(str(heads_index_pin)),
        )
        table.repair_index()
        return table

    def repair_index(self) -> int:
        """Make the heads array say what the hash says; returns the entries rewritten."""
        wanted = bytearray(HEADS_INDEX_ENTRIES * 4)
        for (ifindex, hook), base in self.all_heads().items():
            index = head_index(ifindex, hook)
            if index is not None:
                struct.pack_into("<I", wanted, index * 4, base + 1)
        current = self.heads_index.array_values()
        if current == wanted:  # the common case, compared without a loop
            return 0
        now, then = memoryview(current).cast("I"), memoryview(wanted).cast("I")
        stale = [index for index in range(HEADS_INDEX_ENTRIES) if now[index] != then[index]]
        for index in stale:
            self.heads_index.update(struct.pack("<I", index), struct.pack("<I", then[index]))
        return len(stale)

    def close(self) -> None:
        if self._index_memory is not None:
            self._index_memory.close()
            self._index_memory = None
        self._slot_writer = None  # it holds the chain map's fd
        self.chain.close()
        self.heads.close()
        self.heads_index.close()

    def head(self, ifindex: int, hook: Hook) -> int | None:
        raw = self.heads.lookup(head_key(ifindex, hook))
        return struct.unpack("<I", raw[:4])[0] if raw is not None else None

    def live_head(self, ifindex: int, hook: Hook) -> int | None:
        """The range packets on (ifindex, hook) start at: the heads array's entry where it
        covers the ifindex (what the dispatcher reads, read from a mapping: no syscall),
        else the hash's."""
        index = head_index(ifindex, hook)
        if index is None:
            return self.head(ifindex, hook)
        if self._index_memory is None:
            self._index_memory = self.heads_index.map_memory()
        (value,) = struct.unpack_from(
            "<I", self._index_memory, index * self.heads_index.array_stride
        )
        return value - 1 if value else None

    def all_heads(self) -> dict[tuple[int, Hook], int]:
        out = {}
        for key, value in self.heads.items():
            try:
                out[parse_head_key(key)] = struct.unpack("<I", value[:4])[0]
            except StopIteration:
                continue
        return out

    def slot_prog_ids(self, base: int) -> list[int]:
        """Program ids in a range, up to the first empty slot."""
        ids = []
        for offset in range(RANGE_SIZE):
            raw = self.chain.lookup(struct.pack("<I", base + offset))
            if raw is None:
                break
            ids.append(struct.unpack("<I", raw[:4])[0])
        return ids

    def chain_prog_ids(self, ifindex: int, hook: Hook) -> list[int] | None:
        base = self.head(ifindex, hook)
        return None if base is None else self.slot_prog_ids(base)

    def install(
        self,
        ifindex: int,
        hook: Hook,
        prog_fds: list[int],
        label: Callable[[int], None] | None = None,
    ) -> int:
        """Make prog_fds (in order) the chain of (ifindex, hook); returns the new base.
        label(base) runs once the range is filled, before it goes live."""
        if not prog_fds:
            raise ChainError("an empty chain is removed with remove(), not installed")
        if len(prog_fds) > MAX_CHAIN_LENGTH:
            raise ChainError(
                f"{len(prog_fds)} NFs on one hook; at most {MAX_CHAIN_LENGTH} can be chained"
            )
        old = self.head(ifindex, hook)
        base = self._allocate()
        length = len(prog_fds)
        known = self.filled.get(base)
        # Recorded before writing, so that reap() clears a failed write too; a range of
        # unknown content is cleared there in full.
        self.filled[base] = max(length, RANGE_SIZE if known is None else known)
        for offset, fd in enumerate(prog_fds):
            self._write_slot(base + offset, fd)
        if known is None or known > length:
            # A chain ends at its first empty slot: once this one is empty, older entries
            # further on are never reached (reap() drops them), so an update costs one
            # delete here instead of clearing the whole range first.
            self.chain.delete(struct.pack("<I", base + length))
        if label is not None:
            label(base)
        self.switch_head(ifindex, hook, base)
        if old is not None:
            self.quarantine[old] = time.monotonic()
        return base

    def switch_head(self, ifindex: int, hook: Hook, base: int) -> None:
        """Make the filled range at base the chain of (ifindex, hook): for the dispatcher
        one element update, atomic for every packet that reads the head next (the map it
        reads for this ifindex is written once)."""
        self.heads.update(head_key(ifindex, hook), struct.pack("<I", base))
        self._index(ifindex, hook, base)

    def _index(self, ifindex: int, hook: Hook, base: int | None) -> None:
        index = head_index(ifindex, hook)
        if index is not None:
            value = 0 if base is None else base + 1
            self.heads_index.update(struct.pack("<I", index), struct.pack("<I", value))

    def replace_slot(self, base: int, offset: int, prog_fd: int) -> None:
        """Put another program into one slot of a live range: one element update, so a
        packet runs the old program there or the new one, the rest of the chain unchanged
        (nfctl.datapath.chains says when that is the whole change)."""
        if not 0 <= offset < self.filled.get(base, RANGE_SIZE):
            raise ChainError(f"slot {offset} is outside the chain in range {base}")
        self._write_slot(base + offset, prog_fd)

    def _write_slot(self, slot: int, prog_fd: int) -> None:
        if self._slot_writer is None:
            self._slot_writer = syscall.U32Writer(self.chain)
        self._slot_writer.write(slot, prog_fd)

    def remove(self, ifindex: int, hook: Hook) -> None:
        old = self.head(ifindex, hook)
        self._index(ifindex, hook, None)
        self.heads.delete(head_key(ifindex, hook))
        if old is not None:
            self.quarantine[old] = time.monotonic()

    def reap(self, force: bool = False) -> int:
        """Clear ranges whose quarantine is over (drops their program references)."""
        now = time.monotonic()
        done = [
            base
            for base, released in self.quarantine.items()
            if force or now - released >= QUARANTINE_SECONDS
        ]
        in_use = set(self.all_heads().values())
        for base in done:
            if base not in in_use:
                self._clear(base)
            del self.quarantine[base]
        return len(done)

    def _clear(self, base: int) -> None:
        for offset in range(self.filled.get(base, RANGE_SIZE)):
            self.chain.delete(struct.pack("<I", base + offset))
        self.filled[base] = 0

    def _allocate(self) -> int:
        deadline = time.monotonic() + QUARANTINE_SECONDS * 4
        while True:
            live = set(self.all_heads().values())
            # Round robin from the last range handed out: the next one is almost always
            # free, and a released range is reused as late as possible.
            for step in range(RANGE_COUNT):
                index = (self.next_range + step) % RANGE_COUNT
                base = index * RANGE_SIZE
                if base not in live and base not in self.quarantine:
                    self.next_range = index + 1
                    return base
            if time.monotonic() > deadline:
                raise ChainError("no free chain range (too many attach points or updates)")
            # Reaping only when every range is taken keeps clearing off the update path:
            # the agent reaps after applying.
            if not self.reap():
                time.sleep(QUARANTINE_SECONDS / 10)
