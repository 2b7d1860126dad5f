"""XDP attachment over netlink (pyroute2), with compare-and-swap replacement.

Re-attaching over the old program is atomic (no packet sees no program); attaching with
XDP_FLAGS_REPLACE and the expected old fd also refuses to clobber a program someone
else put there in the meantime. BCC's attach_xdp cannot pass the expected fd.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4

MODE_NAMES = {1: "native", 2: "generic", 3: "offload", 4: "multi"}
_MODE_FLAGS = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}


class XdpError(RuntimeError):
    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class XdpState:
    prog_id: int  # 0 when nothing is attached
    mode: str | None  # native | generic | offload | None


def query(handle: Any, ifindex: int) -> XdpState:
    links = handle.get_links(ifindex)
    if not links:
        raise XdpError(f"interface index {ifindex} not found", errno.ENODEV)
    xdp = links[0].get_attr("IFLA_XDP")
    if xdp is None:
        return XdpState(0, None)
    attached = xdp.get_attr("IFLA_XDP_ATTACHED") or 0
    mode_value = attached if isinstance(attached, int) else _mode_value(attached)
    prog_id = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
    if not prog_id:
        for attr in ("IFLA_XDP_DRV_PROG_ID", "IFLA_XDP_SKB_PROG_ID"):
            prog_id = xdp.get_attr(attr) or prog_id
    return XdpState(int(prog_id), MODE_NAMES.get(mode_value) if prog_id else None)


def _mode_value(name: str) -> int:
    return {"xdp": 1, "xdpgeneric": 2, "xdpoffload": 3, "xdpmulti": 4}.get(str(name), 0)


def _set(handle: Any, ifindex: int, fd: int, flags: int, expected_fd: int | None) -> None:
    xdp_attrs: list[list[Any]] = [["IFLA_XDP_FD", fd], ["IFLA_XDP_FLAGS", flags]]
    if expected_fd is not None:
        xdp_attrs.append(["IFLA_XDP_EXPECTED_FD", expected_fd])
    handle.link("set", index=ifindex, xdp={"attrs": xdp_attrs})


def attach(
    handle: Any,
    ifindex: int,
    fd: int,
    mode: str = "auto",
    expected_fd: int | None = None,
) -> str:
    """Attach fd at XDP. expected_fd=None: only if no program is there (never clobber);
    expected_fd=N: atomically replace program N (fails if someone else's is there).
    Returns the mode the kernel gave: native or generic."""
    current = query(handle, ifindex)
    if expected_fd is not None and current.mode in ("native", "generic"):
        modes = [current.mode]  # a replacement must keep the mode
    elif mode == "auto":
        modes = ["native", "generic"]
    else:
        modes = [mode]
    last: NetlinkError | None = None
    for name in modes:
        flags = _MODE_FLAGS[name]
        flags |= XDP_FLAGS_REPLACE if expected_fd is not None else XDP_FLAGS_UPDATE_IF_NOEXIST
        try:
            _set(handle, ifindex, fd, flags, expected_fd)
        except NetlinkError as exc:
            last = exc
            if exc.code in (errno.EOPNOTSUPP, errno.EINVAL) and name == "native" and len(modes) > 1:
                continue
            break
        given = query(handle, ifindex).mode
        return given or name
    assert last is not None
    if last.code == errno.EBUSY:
        raise XdpError(
            f"another XDP program is attached to ifindex {ifindex}; not replacing it", last.code
        )
    if last.code == errno.EEXIST:
        raise XdpError(
            f"XDP on ifindex {ifindex} changed under us (compare-and-swap failed)", last.code
        )
    raise XdpError(f"XDP attach on ifindex {ifindex} failed: {last}", last.code)


def detach(handle: Any, ifindex: int, expected_fd: int | None = None) -> None:
    """Remove the XDP program; with expected_fd only if it is still that program."""
    state = query(handle, ifindex)
    if not state.prog_id:
        return
    flags = _MODE_FLAGS.get(state.mode or "", 0)
    if expected_fd is not None:
        flags |= XDP_FLAGS_REPLACE
    try:
        _set(handle, ifindex, -1, flags, expected_fd)
    except NetlinkError as exc:
        raise XdpError(f"XDP detach on ifindex {ifindex} failed: {exc}", exc.code) from exc
