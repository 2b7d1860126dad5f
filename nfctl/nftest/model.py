"""The `NetworkFunctionTests` schema of tests.yaml (see docs/nf-tests.md)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nfctl.manifest.model import C_IDENT_RE, NF_NAME_RE, MapEntry

TESTS_KIND = "NetworkFunctionTests"
TESTS_NAMES = ("tests.yaml", "tests.yml")
MAX_REPEAT = 100_000
MAX_PAYLOAD = 9000

VERDICTS = ("pass", "drop", "tx", "redirect", "aborted")

# Fields a test may set on the packet and check after the run, per layer.
PACKET_FIELDS: dict[str, tuple[str, ...]] = {
    "eth": ("src", "dst", "type"),
    "ipv4": ("src", "dst", "tos", "dscp", "ecn", "ttl", "proto", "id", "chksumValid"),
    "ipv6": ("src", "dst", "tc", "dscp", "ecn", "hlim", "nh", "fl"),
    "tcp": ("sport", "dport", "flags", "seq", "ack", "window"),
    "udp": ("sport", "dport"),
    "icmp": ("type", "code", "id", "seq"),
    "frame": ("len",),
}
_HEX_RE = re.compile(r"^([0-9A-Fa-f]{2}[\s:]?)*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, populate_by_name=True)


class Eth(_Strict):
    src: str = "02:00:00:00:00:01"
    dst: str = "02:00:00:00:00:02"


class IPv4(_Strict):
    src: str = "192.0.2.10"
    dst: str = "198.51.100.1"
    tos: int | None = Field(default=None, ge=0, le=255)
    dscp: int | None = Field(default=None, ge=0, le=63)
    ecn: int | None = Field(default=None, ge=0, le=3)
    ttl: int = Field(default=64, ge=0, le=255)
    id: int = Field(default=1, ge=0, le=65535)
    proto: int | None = Field(default=None, ge=0, le=255)

    @model_validator(mode="after")
    def _tos_or_dscp(self) -> IPv4:
        if self.tos is not None and (self.dscp is not None or self.ecn is not None):
            raise ValueError("set either tos or dscp/ecn, not both")
        return self


class IPv6(_Strict):
    src: str = "2001:db8::10"
    dst: str = "2001:db8::1"
    tc: int | None = Field(default=None, ge=0, le=255)
    dscp: int | None = Field(default=None, ge=0, le=63)
    ecn: int | None = Field(default=None, ge=0, le=3)
    hlim: int = Field(default=64, ge=0, le=255)
    fl: int = Field(default=0, ge=0, le=0xFFFFF)
    nh: int | None = Field(default=None, ge=0, le=255)

    @model_validator(mode="after")
    def _tc_or_dscp(self) -> IPv6:
        if self.tc is not None and (self.dscp is not None or self.ecn is not None):
            raise ValueError("set either tc or dscp/ecn, not both")
        return self


class Tcp(_Strict):
    sport: int = Field(default=40000, ge=0, le=65535)
    dport: int = Field(default=80, ge=0, le=65535)
    flags: str = Field(default="S", pattern=r"^[FSRPAUEC]*$")
    seq: int = Field(default=0, ge=0, le=0xFFFFFFFF)
    ack: int = Field(default=0, ge=0, le=0xFFFFFFFF)
    window: int = Field(default=8192, ge=0, le=65535)


class Udp(_Strict):
    sport: int = Field(default=40000, ge=0, le=65535)
    dport: int = Field(default=53, ge=0, le=65535)


class Icmp(_Strict):
    type: int = Field(default=8, ge=0, le=255)
    code: int = Field(default=0, ge=0, le=255)
    id: int = Field(default=1, ge=0, le=65535)
    seq: int = Field(default=1, ge=0, le=65535)


class Packet(_Strict):
    """A packet from readable fields, or raw bytes (hex), or one packet of a pcap file."""

    eth: Eth | None = None
    ipv4: IPv4 | None = None
    ipv6: IPv6 | None = None
    tcp: Tcp | None = None
    udp: Udp | None = None
    icmp: Icmp | None = None
    payload: int = Field(default=0, ge=0, le=MAX_PAYLOAD, description="payload size in bytes")
    hex: str | None = Field(default=None, max_length=4 * MAX_PAYLOAD)
    pcap: str | None = None
    index: int = Field(default=0, ge=0, description="which packet of the pcap file")

    @field_validator("hex")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not _HEX_RE.match(v.strip()):
            raise ValueError("hex must be pairs of hex digits (spaces or ':' allowed)")
        return v

    @model_validator(mode="after")
    def _one_form(self) -> Packet:
        layered = any(
            x is not None for x in (self.eth, self.ipv4, self.ipv6, self.tcp, self.udp, self.icmp)
        )
        forms = sum([layered or self.payload > 0, self.hex is not None, self.pcap is not None])
        if forms > 1:
            raise ValueError("describe the packet one way: fields, hex or pcap")
        if forms == 0:
            raise ValueError("empty packet: give fields (e.g. ipv4, udp), hex or pcap")
        if self.ipv4 is not None and self.ipv6 is not None:
            raise ValueError("a packet has ipv4 or ipv6, not both")
        if sum(x is not None for x in (self.tcp, self.udp, self.icmp)) > 1:
            raise ValueError("a packet has at most one of tcp, udp, icmp")
        if (self.tcp or self.udp or self.icmp) and not (self.ipv4 or self.ipv6):
            raise ValueError("tcp/udp/icmp need an ipv4 or ipv6 layer")
        return self


class MapCheck(_Strict):
    """One expectation on a map entry after the run."""

    key: Any
    value: Any | None = None
    present: bool | None = None
    increase: Any | None = None  # int, or {field: int} for struct values

    @model_validator(mode="after")
    def _one_check(self) -> MapCheck:
        kinds = [self.value is not None, self.present is not None, self.increase is not None]
        if sum(kinds) != 1:
            raise ValueError("give exactly one of value, present, increase")
        return self


class Expect(_Strict):
    verdict: str | int | None = None  # a name of VERDICTS, or the raw return value
    packet: dict[str, Any] = Field(default_factory=dict)
    maps: dict[str, list[MapCheck]] = Field(default_factory=dict)

    @field_validator("verdict")
    @classmethod
    def _verdict(cls, v: str | int | None) -> str | int | None:
        if isinstance(v, str) and v not in VERDICTS:
            names = ", ".join(VERDICTS)
            raise ValueError(f"unknown verdict {v!r}: use {names}, or the return value")
        return v

    @field_validator("packet")
    @classmethod
    def _fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            layer, _, attr = name.partition(".")
            if attr not in PACKET_FIELDS.get(layer, ()):
                known = ", ".join(f"{lay}.{f}" for lay, fs in PACKET_FIELDS.items() for f in fs)
                raise ValueError(f"unknown packet field {name!r} (known: {known})")
        return v

    @model_validator(mode="after")
    def _something(self) -> Expect:
        if self.verdict is None and not self.packet and not self.maps:
            raise ValueError("expect nothing? give verdict, packet or maps")
        return self


class Step(_Strict):
    packet: Packet
    repeat: int = Field(default=1, ge=1, le=MAX_REPEAT)
    expect: Expect


class Case(_Strict):
    name: str = Field(min_length=1, max_length=200)
    chain: list[str] = Field(default_factory=list, max_length=32)
    maps: dict[str, list[MapEntry]] = Field(default_factory=dict)
    packet: Packet | None = None
    repeat: int = Field(default=1, ge=1, le=MAX_REPEAT)
    expect: Expect | None = None
    sequence: list[Step] = Field(default_factory=list, max_length=1000)

    @field_validator("chain")
    @classmethod
    def _chain(cls, v: list[str]) -> list[str]:
        for name in v:
            if not NF_NAME_RE.match(name):
                raise ValueError(f"invalid NF name {name!r} in chain")
        return v

    @field_validator("maps")
    @classmethod
    def _map_names(cls, v: dict[str, list[MapEntry]]) -> dict[str, list[MapEntry]]:
        for name in v:
            _check_map_ref(name)
        return v

    @model_validator(mode="after")
    def _shape(self) -> Case:
        single = self.packet is not None or self.expect is not None
        if single and self.sequence:
            raise ValueError("give packet + expect, or sequence, not both")
        if not self.sequence and (self.packet is None or self.expect is None):
            raise ValueError("a case needs packet and expect (or a sequence of steps)")
        return self

    def steps(self) -> list[Step]:
        if self.sequence:
            return self.sequence
        assert self.packet is not None and self.expect is not None
        return [Step(packet=self.packet, repeat=self.repeat, expect=self.expect)]


def _check_map_ref(name: str) -> None:
    """`map` names a map of the NF under test; `nf/map` one of another NF in a chain."""
    nf, _, map_name = name.rpartition("/")
    if (nf and not NF_NAME_RE.match(nf)) or not C_IDENT_RE.match(map_name):
        raise ValueError(f"invalid map name {name!r} (use map or nf/map)")


class TestsFile(_Strict):
    api_version: Literal["nfctl.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["NetworkFunctionTests"]
    cases: list[Case] = Field(min_length=1, max_length=10_000)

    @model_validator(mode="after")
    def _map_refs(self) -> TestsFile:
        for case in self.cases:
            for step in case.steps():
                for name in step.expect.maps:
                    _check_map_ref(name)
        return self

    def duplicate_names(self) -> list[int]:
        """Indexes of cases whose name an earlier case already has."""
        seen: set[str] = set()
        found = []
        for index, case in enumerate(self.cases):
            if case.name in seen:
                found.append(index)
            seen.add(case.name)
        return found
