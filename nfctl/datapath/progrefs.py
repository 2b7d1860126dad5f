"""What a loaded program references, as the kernel reports it: map ids and the
instructions after verification (BPF_OBJ_GET_INFO_BY_FD). Reading it back from the kernel,
not from the source, sees through every spelling (macros, pasting, pins by path)."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from nfctl.datapath import bpf


@dataclass(frozen=True)
class LoadedRefs:
    map_ids: tuple[int, ...]
    xlated: bytes  # struct bpf_insn[], 8 bytes each


def loaded_refs(prog_fd: int) -> LoadedRefs:
    info = bpf.prog_info(prog_fd)
    # The first query sizes the instruction buffer for the second.
    sizing = bpf._ProgInfo()
    attr = bpf._InfoAttr(
        bpf_fd=prog_fd, info_len=ctypes.sizeof(sizing), info=ctypes.addressof(sizing)
    )
    bpf._bpf(bpf.BPF_OBJ_GET_INFO_BY_FD, attr, "program size")
    size = sizing.xlated_prog_len
    insns = (ctypes.c_uint8 * size)()
    full = bpf._ProgInfo(xlated_prog_len=size, xlated_prog_insns=ctypes.addressof(insns))
    attr = bpf._InfoAttr(bpf_fd=prog_fd, info_len=ctypes.sizeof(full), info=ctypes.addressof(full))
    bpf._bpf(bpf.BPF_OBJ_GET_INFO_BY_FD, attr, "program instructions")
    return LoadedRefs(map_ids=info.map_ids, xlated=bytes(insns[: min(size, full.xlated_prog_len)]))


def pinned_map_id(path: str) -> int | None:
    """The id of the map pinned at path, or None when no map is pinned there."""
    try:
        fd = bpf.obj_get(path)
    except OSError:
        return None
    try:
        return bpf.map_info(fd).map_id
    except OSError:
        return None
    finally:
        os.close(fd)


def map_id_and_type(map_fd: int) -> tuple[int, int]:
    info = bpf.map_info(map_fd)
    return info.map_id, info.map_type
