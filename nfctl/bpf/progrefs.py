"""What a loaded program references, as the kernel reports it: map ids and the
instructions after verification (BPF_OBJ_GET_INFO_BY_FD). Reading it back from the kernel,
not from the source, sees through every spelling (macros, pasting, pins by path)."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from nfctl.bpf import syscall


@dataclass(frozen=True)
class LoadedRefs:
    map_ids: tuple[int, ...]
    xlated: bytes  # struct bpf_insn[], 8 bytes each


def loaded_refs(prog_fd: int) -> LoadedRefs:
    info = syscall.prog_info(prog_fd)
    # The first query sizes the instruction buffer for the second.
    sizing = syscall._ProgInfo()
    attr = syscall._InfoAttr(
        bpf_fd=prog_fd, info_len=ctypes.sizeof(sizing), info=ctypes.addressof(sizing)
    )
    syscall._bpf(syscall.BPF_OBJ_GET_INFO_BY_FD, attr, "program size")
    size = sizing.xlated_prog_len
    insns = (ctypes.c_uint8 * size)()
    full = syscall._ProgInfo(xlated_prog_len=size, xlated_prog_insns=ctypes.addressof(insns))
    attr = syscall._InfoAttr(
        bpf_fd=prog_fd, info_len=ctypes.sizeof(full), info=ctypes.addressof(full)
    )
    syscall._bpf(syscall.BPF_OBJ_GET_INFO_BY_FD, attr, "program instructions")
    return LoadedRefs(map_ids=info.map_ids, xlated=bytes(insns[: min(size, full.xlated_prog_len)]))


def pinned_map_id(path: str) -> int | None:
    """The id of the map pinned at path, or None when no map is pinned there."""
    try:
        fd = syscall.obj_get(path)
    except OSError:
        return None
    try:
        return syscall.map_info(fd).map_id
    except OSError:
        return None
    finally:
        os.close(fd)


def map_id_and_type(map_fd: int) -> tuple[int, int]:
    info = syscall.map_info(map_fd)
    return info.map_id, info.map_type
