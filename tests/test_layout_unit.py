"""Typed map keys and values from BCC type descriptions: encode/decode, byte order."""

from __future__ import annotations

import pytest

from nfctl.bpf.codec import CodecError, TypeCodec, declared_types, network_order_fields
from nfctl.datapath.entries import convert_value

KEY4 = [
    "key4",
    [["addr", "unsigned int"], ["port", "unsigned short"], ["mac", "unsigned char", [6]]],
    "struct_packed",
]
LPM = ["lpm", [["prefixlen", "unsigned int"], ["addr", "unsigned int"]], "struct"]
V6 = ["v6", [["addr", "unsigned char", [16]]], "struct"]
NESTED = [
    "outer",
    [
        ["inner", ["in", [["a", "unsigned char"], ["b", "unsigned long long"]], "struct"]],
        ["n", "int"],
    ],
    "struct",
]


def test_scalars_ranges_and_host_order() -> None:
    u32 = TypeCodec("unsigned int")
    assert u32.encode(1) == b"\x01\x00\x00\x00"
    assert u32.encode("0x10") == b"\x10\x00\x00\x00"
    assert u32.decode(u32.encode(4_000_000_000)) == 4_000_000_000
    with pytest.raises(CodecError, match="does not fit"):
        TypeCodec("unsigned char").encode(300)
    assert TypeCodec("int").decode(TypeCodec("int").encode(-5)) == -5
    with pytest.raises(CodecError, match="expected an integer"):
        u32.encode("ten")


def test_addresses_are_network_order_and_big_endian_fields_marked() -> None:
    codec = TypeCodec(KEY4, frozenset({"addr", "port"}))
    raw = codec.encode({"addr": "192.0.2.1", "port": 443, "mac": "02:00:5e:00:53:01"})
    assert raw[:4] == bytes([192, 0, 2, 1]) and raw[4:6] == (443).to_bytes(2, "big")
    assert raw[6:] == bytes.fromhex("02005e005301") and len(raw) == 12
    assert codec.decode(raw) == {"addr": "192.0.2.1", "port": 443, "mac": "02:00:5e:00:53:01"}
    whole = TypeCodec("unsigned int", frozenset({""}))
    assert whole.encode("203.0.113.7") == bytes([203, 0, 113, 7])
    assert whole.decode(whole.encode("203.0.113.7")) == "203.0.113.7"


def test_ipv6_cidr_nested_unknown_fields_and_sizes() -> None:
    assert TypeCodec(V6).decode(TypeCodec(V6).encode({"addr": "2001:db8::1"})) == {
        "addr": "2001:db8::1"
    }
    with pytest.raises(CodecError, match="IPv6 address needs 16 bytes"):
        TypeCodec("unsigned int").encode("2001:db8::1")
    lpm = TypeCodec(LPM, frozenset({"addr"}))
    assert lpm.decode(lpm.encode("10.1.2.0/24")) == {"prefixlen": 24, "addr": "10.1.2.0"}
    nested = TypeCodec(NESTED)
    assert nested.size == 24  # alignment follows the C ABI
    assert nested.decode(nested.encode({"inner": {"b": 7}, "n": -1})) == {
        "inner": {"a": 0, "b": 7},
        "n": -1,
    }
    with pytest.raises(CodecError, match="unknown field"):
        nested.encode({"inner": {"c": 1}})


def test_source_hints_for_byte_order() -> None:
    source = (
        "struct key4 { __be32 addr; __be16 port; u8 mac[6]; };\n"
        "BPF_HASH(blocked, __be32, u8, 16);\n"
    )
    assert network_order_fields(source, KEY4) == {"addr", "port"}
    assert declared_types(source)["blocked"] == ("__be32", "u8")
    assert network_order_fields(source, "unsigned int", "__be32") == {""}


def test_migration_projects_fields_by_name() -> None:
    old = TypeCodec(["s", [["packets", "unsigned long long"]], "struct"])
    new = TypeCodec(
        ["s", [["packets", "unsigned long long"], ["bytes", "unsigned long long"]], "struct"]
    )
    raw = convert_value(old, new, old.encode({"packets": 42}))
    assert new.decode(raw) == {"packets": 42, "bytes": 0}
    assert old.decode(convert_value(new, old, raw)) == {"packets": 42}
