"""`nfctl teardown` on a real node: a real agent attached NFs at XDP and TC, other tools'
programs sit beside them (XDP on another interface, a tc filter on the same hook, a pin
in bpffs); afterwards every nfctl program, filter and pin is gone and the others remain."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import signal
import socket
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from nfctl.bpf import syscall
from nfctl.datapath import tc
from nfctl.datapath.netlink import ipr
from nfctl.netns import VethPair, run, unique_name
from nfctl.teardown import teardown
from tests import foreign
from tests.agent_harness import nfctl, set_blocked_v4, tc_filter_present, wait_until, xdp_prog_id
from tests.test_agent_features import Lab, lab

__all__ = ["lab"]

pytestmark = pytest.mark.kernel

TC_ACT_OK = 0
FOREIGN_PRIO = 20000


def _bpftool_prog_ids() -> set[int]:
    out = run("bpftool", "-j", "prog", "show")
    return {int(p["id"]) for p in json.loads(out or "[]")}


def _pins_under(root: Path) -> list[str]:
    return sorted(str(Path(d) / f) for d, _, files in os.walk(root) for f in files)


def test_teardown_removes_ours_and_keeps_foreign(lab: Lab) -> None:
    veth, repo = lab.veth, lab.repo
    blocked = lab.blocked_source()
    repo.add_library_nf("blocklist")  # XDP
    repo.add_library_nf("counter")  # tc ingress
    set_blocked_v4(repo, [blocked])
    c1 = repo.commit("blocklist and counter")
    agent = lab.agent()
    agent.wait_ready(c1)
    assert lab.ping_from(blocked, 2) == 0
    ours = {int(agent.nf(n)["programId"]) for n in ("blocklist", "counter")}
    ours.add(xdp_prog_id(veth))  # the XDP dispatcher
    assert tc_filter_present(veth)
    assert _pins_under(lab.bpffs_root)

    # other tools: XDP on another interface, a tc filter on our hook, a pin in bpffs
    other_if = unique_name("fx")
    peer = unique_name("fy")  # neither matches the NFs' interface globs (eth*, veth*)
    run("ip", "link", "add", other_if, "type", "veth", "peer", "name", peer, netns=veth.ns_a)
    run("ip", "link", "set", other_if, "up", netns=veth.ns_a)
    foreign.force_foreign_xdp(veth.ns_a, other_if, "foreign_xdp")
    foreign_xdp = xdp_prog_id(veth, other_if)
    tc_fd = syscall.load_return_program(syscall.PROG_TYPE_SCHED_CLS, TC_ACT_OK, "foreign_tc")
    foreign_pin = Path("/sys/fs/bpf") / unique_name("k8s-teardown-foreign-")
    try:
        syscall.obj_pin(tc_fd, str(foreign_pin))
        foreign_tc = syscall.prog_info(tc_fd).prog_id
        with ipr(veth.ns_a) as handle:
            index = handle.link_lookup(ifname=veth.a_if)[0]
            # nfctl attaches through TCX where the kernel has it: the legacy filter of the
            # other tool brings its own clsact qdisc
            tc.ensure_clsact(handle, index)
            tc.replace_filter(handle, index, "ingress", tc_fd, "foreign_tc", FOREIGN_PRIO, 1)
        os.close(tc_fd)
        tc_fd = -1

        # refused while the agent runs: it would put everything back
        args = ["teardown", "--bpffs-dir", str(lab.bpffs_root), "--state-dir", str(lab.state_dir)]
        refused = nfctl(*args, netns=veth.ns_a)
        assert refused.returncode == 2 and "stop it first" in refused.stderr, refused
        assert xdp_prog_id(veth) in ours

        assert agent.stop(signal.SIGTERM) == 0
        assert xdp_prog_id(veth) in ours and tc_filter_present(veth)  # exit keeps the datapath

        done = nfctl(*args, "--purge-state", "-o", "json", netns=veth.ns_a)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(done.stdout)

        # ours: gone from the hooks, from bpffs, from the kernel
        assert xdp_prog_id(veth) == 0
        link = run("ip", "-d", "link", "show", "dev", veth.a_if, netns=veth.ns_a)
        assert "prog/xdp" not in link, link
        for direction in ("ingress", "egress"):
            shown = run("tc", "filter", "show", "dev", veth.a_if, direction, netns=veth.ns_a)
            assert "nfctl" not in shown, shown
        assert not lab.bpffs_root.exists()
        wait_until(lambda: not ours & _bpftool_prog_ids(), 10, what="our programs freed")
        assert lab.ping_from(blocked, 2) == 2  # the blocklist no longer drops
        assert any(d.startswith(f"{veth.a_if}/xdp") for d in report["detached"]), report
        assert report["unpinned"]
        assert report["stateRemoved"] and not lab.state_dir.exists()

        # foreign: untouched
        assert xdp_prog_id(veth, other_if) == foreign_xdp
        shown = run("tc", "filter", "show", "dev", veth.a_if, "ingress", netns=veth.ns_a)
        assert "foreign_tc" in shown and f"pref {FOREIGN_PRIO}" in shown, shown
        assert foreign_pin.exists()
        assert {foreign_xdp, foreign_tc} <= _bpftool_prog_ids()
        kept = " ".join(report["kept"])
        assert f"{other_if}/xdp prog {foreign_xdp}" in kept and "foreign_tc" in kept, kept

        # idempotent
        again = nfctl(*args, "-o", "json", netns=veth.ns_a)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["detached"] == []
    finally:
        if tc_fd >= 0:
            os.close(tc_fd)
        foreign_pin.unlink(missing_ok=True)


# -- bpf_links (TCX) pinned under our folder ----------------------------------------------------

BPF_LINK_CREATE = 28
BPF_TCX_INGRESS = 46
TC_ACT_SHOT = 2


class _LinkCreateAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("prog_fd", ctypes.c_uint32),
        ("target_ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("relative_fd", ctypes.c_uint32),
        ("expected_revision", ctypes.c_uint64),
    ]


def _tcx_link_in(netns: str, ifname: str, prog_fd: int) -> int:
    """BPF_LINK_CREATE at TCX ingress of an interface inside netns (ifindexes resolve in the
    calling thread's namespace: a short-lived thread switches)."""
    result: list[int] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            index = socket.if_nametoindex(ifname)
            attr = _LinkCreateAttr(
                prog_fd=prog_fd, target_ifindex=index, attach_type=BPF_TCX_INGRESS
            )
            result.append(syscall._bpf(BPF_LINK_CREATE, attr, "link create"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def _link_ifindex(fd: int) -> int:
    """The interface a TCX link is attached to (0 once detached), from its fdinfo."""
    text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    match = re.search(r"^ifindex:\s*(\d+)", text, re.M)
    assert match, text
    return int(match[1])


def test_teardown_detaches_pinned_links_even_while_held(
    veth: VethPair, bpffs_root: Path, tmp_path: Path
) -> None:
    """A bpf_link pinned under our folder is detached (not only unpinned: another fd may
    still hold it); one pinned elsewhere stays attached."""
    drop = syscall.load_return_program(syscall.PROG_TYPE_SCHED_CLS, TC_ACT_SHOT, "linked_drop")
    ours = theirs = -1
    foreign_pin = Path("/sys/fs/bpf") / unique_name("k8s-teardown-link-")
    try:
        ours = _tcx_link_in(veth.ns_a, veth.a_if, drop)
        (bpffs_root / "links").mkdir(parents=True)
        syscall.obj_pin(ours, str(bpffs_root / "links" / f"tcx-ingress-{veth.a_if}"))
        assert _link_ifindex(ours) > 0
        assert veth.ping(veth.ns_b, veth.a_ip, 2, timeout_s=0.3) == 0  # the link drops

        other = unique_name("fz")
        run(
            "ip", "link", "add", other, "type", "veth", "peer", "name", other + "p", netns=veth.ns_a
        )
        theirs = _tcx_link_in(veth.ns_a, other, drop)
        syscall.obj_pin(theirs, str(foreign_pin))

        report = teardown(bpffs_root, tmp_path / "state", netns=veth.ns_a)
        assert report.links == [str(bpffs_root / "links" / f"tcx-ingress-{veth.a_if}")]
        assert _link_ifindex(ours) == 0  # detached although this test still holds its fd
        # b's neighbour entry for a failed while ARP was dropped: let it resolve again
        wait_until(lambda: veth.ping(veth.ns_b, veth.a_ip, 1, timeout_s=1) == 1, 15)
        assert veth.ping(veth.ns_b, veth.a_ip, 2, timeout_s=0.3) == 2
        assert not bpffs_root.exists()
        assert _link_ifindex(theirs) > 0 and foreign_pin.exists()
    finally:
        for fd in (ours, theirs, drop):
            if fd >= 0:
                os.close(fd)
        foreign_pin.unlink(missing_ok=True)
