"""Probe that this kernel attaches programs at XDP and TC (clsact) on a veth pair in a
throwaway network namespace. Used by `nfctl doctor`."""

from __future__ import annotations

import os

from nfctl.bpf import syscall
from nfctl.datapath import tc, xdp
from nfctl.netns import VethPair, unique_name

XDP_PASS = 2
TC_ACT_OK = 0


def probe_hooks() -> str:
    from pyroute2 import IPRoute

    xdp_fd = syscall.load_return_program(syscall.PROG_TYPE_XDP, XDP_PASS, "nfctl_probe")
    tc_fd = syscall.load_return_program(syscall.PROG_TYPE_SCHED_CLS, TC_ACT_OK, "nfctl_probe")
    try:
        with VethPair.create(unique_name("dr")) as pair, IPRoute(netns=pair.ns_a) as handle:
            index = handle.link_lookup(ifname=pair.a_if)[0]
            mode = xdp.attach(handle, index, xdp_fd)
            xdp.detach(handle, index)
            tc.ensure_clsact(handle, index)
            tc.replace_filter(handle, index, "ingress", tc_fd, "nfctl_probe", 10, 1)
            tc.replace_filter(handle, index, "egress", tc_fd, "nfctl_probe", 10, 1)
            found = tc.list_filters(handle, index, "ingress")
            if not found or not found[0].prog_id:
                raise RuntimeError("tc filter attached but its program id is not reported")
    finally:
        os.close(xdp_fd)
        os.close(tc_fd)
    return f"XDP attach works ({mode} on veth), TC clsact ingress/egress attach works"
