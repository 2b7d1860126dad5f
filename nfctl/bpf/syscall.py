"""A small typed wrapper over the bpf() syscall.

Neither BCC nor pyroute2 exposes pin lookup, object info or map iteration without
loading LLVM; the agent needs them in a small process, so they are done here directly.
Debian's libbpf1 (1.1) covers every call here (bpf_map_*_elem, bpf_obj_pin/get,
bpf_obj_get_info_by_fd, bpf_prog_load); links.py already uses it through ctypes for
links, pins and queries, and moving these calls over is still to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_NEXT_ID = 11
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_MMAPABLE = 1 << 10

MAP_TYPE_NAMES = {
    1: "hash",
    2: "array",
    3: "prog",
    4: "perf_output",
    5: "percpu_hash",
    6: "percpu_array",
    7: "stacktrace",
    9: "lru_hash",
    10: "lru_percpu_hash",
    11: "lpm_trie",
    22: "queue",
    23: "stack",
    27: "ringbuf",
}
MAP_TYPE_IDS = {v: k for k, v in MAP_TYPE_NAMES.items()}
PERCPU_MAP_TYPES = {5, 6, 10}
PROG_TYPE_NAMES = {6: "xdp", 3: "sched_cls", 4: "sched_act"}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


BPF_FS_MAGIC = 0xCAFE4A11
FS_MAGIC_NAMES = {
    BPF_FS_MAGIC: "bpf",
    0x62656572: "sysfs",
    0x01021994: "tmpfs",
    0x9FA0: "proc",
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x794C7630: "overlay",
}


def fs_type(path: Path) -> int:
    """statfs(2)'s f_type (a filesystem magic) for path: the kernel's own answer for that
    path in this mount namespace, whatever mounts cover which."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first long
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statfs {path}: {os.strerror(err)}")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


class BpfError(OSError):
    def __init__(self, err: int, operation: str) -> None:
        super().__init__(err, f"{operation}: {os.strerror(err)}")
        self.operation = operation


class _ElemAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("path_fd", ctypes.c_int32),
    ]


class _IdAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _ProgInfo(ctypes.Structure):
    _fields_: ClassVar = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
    ]


class _MapInfo(ctypes.Structure):
    _fields_: ClassVar = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


@functools.cache
def _bpf_nr() -> int:
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise BpfError(errno.ENOSYS, f"bpf() syscall number unknown for {platform.machine()}")
    return nr


def _bpf_call(cmd: int, attr: ctypes.Structure) -> int:
    """bpf(cmd, attr): its return value, negative on error (errno in ctypes.get_errno())."""
    return int(_libc.syscall(_bpf_nr(), cmd, ctypes.byref(attr), ctypes.sizeof(attr)))


def _bpf(cmd: int, attr: ctypes.Structure, operation: str) -> int:
    ret = _bpf_call(cmd, attr)
    if ret < 0:
        raise BpfError(ctypes.get_errno(), operation)
    return ret


@dataclass(frozen=True)
class ProgInfo:
    prog_id: int
    prog_type: int
    name: str
    tag: str
    map_ids: tuple[int, ...]
    run_count: int
    run_time_ns: int


@dataclass(frozen=True)
class MapKernelInfo:
    map_id: int
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES.get(self.map_type, str(self.map_type))

    @property
    def is_percpu(self) -> bool:
        return self.map_type in PERCPU_MAP_TYPES


def obj_get(path: str) -> int:
    encoded = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(encoded))
    return _bpf(BPF_OBJ_GET, attr, f"open pin {path}")


def obj_pin(fd: int, path: str) -> None:
    encoded = ctypes.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=ctypes.addressof(encoded), bpf_fd=fd)
    _bpf(BPF_OBJ_PIN, attr, f"pin {path}")


def prog_fd_by_id(prog_id: int) -> int:
    return _bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id), f"open program id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    return _bpf(BPF_MAP_GET_FD_BY_ID, _IdAttr(id=map_id), f"open map id {map_id}")


def prog_ids() -> list[int]:
    """All program ids loaded in the kernel."""
    ids: list[int] = []
    attr = _IdAttr(id=0)
    while True:
        try:
            _bpf(BPF_PROG_GET_NEXT_ID, attr, "list programs")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return ids
            raise
        ids.append(attr.next_id)
        attr = _IdAttr(id=attr.next_id)


def prog_info(fd: int) -> ProgInfo:
    info = _ProgInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "program info")
    count = info.nr_map_ids
    map_ids: tuple[int, ...] = ()
    if count:
        ids = (ctypes.c_uint32 * count)()
        info2 = _ProgInfo(nr_map_ids=count, map_ids=ctypes.addressof(ids))
        attr2 = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info2), info=ctypes.addressof(info2))
        _bpf(BPF_OBJ_GET_INFO_BY_FD, attr2, "program map ids")
        map_ids = tuple(ids[: info2.nr_map_ids])
    return ProgInfo(
        prog_id=info.id,
        prog_type=info.type,
        name=info.name.decode(errors="replace"),
        tag=bytes(info.tag).hex(),
        map_ids=map_ids,
        run_count=info.run_cnt,
        run_time_ns=info.run_time_ns,
    )


