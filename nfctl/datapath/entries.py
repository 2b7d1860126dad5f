"""Pure planning for managed map entries and map migration (no kernel calls here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nfctl.bpf.codec import CodecError, TypeCodec

ARRAY_TYPES = {"array", "percpu_array"}


@dataclass
class EntryPlan:
    upserts: dict[bytes, bytes] = field(default_factory=dict)
    deletes: list[bytes] = field(default_factory=list)
    added: int = 0
    updated: int = 0

    @property
    def empty(self) -> bool:
        return not self.upserts and not self.deletes


def encode_entries(
    entries: list[tuple[Any, Any]], key_codec: TypeCodec, value_codec: TypeCodec
) -> dict[bytes, bytes]:
    return {key_codec.encode(k): value_codec.encode(v) for k, v in entries}


def plan_entries(
    current: dict[bytes, bytes], desired: dict[bytes, bytes], map_type: str, value_size: int
) -> EntryPlan:
    """Make current equal desired. Arrays cannot lose elements: unlisted ones are zeroed."""
    plan = EntryPlan()
    for key, value in desired.items():
        have = current.get(key)
        if have is None:
            plan.upserts[key] = value
            plan.added += 1
        elif have != value:
            plan.upserts[key] = value
            plan.updated += 1
    zero = bytes(value_size)
    for key, value in current.items():
        if key in desired:
            continue
        if map_type in ARRAY_TYPES:
            if value != zero:
                plan.upserts[key] = zero
                plan.updated += 1
        else:
            plan.deletes.append(key)
    return plan


def convert_value(old: TypeCodec, new: TypeCodec, raw: bytes) -> bytes:
    """Re-encode a stored element for a changed C type: fields are matched by name, new
    fields start at zero, dropped fields are dropped, integers must still fit."""
    decoded = old.decode(raw)
    return new.encode(_project(decoded, new.desc))


def _project(value: Any, desc: Any) -> Any:
    if isinstance(desc, str) or not isinstance(value, dict):
        if isinstance(value, dict):
            raise CodecError("a struct cannot become a scalar; use onIncompatible: recreate")
        return value
    if (
        isinstance(desc, list)
        and len(desc) == 2
        and isinstance(desc[1], list)
        and desc[1]
        and isinstance(desc[1][0], int)
    ):
        return value
    names = {f[0] for f in desc[1]}
    return {k: v for k, v in value.items() if k in names}


def merge_written(base: Any, theirs: Any, ours: Any) -> Any:
    """Three-way merge of one element the old program kept writing after migration copied it.

    base is the copied value, theirs the old map's value at the switch, ours the new map's
    value now (all decoded in the new layout). Integers are counters: the new value gains what
    the old program added after the copy (ours + theirs - base), so no packet is counted twice
    or lost. Any other field takes the old program's write unless the new program has already
    changed it since the copy (the newer write wins)."""
    if isinstance(ours, dict):
        return {k: merge_written(base.get(k), theirs.get(k), v) for k, v in ours.items()}
    if isinstance(ours, list):
        return [merge_written(b, t, o) for b, t, o in zip(base, theirs, ours, strict=True)]
    if isinstance(ours, int) and not isinstance(ours, bool):
        return ours + theirs - base
    return ours if ours != base else theirs
