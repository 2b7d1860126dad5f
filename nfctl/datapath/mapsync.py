"""Managed map entries of a pinned NF version: make a map hold exactly the desired
entries with a diff in place (no reload), show that diff, and read entries back."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from nfctl.bpf.codec import TypeCodec
from nfctl.bpf.syscall import BpfMap, percpu_value, possible_cpus
from nfctl.datapath.entries import EntryPlan, encode_entries, plan_entries
from nfctl.datapath.model import EntrySyncResult, LoadedBuild
from nfctl.datapath.pins import BpffsPaths


def sync_entries(
    paths: BpffsPaths, loaded: LoadedBuild, map_name: str, entries: list[tuple[Any, Any]]
) -> EntrySyncResult:
    """Make a managed map hold exactly entries: a diff in place, no reload."""
    desired = _encoded(loaded, map_name, entries)
    with BpfMap.from_pin(str(loaded.map_pin(paths, map_name))) as bmap:
        plan = _plan(bmap, desired)
        for key, value in plan.upserts.items():
            bmap.update(key, value)
        for key in plan.deletes:
            bmap.delete(key)
        total = len(desired)
    return EntrySyncResult(map_name, plan.added, plan.updated, len(plan.deletes), total)


def entries_diff(
    paths: BpffsPaths, loaded: LoadedBuild, map_name: str, entries: list[tuple[Any, Any]]
) -> EntryPlan:
    """What sync_entries would change, without changing it (drift in warn mode)."""
    with BpfMap.from_pin(str(loaded.map_pin(paths, map_name))) as bmap:
        return _plan(bmap, _encoded(loaded, map_name, entries))


def _encoded(
    loaded: LoadedBuild, map_name: str, entries: list[tuple[Any, Any]]
) -> dict[bytes, bytes]:
    key_codec, value_codec = loaded.record.codecs(map_name)
    return encode_entries(entries, key_codec, value_codec)


def map_entries(paths: BpffsPaths, loaded: LoadedBuild, map_name: str) -> Iterator[tuple[Any, Any]]:
    """Decoded (key, value) pairs; per-CPU values are summed when integers."""
    key_codec, value_codec = loaded.record.codecs(map_name)
    with BpfMap.from_pin(str(loaded.map_pin(paths, map_name))) as bmap:
        for raw_key, raw_value in bmap.items():
            yield key_codec.decode(raw_key), _decode_value(bmap, value_codec, raw_value)


def _plan(bmap: BpfMap, desired: dict[bytes, bytes]) -> EntryPlan:
    info = bmap.info
    if info.is_percpu:
        desired = {k: percpu_value(v, info.value_size) for k, v in desired.items()}
    current = dict(bmap.items())
    size = bmap.value_buffer_size
    return plan_entries(current, desired, info.type_name, size)


def _decode_value(bmap: BpfMap, codec: TypeCodec, raw: bytes) -> Any:
    if not bmap.info.is_percpu:
        return codec.decode(raw[: codec.size])
    slot = (bmap.info.value_size + 7) // 8 * 8
    values = [codec.decode(raw[i * slot : i * slot + codec.size]) for i in range(possible_cpus())]
    if all(isinstance(v, int) for v in values):
        return sum(values)
    return values
