"""Netlink handles (optionally inside a named network namespace) and interface listing."""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute


@dataclass(frozen=True)
class Interface:
    index: int
    name: str
    kind: str | None
    up: bool


@contextmanager
def ipr(netns: str | None = None) -> Iterator[Any]:
    """An IPRoute socket in this process. With netns, the socket is created inside that
    namespace but lives here, so program fds passed over it resolve in our fd table."""
    handle = IPRoute(netns=netns) if netns else IPRoute()
    try:
        yield handle
    finally:
        handle.close()


def _kind(msg: Any) -> str | None:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    if linkinfo is None:
        return None
    kind = linkinfo.get_attr("IFLA_INFO_KIND")
    return str(kind) if kind is not None else None


def list_interfaces(handle: Any) -> list[Interface]:
    out = []
    for msg in handle.get_links():
        name = msg.get_attr("IFLA_IFNAME")
        out.append(
            Interface(
                index=int(msg["index"]),
                name=str(name),
                kind=_kind(msg),
                up=bool(msg["flags"] & 1),
            )
        )
    return sorted(out, key=lambda i: i.index)


SIOCGIFINDEX = 0x8933
IFREQ = struct.Struct("16si")


def index_by_name(sock: socket.socket, name: str) -> int | None:
    """The kernel's if_nametoindex, in the network namespace sock was opened in: one ioctl,
    where an RTM_GETLINK dump costs about half of a chain switch."""
    raw = name.encode()
    if not raw or len(raw) >= 16 or b"\0" in raw:
        return None  # no interface can have this name (and 16s would truncate it)
    try:
        reply = fcntl.ioctl(sock.fileno(), SIOCGIFINDEX, IFREQ.pack(raw, 0))
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise
    return int(IFREQ.unpack(reply)[1])


def interface_index(handle: Any, name: str) -> int | None:
    found = handle.link_lookup(ifname=name)
    return int(found[0]) if found else None


class NetnsHandles:
    """The netlink handle and the name-lookup socket of one network namespace (None: ours),
    opened on first use and kept: a chain update resolves a name with one ioctl."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._ipr: Any = None
        self._name_sock: socket.socket | None = None

    @property
    def ipr(self) -> Any:
        if self._ipr is None:
            self._ipr = IPRoute(netns=self.netns) if self.netns else IPRoute()
        return self._ipr

    def ifindex(self, ifname: str) -> int | None:
        if self._name_sock is None:
            from nfctl.datapath.links import in_netns

            with in_netns(self.netns):  # the socket resolves names where it was made
                self._name_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        return index_by_name(self._name_sock, ifname)

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._name_sock is not None:
            self._name_sock.close()
            self._name_sock = None
