"""Typed map keys and values: YAML values <-> bytes, from BCC's type descriptions.

BCC describes a map's key and value types as JSON (a C type name, or
[name, fields, "struct"|"struct_packed"|"union"]). This module rebuilds them with
ctypes (same alignment rules as the compiler) and converts plain YAML values:
integers, booleans, IPv4/IPv6 addresses, CIDRs (LPM keys), MACs, strings, lists and
mappings for structs. Byte order: address strings are written in network order (as
on the wire); integers are host order unless the C field is declared __be16/32/64.
"""

from __future__ import annotations

import ctypes
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Literal

_BASIC: dict[str, Any] = {
    "_Bool": ctypes.c_bool,
    "char": ctypes.c_char,
    "signed char": ctypes.c_byte,
    "unsigned char": ctypes.c_ubyte,
    "short": ctypes.c_short,
    "unsigned short": ctypes.c_ushort,
    "int": ctypes.c_int,
    "unsigned int": ctypes.c_uint,
    "long": ctypes.c_long,
    "unsigned long": ctypes.c_ulong,
    "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong,
    "__int128": ctypes.c_uint8 * 16,
    "unsigned __int128": ctypes.c_uint8 * 16,
}
_SIGNED = {"char", "signed char", "short", "int", "long", "long long"}
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}\Z")


class CodecError(ValueError):
    """A YAML value that does not fit the C type; message names the field path."""


@dataclass(frozen=True)
class TypeCodec:
    """A map key or value type and which of its fields hold network-order integers."""

    desc: Any
    network_order: frozenset[str] = frozenset()  # field paths; "" is the whole type

    @property
    def ctype(self) -> Any:
        return ctype_from_desc(self.desc)

    @property
    def size(self) -> int:
        return ctypes.sizeof(self.ctype)

    def encode(self, value: Any) -> bytes:
        buf = (ctypes.c_uint8 * self.size)()
        _write(self.desc, value, buf, 0, "", self.network_order)
        return bytes(buf)

    def decode(self, raw: bytes) -> Any:
        return _read(self.desc, raw, 0, "", self.network_order)


# Address structs a YAML value may give as a plain address string.
ADDRESS_STRUCTS = frozenset({"in6_addr", "in_addr"})


def ctype_from_desc(desc: Any) -> Any:
    if isinstance(desc, str):
        try:
            return _BASIC[desc]
        except KeyError:
            raise CodecError(f"unsupported C type {desc!r}") from None
    if (
        isinstance(desc, list)
        and len(desc) == 2
        and isinstance(desc[0], str)
        and (isinstance(desc[1], list) and desc[1] and isinstance(desc[1][0], int))
    ):
        return ctype_from_desc(desc[0]) * desc[1][0]  # top-level array: ["type", [n]]
    fields: list[tuple[Any, ...]] = []
    anonymous: list[str] = []
    for field in desc[1]:
        fname, ftype = field[0], field[1]
        if len(field) == 3 and isinstance(field[2], list):
            fields.append((fname, ctype_from_desc(ftype) * field[2][0]))
        elif len(field) == 3 and isinstance(field[2], int):
            fields.append((fname, ctype_from_desc(ftype), field[2]))
        elif len(field) == 3 and field[2] in ("struct", "struct_packed", "union"):
            if fname == "":
                fname = f"__anon{len(anonymous)}"
                anonymous.append(fname)
            fields.append((fname, ctype_from_desc(field)))
        else:
            fields.append((fname, ctype_from_desc(ftype)))
    kind = desc[2] if len(desc) > 2 else "struct"
    base = ctypes.Union if kind == "union" else ctypes.Structure
    attrs: dict[str, Any] = {"_fields_": fields, "_anonymous_": anonymous}
    if kind == "struct_packed":
        attrs["_pack_"] = 1
    return type(str(desc[0]) or "anon", (base,), attrs)


