"""A private copy of a just-compiled program, for the agent's test gate: the live build's
own bytecode loaded a second time against fresh, empty copies of its maps. No second compile.

BCC hands BPF_PROG_LOAD the instructions at bpf_function_start/bpf_function_size with the
fds of the module's maps already patched into BPF_LD_IMM64 (src_reg BPF_PSEUDO_MAP_FD, or
BPF_PSEUDO_MAP_VALUE with an offset in the next slot). Those fds are the live, pinned maps:
here every one is replaced by a fresh map of the same shape, so the copy can never reach
them. The chain's prog array is copied empty too, so the wrapper's tail call fails and it
returns the NF's own verdict, as in a test build. The kernel verifies the copy (ms).
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator

from nfctl.bpf import syscall

INSN_SIZE = syscall.BPF_INSN_SIZE
LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two slots, a 64-bit immediate
PSEUDO_MAP_FD = 1
PSEUDO_MAP_VALUE = 2
# Map types whose shape is type, sizes, max_entries and flags alone. Others (map-in-map,
# storages that need BTF, struct_ops, bloom filters, arenas) are not copied: the gate then
# falls back to a test build of its own.
COPIABLE_MAP_TYPES = {
    1,  # hash
    2,  # array
    3,  # prog array (the chain: copied empty)
    4,  # perf event array
    5,  # percpu hash
    6,  # percpu array
    9,  # lru hash
    10,  # lru percpu hash
    11,  # lpm trie
    14,  # devmap
    16,  # cpumap
    17,  # xskmap
    22,  # queue
    23,  # stack
    25,  # devmap hash
    27,  # ringbuf
}
LOG_SIZE = 1 << 16


class CopyError(OSError):
    pass


def map_fd_slots(insns: bytes) -> Iterator[tuple[int, int]]:
    """(instruction index, map fd) of every map reference in the instructions."""
    if len(insns) % INSN_SIZE:
        raise CopyError(f"instructions of {len(insns)} bytes are not whole instructions")
    index = 0
    count = len(insns) // INSN_SIZE
    while index < count:
        code, regs, _off, imm = struct.unpack_from("<BBhi", insns, index * INSN_SIZE)
        if code == LD_IMM64:
            if regs >> 4 in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
                yield index, imm
            index += 2
            continue
        index += 1


def rewrite_map_fds(insns: bytes, mapping: dict[int, int]) -> bytes:
    """The instructions with every map fd replaced by mapping[fd]; an fd not in the mapping
    is refused (fail closed: the copy must reference no map that is not a private copy)."""
    out = bytearray(insns)
    for index, fd in map_fd_slots(insns):
        if fd not in mapping:
            raise CopyError(f"instruction {index} references map fd {fd}, which has no copy")
        struct.pack_into("<i", out, index * INSN_SIZE + 4, mapping[fd])
    return bytes(out)


def copy_maps(fds: set[int]) -> dict[int, int]:
    """A fresh, empty map of the same shape for every fd (old fd -> new fd)."""
    copies: dict[int, int] = {}
    try:
        for fd in sorted(fds):
            info = syscall.map_info(fd)
            if info.map_type not in COPIABLE_MAP_TYPES:
                raise CopyError(f"map {info.name!r} of type {info.map_type} cannot be copied")
            copies[fd] = syscall.map_create(
                info.map_type,
                info.key_size,
                info.value_size,
                info.max_entries,
                info.flags,
                info.name,
            )
    except OSError:
        for new in copies.values():
            os.close(new)
        raise
    return copies


def load_copy(insns: bytes, prog_type: int, name: str) -> int:
    """Load the instructions with private copies of their maps; returns the program fd.
    The map copies live as long as the program (it holds them)."""
    copies = copy_maps({fd for _, fd in map_fd_slots(insns)})
    try:
        raw = rewrite_map_fds(insns, copies)
        try:
            return syscall.prog_load(prog_type, raw, name, f"load the test copy of {name}")
        except OSError:
            # again with the verifier's log, only to explain the refusal
            log = ctypes.create_string_buffer(LOG_SIZE)
            try:
                return syscall.prog_load(prog_type, raw, name, "", log)
            except OSError as exc:
                tail = log.value.decode(errors="replace").strip().splitlines()[-3:]
                raise CopyError(f"the test copy was refused: {exc}: {' / '.join(tail)}") from exc
    finally:
        for fd in copies.values():
            os.close(fd)
