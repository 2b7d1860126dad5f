"""BPF_PROG_TEST_RUN: run a loaded program once on a packet, in the kernel, unattached."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

from nfctl.bpf import syscall

BPF_PROG_TEST_RUN = 10
MAX_PACKET_OUT = 1 << 16


class _TestRunAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class RunResult:
    retval: int  # signed: TC_ACT_UNSPEC is -1
    packet: bytes
    duration_ns: int


def test_run(prog_fd: int, packet: bytes) -> RunResult:
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(MAX_PACKET_OUT)
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(packet),
        data_size_out=MAX_PACKET_OUT,
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=1,
    )
    syscall._bpf(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    retval = ctypes.c_int32(attr.retval).value
    return RunResult(
        retval=retval, packet=data_out.raw[: attr.data_size_out], duration_ns=attr.duration
    )
