"""What other tools (and careless operators) do to our hooks, for drift tests (test-only)."""

from __future__ import annotations

import os
from pathlib import Path

from nfctl.bpf import syscall
from nfctl.datapath import links, xdp
from nfctl.datapath.dispatcher import TcSettings
from nfctl.netns import run

XDP_PASS = 2


def force_foreign_xdp(netns: str, ifname: str, name: str = "other_tool") -> None:
    """Attach another program over ours with plain netlink (no compare-and-swap)."""
    from pyroute2 import IPRoute

    fd = syscall.load_return_program(syscall.PROG_TYPE_XDP, XDP_PASS, name)
    try:
        with IPRoute(netns=netns) as ipr:
            index = ipr.link_lookup(ifname=ifname)[0]
            mode = xdp.query(ipr, index).mode
            flag = xdp.XDP_FLAGS_DRV_MODE if mode == "native" else xdp.XDP_FLAGS_SKB_MODE
            attrs = [["IFLA_XDP_FD", fd], ["IFLA_XDP_FLAGS", flag]]
            ipr.link("set", index=index, xdp={"attrs": attrs})
    finally:
        os.close(fd)  # the interface holds the program now


def _detach_nfctl_tcx(netns: str, ifname: str, direction: str) -> bool:
    from nfctl.datapath.hooklinks import tcx_programs
    from nfctl.manifest.model import Hook

    index = int(run("cat", f"/sys/class/net/{ifname}/ifindex", netns=netns))
    hook = Hook.TC_INGRESS if direction == "ingress" else Hook.TC_EGRESS
    ours = {i for i, name in tcx_programs(netns, index, hook) if name.startswith("nfctl_")}
    detached = False
    for link_id in links.link_ids():
        try:
            link = links.PinnedLink(links.link_fd_by_id(link_id))
        except OSError:
            continue  # gone meanwhile
        with link:
            info = link.info
            if (
                info.link_type == links.BPF_LINK_TYPE_TCX
                and info.prog_id in ours
                and info.ifindex == index
                and info.attach_type == links.TCX_ATTACH_TYPE[direction]
            ):
                links.link_detach(link.fd)
                detached = True
    return detached


def detach_links(bpffs_root: Path, hook: str) -> int:
    """Detach nfctl's pinned links on hook, as `bpftool link detach id N` does; the pins
    stay (defunct links). Returns how many were detached."""
    count = 0
    folder = bpffs_root / "links"
    for pin in sorted(folder.iterdir()) if folder.is_dir() else []:
        if pin.name.rsplit("-", 1)[0] == hook:
            with links.PinnedLink(links.obj_get(str(pin))) as link:
                links.link_detach(link.fd)
                count += 1
    return count


def delete_tc_filter(
    netns: str, ifname: str, direction: str = "ingress", settings: TcSettings = TcSettings()
) -> None:
    """Remove nfctl's tc attachment by hand, as an operator might: its cls_bpf filter, or
    on kernels with TCX its link (`bpftool link detach`)."""
    if _detach_nfctl_tcx(netns, ifname, direction):
        return
    run(
        "tc",
        "filter",
        "del",
        "dev",
        ifname,
        direction,
        "prio",
        str(settings.prio),
        "handle",
        hex(settings.handle),
        "bpf",
        netns=netns,
    )
