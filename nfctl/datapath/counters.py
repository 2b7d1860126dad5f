"""Per-NF verdict counters, per attach point, kept by the code nfctl wraps around each NF.

Three maps per hook type, pinned beside the chain (never in an NF's folder):

<root>/<kind>/counters     per-CPU array: counter id -> COUNTER_FIELDS u64 (no atomics)
<root>/<kind>/slotctr      array: chain slot -> counter id (0: no NF in that slot)
<root>/<kind>/counter-ids  hash, user space only: (nf, ifindex, hook) -> counter id

The wrapper finds its counters through the slot it runs in, so the id stays with the
(nf, attach point) while chains are rebuilt in fresh slot ranges and the NF's program is
swapped: the counters are monotonic across versions and survive the agent (pinned).
A slot whose id is set but whose program the tail call did not find is a chain error.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nfctl.bpf import syscall
from nfctl.bpf.abi import (
    CHAIN_SLOTS,
    COUNTER_FIELDS,
    COUNTER_IDS,
    ERRORS_FIELD,
    HOOK_IDS,
    MODES,
    VERDICTS,
)
from nfctl.bpf.syscall import BpfMap
from nfctl.manifest.model import Hook

MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERCPU_ARRAY = 6
NAME_BYTES = 64  # NF names are DNS labels (<= 63 characters)
_KEY = struct.Struct(f"<{NAME_BYTES}sII")


class CounterError(RuntimeError):
    pass


@dataclass(frozen=True)
class CounterPins:
    counters: Path
    slots: Path
    ids: Path


def ensure_maps(pins: CounterPins) -> None:
    """Create and pin the counter maps if absent. Created here with exactly the attributes
    the generated C declares, so BCC reuses the pins."""
    pins.counters.parent.mkdir(parents=True, exist_ok=True)
    for path, args in (
        (pins.counters, (MAP_TYPE_PERCPU_ARRAY, 4, 8 * COUNTER_FIELDS, COUNTER_IDS)),
        (pins.slots, (MAP_TYPE_ARRAY, 4, 4, CHAIN_SLOTS)),
        (pins.ids, (MAP_TYPE_HASH, _KEY.size, 4, COUNTER_IDS)),
    ):
        name = "nfctl_" + path.name.replace("-", "")[:9]
        syscall.ensure_pinned_map(str(path), *args, name=name)


@dataclass(frozen=True)
class CounterKey:
    nf: str
    ifindex: int
    hook: Hook


@dataclass
class VerdictCounts:
    """Packets an NF returned each verdict for, per mode (what it did or would have done)."""

    enforce: dict[str, int]
    monitor: dict[str, int]
    errors: int = 0

    @property
    def packets(self) -> int:
        return sum(self.enforce.values()) + sum(self.monitor.values())

    def add(self, other: VerdictCounts) -> VerdictCounts:
        return VerdictCounts(
            {v: self.enforce[v] + other.enforce[v] for v in VERDICTS},
            {v: self.monitor[v] + other.monitor[v] for v in VERDICTS},
            self.errors + other.errors,
        )

    @classmethod
    def zero(cls) -> VerdictCounts:
        return cls(dict.fromkeys(VERDICTS, 0), dict.fromkeys(VERDICTS, 0))

    def by_mode(self) -> dict[str, dict[str, int]]:
        return {"enforce": self.enforce, "monitor": self.monitor}


def decode(raw: bytes, cpus: int) -> VerdictCounts:
    """Sum the per-CPU copies of one counter entry."""
    totals = [0] * COUNTER_FIELDS
    stride = 8 * COUNTER_FIELDS
    for cpu in range(cpus):
        values = struct.unpack_from(f"<{COUNTER_FIELDS}Q", raw, cpu * stride)
        totals = [a + b for a, b in zip(totals, values, strict=True)]
    per_mode = len(VERDICTS)
    return VerdictCounts(
        {v: totals[MODES["enforce"] * per_mode + i] for i, v in enumerate(VERDICTS)},
        {v: totals[MODES["monitor"] * per_mode + i] for i, v in enumerate(VERDICTS)},
        totals[ERRORS_FIELD],
    )


def read_pinned(pins: CounterPins) -> dict[CounterKey, VerdictCounts]:
    """The counters of one hook type, read through fresh fds (safe from any thread); empty
    when nothing was ever chained there."""
    if not (pins.counters.exists() and pins.ids.exists()):
        return {}
    table = CounterTable(pins, create=False)
    try:
        return table.read()
    finally:
        table.close()


class CounterTable:
    """The counter maps of one hook type, as the agent sees them."""

    def __init__(self, pins: CounterPins, create: bool = True) -> None:
        if create:
            ensure_maps(pins)
        self.counters = BpfMap.from_pin(str(pins.counters))
        self.slots = BpfMap.from_pin(str(pins.slots))
        self.ids = BpfMap.from_pin(str(pins.ids))

    def close(self) -> None:
        for bmap in (self.counters, self.slots, self.ids):
            bmap.close()

    @staticmethod
    def _key(key: CounterKey) -> bytes:
        name = key.nf.encode()
        if len(name) >= NAME_BYTES:
            raise CounterError(f"NF name {key.nf!r} is too long for a counter key")
        return _KEY.pack(name, key.ifindex, HOOK_IDS[key.hook])

    def assigned(self) -> dict[CounterKey, int]:
        out = {}
        hooks = {i: h for h, i in HOOK_IDS.items()}
        for raw, value in self.ids.items():
            name, ifindex, hook_id = _KEY.unpack(raw)
            if hook_id in hooks:
                key = CounterKey(name.rstrip(b"\0").decode(), ifindex, hooks[hook_id])
                out[key] = struct.unpack("<I", value[:4])[0]
        return out

    def counter_id(self, key: CounterKey) -> int:
        """The id of key's counters, assigned (from zero) on first use. Id 0 means 'no NF'."""
        raw = self.ids.lookup(self._key(key))
        if raw is not None:
            return int(struct.unpack("<I", raw[:4])[0])
        used = set(self.assigned().values())
        free = next((i for i in range(1, COUNTER_IDS) if i not in used), None)
        if free is None:
            raise CounterError(f"all {COUNTER_IDS - 1} counter ids are in use")
        zero = bytes(self.counters.value_buffer_size)
        self.counters.update(struct.pack("<I", free), zero)
        self.ids.update(self._key(key), struct.pack("<I", free))
        return free

    def release(self, match: Callable[[CounterKey], bool]) -> None:
        for key in [k for k in self.assigned() if match(k)]:
            with contextlib.suppress(OSError):
                self.ids.delete(self._key(key))

    def label_slots(self, base: int, ids: list[int]) -> None:
        """Before a range becomes live: its NFs' counter ids, then 0 (the chain's end; slots
        beyond it are never reached)."""
        for offset, cid in enumerate([*ids, 0]):
            self.slots.update(struct.pack("<I", base + offset), struct.pack("<I", cid))

    def read(self) -> dict[CounterKey, VerdictCounts]:
        cpus = syscall.possible_cpus()
        out = {}
        for key, cid in self.assigned().items():
            raw = self.counters.lookup(struct.pack("<I", cid))
            if raw is not None:
                out[key] = decode(raw, cpus)
        return out
