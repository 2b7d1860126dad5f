"""bpf_link attachment: TCX (ingress/egress) and XDP links, pinned so they outlive the agent.

A link owns its hook: another tool cannot silently replace it (netlink XDP attach fails
with EBUSY while our XDP link holds the interface), and BPF_LINK_UPDATE with the expected
old program swaps the program as one compare-and-swap. Whether the kernel has TCX (>= 6.6)
and XDP links (>= 5.7) is probed by creating one on the loopback device of a private,
throwaway network namespace, never read off the version string.

Through Debian 12's libbpf1 (ctypes): link update, link detach, object pin and get, object
info, program query. Hand-written here: BPF_LINK_CREATE itself, because libbpf 1.1 has no
TCX options (relative_fd / relative_id for `before:`/`after:` placement) and treats any
non-zero union as invalid for attach types it does not know.

Interface indexes are resolved in the calling thread's network namespace, so link create
and query enter the agent's target namespace for the duration of the call (setns affects
only the calling thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from nfctl.bpf import syscall

BPF_XDP = 37
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47

BPF_LINK_CREATE = 28
BPF_F_REPLACE = 1 << 2
BPF_F_BEFORE = 1 << 3
BPF_F_AFTER = 1 << 4
BPF_F_ID = 1 << 5

BPF_LINK_TYPE_XDP = 6
BPF_LINK_TYPE_TCX = 11

CLONE_NEWNET = 0x40000000
LOOPBACK_IFINDEX = 1

TCX_ATTACH_TYPE = {"ingress": BPF_TCX_INGRESS, "egress": BPF_TCX_EGRESS}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class LinkError(OSError):
    def __init__(self, err: int, operation: str) -> None:
        super().__init__(err, f"{operation}: {os.strerror(err)}")
        self.operation = operation


class _UpdateOpts(ctypes.Structure):
    _fields_: ClassVar = [
        ("sz", ctypes.c_size_t),
        ("flags", ctypes.c_uint32),
        ("old_prog_fd", ctypes.c_uint32),
    ]


class _QueryOpts(ctypes.Structure):
    _fields_: ClassVar = [
        ("sz", ctypes.c_size_t),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_void_p),
        ("prog_cnt", ctypes.c_uint32),
        ("prog_attach_flags", ctypes.c_void_p),
    ]


class _LinkCreateAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("prog_fd", ctypes.c_uint32),
        ("target_ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("relative", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("expected_revision", ctypes.c_uint64),
    ]


@functools.cache
def _libbpf() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    lib.bpf_link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_UpdateOpts)]
    lib.bpf_link_detach.argtypes = [ctypes.c_int]
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
    lib.bpf_obj_get_info_by_fd.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint32),
    ]
    lib.bpf_prog_query_opts.argtypes = [ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(_QueryOpts)]
    lib.bpf_link_get_next_id.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_link_get_fd_by_id.argtypes = [ctypes.c_uint32]
    return lib


def _check(ret: int, operation: str) -> int:
    # libbpf 1.x returns -errno (and sets errno)
    if ret < 0:
        raise LinkError(-ret, operation)
    return ret


@contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with this thread inside /run/netns/<netns> (None: stay)."""
    if not netns:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise LinkError(ctypes.get_errno(), f"enter network namespace {netns}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen as root
                raise LinkError(ctypes.get_errno(), "return to the agent's network namespace")
    finally:
        os.close(own)
        os.close(target)


def link_create(
    prog_fd: int, ifindex: int, attach_type: int, flags: int = 0, relative: int = 0
) -> int:
    attr = _LinkCreateAttr(
        prog_fd=prog_fd,
        target_ifindex=ifindex,
        attach_type=attach_type,
        flags=flags,
        relative=relative,
    )
    return syscall._bpf(BPF_LINK_CREATE, attr, f"create link (attach type {attach_type})")


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int | None = None) -> None:
    """Swap the link's program; with old_prog_fd only if the link still runs that one."""
    opts = _UpdateOpts(sz=ctypes.sizeof(_UpdateOpts))
    if old_prog_fd is not None:
        opts.flags = BPF_F_REPLACE
        opts.old_prog_fd = old_prog_fd
    _check(_libbpf().bpf_link_update(link_fd, new_prog_fd, ctypes.byref(opts)), "update link")


