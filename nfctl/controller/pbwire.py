"""Protobuf wire encoding by hand, for answers assembled from bytes serialized beforehand
(a node's cached status): no message objects are built for them."""

from __future__ import annotations

from collections.abc import Iterable


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def repeated_field(number: int, items: Iterable[bytes]) -> bytes:
    """Serialized messages as a repeated message field `number` (wire type 2)."""
    tag = varint(number << 3 | 2)
    return b"".join(tag + varint(len(item)) + item for item in items)