def map_info(fd: int) -> MapKernelInfo:
    info = _MapInfo()
    attr = _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "map info")
    return MapKernelInfo(
        map_id=info.id,
        map_type=info.type,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
        name=info.name.decode(errors="replace"),
    )


@functools.cache  # fixed at boot; read per lookup it was ~20 % of the test gate
def possible_cpus() -> int:
    """Per-CPU map values hold one slot per possible CPU (not online CPU)."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    total = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        total += (int(hi) - int(lo) + 1) if hi else 1
    return total


def percpu_value(value: bytes, value_size: int) -> bytes:
    """value for every possible CPU, each in a slot rounded up to 8 bytes, as the kernel
    takes a per-CPU map's value."""
    slot = (value_size + 7) // 8 * 8
    return value.ljust(slot, b"\0") * possible_cpus()


class BpfMap:
    """An open map fd with byte-level element operations."""

    def __init__(self, fd: int, info: MapKernelInfo | None = None) -> None:
        self.fd = fd
        self.info = info or map_info(fd)

    @classmethod
    def from_pin(cls, path: str) -> BpfMap:
        return cls(obj_get(path))

    @classmethod
    def from_id(cls, map_id: int) -> BpfMap:
        return cls(map_fd_by_id(map_id))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def value_buffer_size(self) -> int:
        if self.info.is_percpu:
            return ((self.info.value_size + 7) // 8 * 8) * possible_cpus()
        if self.info.map_type == 3:  # prog array: userspace sees u32 fds / ids
            return 4
        return self.info.value_size

    def lookup(self, key: bytes) -> bytes | None:
        kbuf = ctypes.create_string_buffer(key, self.info.key_size)
        vbuf = ctypes.create_string_buffer(self.value_buffer_size)
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf))
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, attr, f"lookup in map {self.info.name}")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return vbuf.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        kbuf = ctypes.create_string_buffer(key, self.info.key_size)
        vbuf = ctypes.create_string_buffer(value, max(len(value), 1))
        attr = _ElemAttr(
            map_fd=self.fd, key=ctypes.addressof(kbuf), value=ctypes.addressof(vbuf), flags=flags
        )
        # the message is formatted on failure only: a chain write makes several of these
        if _bpf_call(BPF_MAP_UPDATE_ELEM, attr) < 0:
            raise BpfError(ctypes.get_errno(), f"update map {self.info.name}")

    def delete(self, key: bytes) -> bool:
        kbuf = ctypes.create_string_buffer(key, self.info.key_size)
        attr = _ElemAttr(map_fd=self.fd, key=ctypes.addressof(kbuf))
        try:
            _bpf(BPF_MAP_DELETE_ELEM, attr, f"delete from map {self.info.name}")
        except BpfError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self, limit: int = 1 << 20) -> list[bytes]:
        out: list[bytes] = []
        prev: ctypes.Array[ctypes.c_char] | None = None
        nbuf = ctypes.create_string_buffer(self.info.key_size)
        while len(out) < limit:
            attr = _ElemAttr(
                map_fd=self.fd,
                key=ctypes.addressof(prev) if prev is not None else 0,
                value=ctypes.addressof(nbuf),
            )
            try:
                _bpf(BPF_MAP_GET_NEXT_KEY, attr, f"iterate map {self.info.name}")
            except BpfError as exc:
                if exc.errno == errno.ENOENT:
                    break
                raise
            out.append(nbuf.raw)
            prev = ctypes.create_string_buffer(nbuf.raw, self.info.key_size)
        return out

    def items(self) -> list[tuple[bytes, bytes]]:
        out = []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                out.append((key, value))
        return out

    def array_values(self) -> bytes:
        """The values of every element of an array map created with BPF_F_MMAPABLE, in
        index order, back to back: read through a mapping of the map's memory (one
        syscall element by element, or a batch lookup, takes milliseconds for a large
        array; this takes microseconds)."""
        with self.map_memory() as memory:
            raw = memory[: self.info.max_entries * self.array_stride]
        if self.array_stride == self.info.value_size:
            return raw
        return memoryview(raw).cast("I")[::2].tobytes()

    @property
    def array_stride(self) -> int:
        """Bytes between two elements of an array map: the kernel aligns them to 8."""
        return (self.info.value_size + 7) // 8 * 8

    def map_memory(self) -> mmap.mmap:
        """A read-only mapping of an mmapable array's elements (array_stride bytes apart;
        values of 4 or a multiple of 8 bytes): reads see the kernel's writes with no
        syscall. Close it before the map."""
        if self.info.map_type != MAP_TYPE_IDS["array"] or not self.info.flags & BPF_F_MMAPABLE:
            raise BpfError(errno.EINVAL, f"map {self.info.name} is not an mmapable array")
        if self.array_stride != self.info.value_size and self.info.value_size != 4:
            raise BpfError(
                errno.EINVAL, f"map {self.info.name}: value size {self.info.value_size} unsupported"
            )
        length = self.info.max_entries * self.array_stride
        pages = -(-length // mmap.PAGESIZE) * mmap.PAGESIZE
        return mmap.mmap(self.fd, pages, mmap.MAP_SHARED, mmap.PROT_READ)

    def count(self) -> int:
        if self.info.map_type in (2, 6):  # arrays always hold max_entries elements
            return self.info.max_entries
        return len(self.keys())


class U32Writer:
    """Element updates of one map with 4-byte keys and values, the syscall's arguments
    built once: a one-NF version swap is this one write, and building the buffers and
    the attribute for each call (BpfMap.update) was ~1.7 us of the write's ~3.7. One
    writer at a time: the key and value buffers are shared between calls."""

    def __init__(self, bpf_map: BpfMap) -> None:
        if bpf_map.info.key_size != 4 or bpf_map.info.value_size != 4:
            raise BpfError(errno.EINVAL, f"map {bpf_map.info.name}: keys or values not 4 bytes")
        self._name = bpf_map.info.name
        self._key = ctypes.c_uint32()
        self._value = ctypes.c_uint32()
        self._attr = _ElemAttr(
            map_fd=bpf_map.fd,
            key=ctypes.addressof(self._key),
            value=ctypes.addressof(self._value),
            flags=BPF_ANY,
        )
        attr = ctypes.byref(self._attr)
        self._args = (_bpf_nr(), BPF_MAP_UPDATE_ELEM, attr, ctypes.sizeof(self._attr))

    def write(self, key: int, value: int) -> None:
        self._key.value = key
        self._value.value = value
        if _libc.syscall(*self._args) < 0:
            raise BpfError(ctypes.get_errno(), f"update map {self._name}")


class BpfProgram:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.info = prog_info(fd)

    @classmethod
    def from_pin(cls, path: str) -> BpfProgram:
        return cls(obj_get(path))

    @classmethod
    def from_id(cls, prog_id: int) -> BpfProgram:
        return cls(prog_fd_by_id(prog_id))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BPF_MAP_CREATE = 0


class _MapCreateAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
    ]