def link_detach(link_fd: int) -> None:
    _check(_libbpf().bpf_link_detach(link_fd), "detach link")


def obj_pin(fd: int, path: str) -> None:
    _check(_libbpf().bpf_obj_pin(fd, os.fsencode(path)), f"pin {path}")


def obj_get(path: str) -> int:
    return _check(_libbpf().bpf_obj_get(os.fsencode(path)), f"open pin {path}")


def link_ids() -> list[int]:
    """Every bpf_link id in the kernel (any owner, any namespace)."""
    out: list[int] = []
    current = ctypes.c_uint32(0)
    while _libbpf().bpf_link_get_next_id(current.value, ctypes.byref(current)) == 0:
        out.append(current.value)
    return out


def link_fd_by_id(link_id: int) -> int:
    return _check(_libbpf().bpf_link_get_fd_by_id(link_id), f"open link id {link_id}")


@dataclass(frozen=True)
class LinkInfo:
    link_id: int
    link_type: int
    prog_id: int
    ifindex: int  # 0 once the link is defunct (detached by someone, or its device is gone)
    attach_type: int  # TCX only


def link_info(link_fd: int) -> LinkInfo:
    buf = ctypes.create_string_buffer(64)
    size = ctypes.c_uint32(64)
    _check(_libbpf().bpf_obj_get_info_by_fd(link_fd, buf, ctypes.byref(size)), "link info")
    link_type, link_id, prog_id = struct.unpack_from("<III", buf.raw, 0)
    ifindex, attach_type = struct.unpack_from("<II", buf.raw, 16)
    return LinkInfo(link_id, link_type, prog_id, ifindex, attach_type)


def tcx_prog_ids(ifindex: int, direction: str) -> list[int]:
    """Program ids attached through TCX on (ifindex, direction), in run order (any owner:
    links and the mprog attach API alike). Call inside the interface's namespace."""
    ids = (ctypes.c_uint32 * 64)()
    opts = _QueryOpts(
        sz=ctypes.sizeof(_QueryOpts), prog_ids=ctypes.addressof(ids), prog_cnt=len(ids)
    )
    ret = _libbpf().bpf_prog_query_opts(ifindex, TCX_ATTACH_TYPE[direction], ctypes.byref(opts))
    if ret < 0:
        if -ret in (errno.ENOENT, errno.ENODEV):
            return []
        raise LinkError(-ret, f"query TCX {direction} on ifindex {ifindex}")
    return list(ids[: opts.prog_cnt])


@contextmanager
def _private_netns() -> Iterator[None]:
    """This thread in a fresh network namespace (only lo) for the body; freed after."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise LinkError(ctypes.get_errno(), "create a private network namespace")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen as root
                raise LinkError(ctypes.get_errno(), "return to the agent's network namespace")
    finally:
        os.close(own)


def _probe(prog_type: int, verdict: int, attach_type: int) -> bool:
    try:
        prog_fd = syscall.load_return_program(prog_type, verdict, "nfctl_probe")
    except OSError:
        return False
    try:
        with _private_netns():
            fd = link_create(prog_fd, LOOPBACK_IFINDEX, attach_type)
            os.close(fd)  # unpinned: the link goes with its last fd
        return True
    except OSError:
        return False
    finally:
        os.close(prog_fd)


@functools.cache
def kernel_has_tcx() -> bool:
    return _probe(syscall.PROG_TYPE_SCHED_CLS, 0, BPF_TCX_INGRESS)


@functools.cache
def kernel_has_xdp_links() -> bool:
    return _probe(syscall.PROG_TYPE_XDP, 2, BPF_XDP)


class PinnedLink:
    """An open fd of a link pinned at a path of ours."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.info = link_info(fd)

    @classmethod
    def open(cls, path: str) -> PinnedLink | None:
        try:
            return cls(obj_get(path))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    @property
    def attached(self) -> bool:
        return self.info.ifindex != 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