def _members(desc: Any) -> list[tuple[str, Any, int | None, int | None]]:
    """(name, element desc, array length or None, bitfield width or None) per field."""
    out: list[tuple[str, Any, int | None, int | None]] = []
    anon = 0
    for field in desc[1]:
        fname, ftype = field[0], field[1]
        if len(field) == 3 and isinstance(field[2], list):
            out.append((fname, ftype, field[2][0], None))
        elif len(field) == 3 and isinstance(field[2], int):
            out.append((fname, ftype, None, field[2]))
        elif len(field) == 3 and field[2] in ("struct", "struct_packed", "union"):
            if fname == "":
                fname = f"__anon{anon}"
                anon += 1
            out.append((fname, field, None, None))
        else:
            out.append((fname, ftype, None, None))
    return out


def _is_array_desc(desc: Any) -> bool:
    return (
        isinstance(desc, list)
        and len(desc) == 2
        and isinstance(desc[0], str)
        and isinstance(desc[1], list)
        and bool(desc[1])
        and isinstance(desc[1][0], int)
    )


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _where(path: str) -> str:
    return f"at {path!r}" if path else "for the whole value"


def _write(desc: Any, value: Any, buf: Any, offset: int, path: str, be: frozenset[str]) -> None:
    if _is_array_desc(desc):
        _write_array(desc[0], desc[1][0], value, buf, offset, path, be)
        return
    if isinstance(desc, str):
        _write_scalar(desc, value, buf, offset, path, path in be)
        return
    ctype = ctype_from_desc(desc)
    members = _members(desc)
    if isinstance(value, str) and "/" in value and members and members[0][0] == "prefixlen":
        value = _cidr_to_fields(value, members, path)
    if isinstance(value, str) and desc[0] in ADDRESS_STRUCTS:
        # struct in6_addr / in_addr hold the address bytes in network order, as packed
        packed = _address_bytes(value, ctypes.sizeof(ctype), path)
        if packed is None:
            raise CodecError(f"{_where(path)}: {value!r} is not an IP address")
        buf[offset : offset + len(packed)] = list(packed)
        return
    if not isinstance(value, dict):
        raise CodecError(
            f"{_where(path)}: expected a mapping with fields "
            f"{', '.join(m[0] for m in members)}, got {value!r}"
        )
    known = {m[0] for m in members}
    unknown = sorted(set(value) - known)
    if unknown:
        raise CodecError(
            f"{_where(path)}: unknown field(s) {', '.join(unknown)}; "
            f"the C type has {', '.join(sorted(known))}"
        )
    is_union = len(desc) > 2 and desc[2] == "union"
    if is_union and len(value) > 1:
        raise CodecError(f"{_where(path)}: a union takes exactly one field")
    for name, fdesc, count, bits in members:
        if name not in value:
            continue
        field_offset = offset + getattr(ctype, name).offset
        fpath = _join(path, name)
        if bits is not None:
            _write_bitfield(ctype, name, fdesc, bits, value[name], buf, offset, fpath)
        elif count is not None:
            _write_array(fdesc, count, value[name], buf, field_offset, fpath, be)
        else:
            _write(fdesc, value[name], buf, field_offset, fpath, be)


def _cidr_to_fields(text: str, members: list[Any], path: str) -> dict[str, Any]:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise CodecError(f"{_where(path)}: {exc}") from None
    if len(members) < 2:
        raise CodecError(f"{_where(path)}: a CIDR needs a struct {{prefixlen; address}}")
    return {"prefixlen": net.prefixlen, members[1][0]: str(net.network_address)}


def _address_bytes(value: str, size: int, path: str) -> bytes | None:
    if _MAC_RE.match(value):
        if size != 6:
            raise CodecError(f"{_where(path)}: a MAC address needs 6 bytes, the field has {size}")
        return bytes(int(x, 16) for x in re.split("[:-]", value))
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    packed = addr.packed
    if len(packed) != size:
        kind = "IPv4" if addr.version == 4 else "IPv6"
        raise CodecError(
            f"{_where(path)}: an {kind} address needs {len(packed)} bytes, the field has {size}"
        )
    return packed