def ensure_pinned_map(
    path: str,
    map_type: int,
    key_size: int,
    value_size: int,
    max_entries: int,
    flags: int = 0,
    name: str = "",
) -> None:
    """Create a map and pin it at path, unless one is pinned there already (also when a
    concurrent creator pins first: its map is the one used)."""
    if os.path.exists(path):
        return
    fd = map_create(map_type, key_size, value_size, max_entries, flags, name)
    try:
        obj_pin(fd, path)
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
    finally:
        os.close(fd)


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0, name: str = ""
) -> int:
    attr = _MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        map_name=name.encode()[:15],
    )
    return _bpf(BPF_MAP_CREATE, attr, f"create map {name or map_type}")


BPF_PROG_LOAD = 5
BPF_INSN_SIZE = 8
PROG_TYPE_SCHED_CLS = 3
PROG_TYPE_XDP = 6


class _ProgLoadAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
    ]


def prog_load(
    prog_type: int,
    insns: bytes,
    name: str,
    operation: str,
    log: ctypes.Array[ctypes.c_char] | None = None,
) -> int:
    """BPF_PROG_LOAD of raw instructions under the GPL; returns the program fd. With log,
    the verifier writes its log there (level 1)."""
    buffer = ctypes.create_string_buffer(insns, len(insns))
    license_buf = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(insns) // BPF_INSN_SIZE,
        insns=ctypes.addressof(buffer),
        license=ctypes.addressof(license_buf),
        prog_name=name.encode()[:15],
    )
    if log is not None:
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
    return _bpf(BPF_PROG_LOAD, attr, operation)


def load_return_program(prog_type: int, verdict: int, name: str) -> int:
    """Load `r0 = verdict; exit` (no compiler needed): probes and foreign-program tests."""
    insns = struct_pack_insns([(0xB7, 0, 0, 0, verdict), (0x95, 0, 0, 0, 0)])
    return prog_load(prog_type, insns.raw, name, f"load program {name}")


def struct_pack_insns(insns: list[tuple[int, int, int, int, int]]) -> ctypes.Array[ctypes.c_char]:
    """Encode eBPF instructions (opcode, dst, src, offset, imm) into a buffer."""
    import struct

    raw = b"".join(
        struct.pack("<BBhi", op, (src << 4) | dst, off, imm) for op, dst, src, off, imm in insns
    )
    return ctypes.create_string_buffer(raw, len(raw))
