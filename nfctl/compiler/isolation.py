"""Is a loaded NF confined to its own maps? Pure checks on what the kernel reports.

The worker loads two programs from one BCC module: the probe (the author's function
alone) and the wrapped NF (the author's function plus the generated chaining code). The
probe may reference only this NF's own maps, those pinned under its maps folder, and must
not tail-call: a tail call never returns, so the chain's later NFs would be skipped. The
wrapped program may reference only its own maps plus the chain's prog array and cursor,
and must still reference both and tail-call, or the generated code was tampered with.

The chain's state lives only in those two maps: the wrapper keeps nothing in skb->cb,
skb->mark or XDP metadata, which an NF may write.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

BPF_JMP_CALL = 0x85  # BPF_JMP | BPF_CALL
BPF_FUNC_TAIL_CALL = 12
# The kernel reports a helper call's imm as an address offset in the xlated dump, except
# for tail calls, which it rewrites back to helper 12: that one is recognisable.
DENIED_HELPERS = {BPF_FUNC_TAIL_CALL: "bpf_tail_call"}
# Map types whose values are references to programs or maps. Entries come from Git and are
# written by the agent, so such a map could be filled with what the agent holds.
REFERENCE_MAP_TYPES = {3: "prog_array", 12: "array_of_maps", 13: "hash_of_maps"}


@dataclass(frozen=True)
class TableRef:
    """A map of the BCC module as loaded: its id, type and where nfctl expects its pin."""

    name: str
    map_id: int
    map_type: int
    pin_path: str | None = None  # None: not pinned (a verify-only build)
    pinned_id: int | None = None  # id of the map found at pin_path


@dataclass(frozen=True)
class ProgramRefs:
    map_ids: frozenset[int]
    helper_calls: frozenset[int]


def helper_calls(xlated: bytes) -> frozenset[int]:
    """The imm of every helper call (src_reg 0) in a program's xlated instructions."""
    calls = set()
    for offset in range(0, len(xlated) - len(xlated) % 8, 8):
        code, regs, _off, imm = struct.unpack_from("<BBhi", xlated, offset)
        if code == BPF_JMP_CALL and regs >> 4 == 0:
            calls.add(imm)
    return frozenset(calls)


def _pin_violation(table: TableRef, what: str) -> str | None:
    if table.pin_path is None or table.pinned_id == table.map_id:
        return None
    return f"{what} {table.name!r} is not the map nfctl pinned at {table.pin_path}"


def check_isolation(
    own: list[TableRef], chain: list[TableRef], probe: ProgramRefs, wrapped: ProgramRefs
) -> list[str]:
    """Every way the loaded NF reaches beyond its own maps; empty when it is confined."""
    problems: list[str] = []
    for table in own:
        found = _pin_violation(table, "map")
        if found:
            problems.append(found + " (maps may only live in this NF's own folder)")
        if table.map_type in REFERENCE_MAP_TYPES:
            problems.append(
                f"map {table.name!r} is a {REFERENCE_MAP_TYPES[table.map_type]}: "
                "NF maps may not hold references to programs or maps"
            )
    for table in chain:
        found = _pin_violation(table, "generated chain table")
        if found:
            problems.append(found + " (the generated code was altered)")
    own_ids = {t.map_id for t in own if _pin_violation(t, "") is None}
    chain_ids = {t.map_id for t in chain}
    by_id = {t.map_id: t.name for t in own}
    for map_id in sorted(probe.map_ids - own_ids):
        if map_id in chain_ids:
            problems.append("the NF references the chain's internal state (prog array or cursor)")
        else:
            name = by_id.get(map_id)
            label = f"map {name!r} (id {map_id})" if name else f"map id {map_id}"
            problems.append(f"the NF references {label}, which is not one of its own maps")
    for helper in sorted(probe.helper_calls & DENIED_HELPERS.keys()):
        problems.append(
            f"the NF calls {DENIED_HELPERS[helper]}: nfctl chains NFs itself, "
            "a tail call would skip the NFs after this one"
        )
    for map_id in sorted(wrapped.map_ids - own_ids - chain_ids - probe.map_ids):
        problems.append(f"the wrapped program references map id {map_id}, not its own")
    if not chain_ids <= wrapped.map_ids or BPF_FUNC_TAIL_CALL not in wrapped.helper_calls:
        problems.append("the generated chaining code was altered (it no longer calls the next NF)")
    return problems
