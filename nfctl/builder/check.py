"""The check after compiling, before a version goes live: the manifest's maps and managed
entries against the map types the compiler reported. Used by `nfctl validate` and by the
agent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nfctl.bpf.codec import CodecError, TypeCodec
from nfctl.bpf.mapinfo import MapInfo
from nfctl.compiler.client import PreparedNF
from nfctl.diagnostics import Diagnostic

MANAGEABLE_MAP_TYPES = frozenset(
    {"hash", "array", "lru_hash", "lpm_trie", "percpu_hash", "percpu_array", "lru_percpu_hash"}
)


CodecsOf = Callable[[MapInfo], tuple[TypeCodec, TypeCodec]]


def check_entries(
    prepared: PreparedNF, maps: list[MapInfo], codecs_of: CodecsOf
) -> list[Diagnostic]:
    """Every map the manifest names exists; every managed entry encodes into the map's C key
    and value types, once per key, within array bounds; exported fields exist. Used by
    `nfctl validate` and by the agent before a new version goes live."""
    manifest, nf, source_rel = prepared.manifest, prepared.nf, prepared.source_name
    problems: list[Diagnostic] = []
    declared = {m.name: m for m in maps}
    for map_name, spec in nf.spec.maps.items():
        field_base = f"spec.maps.{map_name}"
        info = declared.get(map_name)
        if info is None:
            problems.append(
                manifest.diagnostic(
                    field_base,
                    (
                        f"map {map_name!r} is not declared in {source_rel}"
                        f" (declared: {', '.join(sorted(declared)) or 'none'})"
                    ),
                )
            )
            continue
        if spec.managed and info.map_type not in MANAGEABLE_MAP_TYPES:
            problems.append(
                manifest.diagnostic(field_base, f"a {info.map_type} map cannot be managed from Git")
            )
            continue
        key_codec, value_codec = codecs_of(info)
        seen_keys: dict[bytes, int] = {}
        for index, entry in enumerate(spec.entries):
            for part, codec, value in (
                ("key", key_codec, entry.key),
                ("value", value_codec, entry.value),
            ):
                field_path = f"{field_base}.entries.{index}.{part}"
                try:
                    encoded = codec.encode(value)
                except CodecError as exc:
                    problems.append(manifest.diagnostic(field_path, str(exc)))
                    continue
                if part == "key":
                    if encoded in seen_keys:
                        problems.append(
                            manifest.diagnostic(
                                field_path, f"duplicate key (same as entry {seen_keys[encoded]})"
                            )
                        )
                    seen_keys[encoded] = index
                    if info.map_type in ("array", "percpu_array"):
                        index_value = int.from_bytes(encoded[:4], "little")
                        if index_value >= info.max_entries:
                            problems.append(
                                manifest.diagnostic(
                                    field_path,
                                    (
                                        f"array index {index_value} is out of range "
                                        f"(max_entries {info.max_entries})"
                                    ),
                                )
                            )
        if len(spec.entries) > info.max_entries:
            problems.append(
                manifest.diagnostic(
                    f"{field_base}.entries",
                    f"{len(spec.entries)} entries exceed max_entries {info.max_entries}",
                )
            )
        for export_index, export in enumerate(spec.export):
            if export.field and not _has_field(info.value_desc, export.field):
                export_path = f"{field_base}.export.{export_index}.field"
                problems.append(
                    manifest.diagnostic(export_path, f"value type has no field {export.field!r}")
                )
    return problems


def _has_field(desc: Any, name: str) -> bool:
    if isinstance(desc, str):
        return False
    return any(f[0] == name for f in desc[1])
