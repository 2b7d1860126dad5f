"""A test build's private maps, read and written in the manifests' typed YAML forms."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from nfctl.bpf import syscall
from nfctl.bpf.codec import TypeCodec
from nfctl.bpf.mapinfo import MapInfo

ARRAY_TYPE_IDS = {2, 6}


@functools.cache
def _cpus() -> int:
    return syscall.possible_cpus()


@dataclass
class TestMap:
    """One map of a program loaded for tests. Per-CPU values are written to every CPU (the
    program sees them whichever CPU runs it) and read back as the sum over CPUs."""

    map: syscall.BpfMap
    info: MapInfo
    key_codec: TypeCodec
    value_codec: TypeCodec

    @property
    def percpu(self) -> bool:
        return self.map.info.is_percpu

    def _slot(self) -> int:
        return (self.info.value_size + 7) // 8 * 8

    def write(self, key: Any, value: Any) -> None:
        self.write_raw(*self.encode(key, value))

    def encode(self, key: Any, value: Any) -> tuple[bytes, bytes]:
        """Key and value bytes as the map takes them (per-CPU: one copy per CPU)."""
        raw = self.value_codec.encode(value)
        if self.percpu:
            raw = raw.ljust(self._slot(), b"\0") * _cpus()
        return self.key_codec.encode(key), raw

    def write_raw(self, key: bytes, value: bytes) -> None:
        self.map.update(key, value)

    def read_raw(self, key: bytes) -> bytes | None:
        """The element's value bytes (per-CPU: the sum encoded as one value), None if absent."""
        raw = self.map.lookup(key)
        if raw is None or not self.percpu:
            return raw
        slot = self._slot()
        total: Any = None
        for cpu in range(_cpus()):
            part = self.value_codec.decode(raw[cpu * slot : cpu * slot + self.info.value_size])
            total = part if total is None else add_values(total, part)
        return self.value_codec.encode(total)

    def decode(self, raw: bytes) -> Any:
        return self.value_codec.decode(raw)

    def clear(self) -> None:
        if self.map.info.map_type in ARRAY_TYPE_IDS:
            zero = bytes(self.map.value_buffer_size)
            for index in range(self.map.info.max_entries):
                self.map.update(index.to_bytes(4, "little"), zero)
            return
        for key in list(self.map.keys()):
            self.map.delete(key)


def add_values(a: Any, b: Any) -> Any:
    """Sum two decoded values field by field (counters); non-numbers keep the first."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: add_values(v, b.get(k, v)) for k, v in a.items()}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [add_values(x, y) for x, y in zip(a, b, strict=True)]
    return a


def subtract_values(after: Any, before: Any) -> Any:
    if isinstance(after, bool):
        return after
    if isinstance(after, int) and isinstance(before, int):
        return after - before
    if isinstance(after, dict) and isinstance(before, dict):
        return {k: subtract_values(v, before.get(k, 0)) for k, v in after.items()}
    if isinstance(after, list) and isinstance(before, list) and len(after) == len(before):
        return [subtract_values(x, y) for x, y in zip(after, before, strict=True)]
    return after


def zero_like(value: Any) -> Any:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0
    if isinstance(value, dict):
        return {k: zero_like(v) for k, v in value.items()}
    if isinstance(value, list):
        return [zero_like(v) for v in value]
    return value


def matches_increase(expected: Any, delta: Any) -> bool:
    """`increase: 3` on an integer, `{packets: 1}` on a struct (fields not named: any)."""
    if isinstance(expected, dict) and isinstance(delta, dict):
        return all(k in delta and matches_increase(v, delta[k]) for k, v in expected.items())
    if isinstance(expected, int) and not isinstance(expected, bool):
        return isinstance(delta, int) and delta == expected
    return False