def _write_array(
    elem: Any, count: int, value: Any, buf: Any, offset: int, path: str, be: frozenset[str]
) -> None:
    esize = ctypes.sizeof(ctype_from_desc(elem))
    total = esize * count
    if isinstance(value, str):
        packed = _address_bytes(value, total, path)
        if packed is None:
            if elem in ("char", "unsigned char", "signed char"):
                data = value.encode()
                if len(data) > total:
                    raise CodecError(
                        f"{_where(path)}: string of {len(data)} bytes exceeds {total} bytes"
                    )
                packed = data.ljust(total, b"\0")
            else:
                raise CodecError(f"{_where(path)}: cannot store {value!r} in {elem}[{count}]")
        buf[offset : offset + total] = list(packed)
        return
    if not isinstance(value, list):
        raise CodecError(f"{_where(path)}: expected a list of {count} items or an address")
    if len(value) > count:
        raise CodecError(f"{_where(path)}: {len(value)} items, the array holds {count}")
    for index, item in enumerate(value):
        _write(elem, item, buf, offset + index * esize, f"{path}[{index}]", be)


def _int_value(value: Any, path: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise CodecError(f"{_where(path)}: expected an integer, got {value!r}")


def _write_scalar(
    ctype_name: str, value: Any, buf: Any, offset: int, path: str, network: bool
) -> None:
    size = ctypes.sizeof(_BASIC[ctype_name])
    if isinstance(value, str):
        packed = _address_bytes(value, size, path)
        if packed is not None:
            buf[offset : offset + size] = list(packed)
            return
    number = _int_value(value, path)
    signed = ctype_name in _SIGNED
    lo, hi = (
        (-(1 << (size * 8 - 1)), (1 << (size * 8 - 1)) - 1) if signed else (0, (1 << size * 8) - 1)
    )
    if not lo <= number <= hi:
        raise CodecError(
            f"{_where(path)}: {number} does not fit in {ctype_name} ({size} bytes, {lo}..{hi})"
        )
    order: Literal["big", "little"] = "big" if network else "little"
    buf[offset : offset + size] = list(number.to_bytes(size, order, signed=signed))


def _write_bitfield(
    ctype: Any, name: str, fdesc: Any, bits: int, value: Any, buf: Any, offset: int, path: str
) -> None:
    number = _int_value(value, path)
    if not 0 <= number < (1 << bits):
        raise CodecError(f"{_where(path)}: {number} does not fit in {bits} bits")
    size = ctypes.sizeof(ctype)
    inst = ctype.from_buffer_copy(bytes(buf[offset : offset + size]))
    setattr(inst, name, number)
    buf[offset : offset + size] = list(bytes(inst))


def _read(desc: Any, raw: bytes, offset: int, path: str, be: frozenset[str]) -> Any:
    if _is_array_desc(desc):
        return _read_array(desc[0], desc[1][0], raw, offset, path, be)
    if isinstance(desc, str):
        size = ctypes.sizeof(_BASIC[desc])
        chunk = raw[offset : offset + size]
        if size == 16:
            return str(ipaddress.IPv6Address(chunk))
        if desc == "_Bool":
            return bool(chunk[0])
        if size == 4 and path in be and _looks_like_address(path):
            return str(ipaddress.IPv4Address(chunk))
        order: Literal["big", "little"] = "big" if path in be else "little"
        return int.from_bytes(chunk, order, signed=desc in _SIGNED)
    ctype = ctype_from_desc(desc)
    if desc[0] == "in6_addr":
        return str(ipaddress.IPv6Address(raw[offset : offset + 16]))
    if desc[0] == "in_addr":
        return str(ipaddress.IPv4Address(raw[offset : offset + 4]))
    out: dict[str, Any] = {}
    for name, fdesc, count, bits in _members(desc):
        foffset = offset + getattr(ctype, name).offset
        fpath = _join(path, name)
        if bits is not None:
            inst = ctype.from_buffer_copy(raw[offset : offset + ctypes.sizeof(ctype)])
            out[name] = int(getattr(inst, name))
        elif count is not None:
            out[name] = _read_array(fdesc, count, raw, foffset, fpath, be)
        else:
            out[name] = _read(fdesc, raw, foffset, fpath, be)
    return out


def _read_array(
    elem: Any, count: int, raw: bytes, offset: int, path: str, be: frozenset[str]
) -> Any:
    esize = ctypes.sizeof(ctype_from_desc(elem))
    chunk = raw[offset : offset + esize * count]
    if elem in ("char", "unsigned char") and count == 6:
        return ":".join(f"{b:02x}" for b in chunk)
    if elem == "unsigned char" and count == 16:
        return str(ipaddress.IPv6Address(chunk))
    if elem == "unsigned char" and count == 4:
        return str(ipaddress.IPv4Address(chunk))
    if elem == "char":
        return chunk.split(b"\0", 1)[0].decode(errors="replace")
    return [_read(elem, raw, offset + i * esize, f"{path}[{i}]", be) for i in range(count)]


_ADDRESS_NAME_RE = re.compile(r"(^|[._])(s|d)?(addr|ip|ipv4|ip4|src|dst|saddr|daddr|address)\d*$")


def _looks_like_address(path: str) -> bool:
    """A network-order 32-bit value reads back as a dotted IPv4 address when it is the whole
    key/value or its field is named like one (addr, saddr, ip, src, ...)."""
    return path == "" or _ADDRESS_NAME_RE.search(path) is not None


def render_key(value: Any) -> str:
    """A short, stable text form of a decoded key (for metric labels and status)."""
    if isinstance(value, dict):
        return ",".join(f"{k}={render_key(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ",".join(render_key(v) for v in value) + "]"
    return str(value)


_STRUCT_RE = re.compile(r"\bstruct\s+(\w+)\s*\{([^{}]*)\}", re.S)
_BE_FIELD_RE = re.compile(r"\b__be(?:16|32|64)\s+(\w+)\s*(?:\[[^\]]*\])?\s*[;,:]")


def network_order_fields(
    source: str, desc: Any, declared_type: str | None = None
) -> frozenset[str]:
    """Field paths of desc declared __be16/__be32/__be64 in the C source.

    declared_type is the type written in the map declaration (e.g. '__be32'), which BCC's
    description loses when it resolves typedefs."""
    if declared_type and re.fullmatch(r"__be(16|32|64)", declared_type.strip()):
        return frozenset({""})
    structs = {m.group(1): m.group(2) for m in _STRUCT_RE.finditer(source)}
    found: set[str] = set()

    def walk(d: Any, prefix: str) -> None:
        if isinstance(d, str) or _is_array_desc(d):
            return
        body = structs.get(str(d[0]), "")
        be_names = set(_BE_FIELD_RE.findall(body))
        for name, fdesc, _count, _bits in _members(d):
            path = _join(prefix, name)
            if name in be_names:
                found.add(path)
            if isinstance(fdesc, list) and not _is_array_desc(fdesc):
                walk(fdesc, path)

    walk(desc, "")
    return frozenset(found)


_DECL_START_RE = re.compile(r"\b(BPF_[A-Z_]+)\s*\(")
# macro -> (index of name, index of key type or None, index of value type or None)
_DECL_ARGS: dict[str, tuple[int, int | None, int | None]] = {
    "BPF_HASH": (0, 1, 2),
    "BPF_LRU_HASH": (0, 1, 2),
    "BPF_PERCPU_HASH": (0, 1, 2),
    "BPF_LPM_TRIE": (0, 1, 2),
    "BPF_ARRAY": (0, None, 1),
    "BPF_PERCPU_ARRAY": (0, None, 1),
    "BPF_TABLE": (3, 1, 2),
    "BPF_F_TABLE": (3, 1, 2),
}


def _split_args(text: str, start: int) -> list[str]:
    args: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text[start:]:
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                args.append("".join(current).strip())
                return args
            depth -= 1
        elif ch == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    return args


def declared_types(source: str) -> dict[str, tuple[str | None, str | None]]:
    """map name -> (key type, value type) as written in BPF_* declarations."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for match in _DECL_START_RE.finditer(source):
        spec = _DECL_ARGS.get(match.group(1))
        if spec is None:
            continue
        args = _split_args(source, match.end())
        name_i, key_i, value_i = spec
        if len(args) <= name_i:
            continue
        key = args[key_i] if key_i is not None and key_i < len(args) else None
        value = args[value_i] if value_i is not None and value_i < len(args) else None
        out[args[name_i]] = (key, value)
    return out
