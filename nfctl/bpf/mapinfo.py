"""A map as a program's C source declares it, and the codecs of its key and value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nfctl.bpf.codec import TypeCodec, declared_types, network_order_fields


@dataclass
class MapInfo:
    """One map as the C source declares it (and where it is pinned)."""

    name: str
    map_type: str  # BCC's table type name: hash, array, lru_hash, percpu_array, ...
    type_id: int  # kernel BPF_MAP_TYPE_*
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    key_desc: Any  # BCC's JSON type description
    value_desc: Any
    pin_path: str | None = None
    created: bool = False  # this build created the map (no earlier pin existed)


def map_codecs(info: MapInfo, source: str) -> tuple[TypeCodec, TypeCodec]:
    """Key and value codecs of a declared map; fields the source declares __be* are
    network order."""
    key_type, value_type = declared_types(source).get(info.name, (None, None))
    return (
        TypeCodec(info.key_desc, network_order_fields(source, info.key_desc, key_type)),
        TypeCodec(info.value_desc, network_order_fields(source, info.value_desc, value_type)),
    )
