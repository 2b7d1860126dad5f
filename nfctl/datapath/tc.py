"""TC (clsact) attachment with pyroute2: one cls_bpf filter per hook at a fixed prio and
handle, so `replace-filter` swaps programs atomically (without a handle the kernel adds a
second filter; without a prio it adds a new one at 49152)."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.tcmsg import sched_bpf

TC_H_CLSACT = 0xFFFFFFF1
PARENT = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}
ETH_P_ALL = 0x0003


def _extend_bpf_attributes() -> None:
    """pyroute2 0.9.7 does not decode TCA_BPF_FLAGS_GEN/TAG/ID; rediscovery needs the id."""
    names = [name for name, _ in sched_bpf.options.nla_map]
    if "TCA_BPF_ID" in names:
        return
    sched_bpf.options.nla_map = (
        *sched_bpf.options.nla_map,
        ("TCA_BPF_FLAGS_GEN", "uint32"),
        ("TCA_BPF_TAG", "hex"),
        ("TCA_BPF_ID", "uint32"),
    )


_extend_bpf_attributes()


class TcError(RuntimeError):
    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class TcFilter:
    prio: int
    handle: int
    name: str
    prog_id: int
    tag: str


def has_clsact(handle: Any, ifindex: int) -> bool:
    return any(msg.get_attr("TCA_KIND") == "clsact" for msg in handle.get_qdiscs(index=ifindex))


def ensure_clsact(handle: Any, ifindex: int) -> bool:
    """Add a clsact qdisc if there is none. Returns True when this call created it."""
    if has_clsact(handle, ifindex):
        return False
    try:
        handle.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            return False
        raise TcError(f"cannot add clsact qdisc on ifindex {ifindex}: {exc}", exc.code) from exc
    return True


def remove_clsact(handle: Any, ifindex: int) -> None:
    try:
        handle.tc("del", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL):
            raise TcError(f"cannot remove clsact on ifindex {ifindex}: {exc}", exc.code) from exc


def list_filters(handle: Any, ifindex: int, direction: str) -> list[TcFilter]:
    out = []
    try:
        messages = handle.get_filters(index=ifindex, parent=PARENT[direction])
    except NetlinkError as exc:
        if exc.code in (errno.EINVAL, errno.ENOENT):
            return []
        raise
    for msg in messages:
        if msg.get_attr("TCA_KIND") != "bpf":
            continue
        options = msg.get_attr("TCA_OPTIONS")
        if options is None:
            continue  # the per-prio chain header, not a filter
        prog_id = options.get_attr("TCA_BPF_ID") or 0
        tag = options.get_attr("TCA_BPF_TAG") or ""
        out.append(
            TcFilter(
                prio=int(msg["info"]) >> 16,
                handle=int(msg["handle"]),
                name=str(options.get_attr("TCA_BPF_NAME") or ""),
                prog_id=int(prog_id),
                tag=str(tag).replace(":", ""),
            )
        )
    return out


def replace_filter(
    handle: Any, ifindex: int, direction: str, fd: int, name: str, prio: int, filter_handle: int
) -> None:
    try:
        handle.tc(
            "replace-filter",
            "bpf",
            ifindex,
            filter_handle,
            fd=fd,
            name=name,
            parent=PARENT[direction],
            prio=prio,
            protocol=ETH_P_ALL,
            direct_action=True,
        )
    except NetlinkError as exc:
        raise TcError(
            f"tc {direction} filter replace on ifindex {ifindex} failed: {exc}", exc.code
        ) from exc


def delete_filter(handle: Any, ifindex: int, direction: str, prio: int, filter_handle: int) -> None:
    try:
        handle.tc(
            "del-filter",
            "bpf",
            ifindex,
            filter_handle,
            parent=PARENT[direction],
            prio=prio,
            protocol=ETH_P_ALL,
        )
    except NetlinkError as exc:
        if exc.code in (errno.ENOENT, errno.EINVAL):
            return
        raise TcError(
            f"tc {direction} filter delete on ifindex {ifindex} failed: {exc}", exc.code
        ) from exc
