"""Map migration: when a new version declares a pinned map differently, the builder creates
the new map at a staging pin and fills it from the live one (converted to the new key and
value types); after the switch, what the old program wrote meanwhile is merged in and the
staged map replaces the live one (nfctl.builder.builder.Builder.commit)."""

from __future__ import annotations

from nfctl.bpf.codec import CodecError, TypeCodec
from nfctl.bpf.syscall import BPF_EXIST, BPF_NOEXIST, BpfError, BpfMap, percpu_value, possible_cpus
from nfctl.datapath.datapath import MapSwap
from nfctl.datapath.entries import convert_value, merge_written
from nfctl.datapath.records import BuildRecord

# A program invocation that read the old chain before the switch may still be running;
# BPF programs run to completion within microseconds, so this is ample.
IN_FLIGHT_GRACE_S = 0.05
MERGE_RETRIES = 100


def copy_into_staged(swap: MapSwap, old_record: BuildRecord, new_record: BuildRecord) -> int:
    """Fill the staged map with the live map's elements, converted to the new declaration.
    Keeps what was copied in swap, so merge_late_writes can carry over later writes."""
    if not swap.final_pin.exists():
        return 0
    try:
        old_key, old_value = old_record.codecs(swap.name)
    except KeyError:
        return 0
    new_key, new_value = new_record.codecs(swap.name)
    copied = 0
    with (
        BpfMap.from_pin(str(swap.final_pin)) as old,
        BpfMap.from_pin(str(swap.staged_pin)) as new,
    ):
        items = old.items()
        swap.copied = dict(items)
        swap.codecs = (old_key, new_key, old_value, new_value)
        if len(items) > new.info.max_entries and new.info.type_name not in (
            "array",
            "percpu_array",
        ):
            raise CodecError(
                f"map {swap.name!r} holds {len(items)} entries, the new max_entries is "
                f"{new.info.max_entries}"
            )
        for raw_key, raw_value in items:
            key = _convert(old_key, new_key, raw_key, 1)
            is_array = new.info.type_name in ("array", "percpu_array")
            if is_array and int.from_bytes(key[:4], "little") >= new.info.max_entries:
                continue  # an array that shrank: indexes past the end have no slot
            value = _convert_values(old, new, old_value, new_value, raw_value)
            new.update(key, value)
            copied += 1
    return copied


def merge_late_writes(swap: MapSwap) -> int:
    """Carry over what the old program wrote between the migration copy and the switch
    (rules in entries.merge_written). Per-CPU maps merge slot by slot."""
    if swap.copied is None or swap.codecs is None or not swap.final_pin.exists():
        return 0
    old_key, new_key, old_value, new_value = swap.codecs
    merged = 0
    with (
        BpfMap.from_pin(str(swap.final_pin)) as old,
        BpfMap.from_pin(str(swap.staged_pin)) as new,
    ):
        is_array = new.info.type_name in ("array", "percpu_array")
        now = dict(old.items())
        for raw_key, raw in now.items():
            copied = swap.copied.get(raw_key)
            if copied == raw:
                continue
            key = _convert(old_key, new_key, raw_key, 1)
            if is_array and int.from_bytes(key[:4], "little") >= new.info.max_entries:
                continue
            theirs = _convert_values(old, new, old_value, new_value, raw)
            # an element the old program created after the copy merges onto zero
            base = (
                _convert_values(old, new, old_value, new_value, copied)
                if copied is not None
                else bytes(len(theirs))
            )
            _merge_into(new, key, base, theirs, new_value)
            merged += 1
        for raw_key, copied in swap.copied.items():
            if raw_key in now or is_array:
                continue
            # deleted by the old program after the copy: delete unless the new one rewrote it
            key = _convert(old_key, new_key, raw_key, 1)
            if new.lookup(key) == _convert_values(old, new, old_value, new_value, copied):
                new.delete(key)
                merged += 1
    return merged


def _convert(old: TypeCodec, new: TypeCodec, raw: bytes, _count: int) -> bytes:
    return convert_value(old, new, raw[: old.size])


def _convert_values(
    old_map: BpfMap, new_map: BpfMap, old: TypeCodec, new: TypeCodec, raw: bytes
) -> bytes:
    if not old_map.info.is_percpu:
        converted = convert_value(old, new, raw[: old.size])
        return (
            percpu_value(converted, new_map.info.value_size)
            if new_map.info.is_percpu
            else converted
        )
    old_slot = (old_map.info.value_size + 7) // 8 * 8
    slots = [raw[i * old_slot : i * old_slot + old.size] for i in range(possible_cpus())]
    if not new_map.info.is_percpu:
        raise CodecError("a per-CPU map cannot be migrated into a shared map")
    new_slot = (new_map.info.value_size + 7) // 8 * 8
    return b"".join(convert_value(old, new, s).ljust(new_slot, b"\0") for s in slots)


def _merge_into(new: BpfMap, key: bytes, base: bytes, theirs: bytes, codec: TypeCodec) -> None:
    """Read-modify-write of one element of a live map. The new program may write the same
    element meanwhile; re-read just before writing and redo the merge if it changed, which
    leaves only the microseconds of one update syscall in which a concurrent write is lost."""
    slot = (new.info.value_size + 7) // 8 * 8 if new.info.is_percpu else len(base)
    for _ in range(MERGE_RETRIES):
        ours = new.lookup(key)
        if ours is None:
            try:
                new.update(key, theirs, BPF_NOEXIST)
                return
            except BpfError:
                continue  # the new program created it meanwhile: merge onto its value
        parts = []
        for i in range(0, len(ours), slot):
            b, t, o = (codec.decode(v[i : i + codec.size]) for v in (base, theirs, ours))
            parts.append(codec.encode(merge_written(b, t, o)).ljust(slot, b"\0"))
        merged = b"".join(parts)[: len(ours)]
        if new.lookup(key) == ours:
            new.update(key, merged, BPF_EXIST)
            return
    raise OSError(f"element kept changing while merging into {new.info.name!r}")
