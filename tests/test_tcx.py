"""bpf_link attachment against the real kernel: TCX and XDP links pinned under our bpffs
folder, adoption after kill -9, detach, ordering among other tools' TCX programs, the
netlink fallback, and shadowing by programs that end processing before our chain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nfctl.bpf import syscall
from nfctl.builder.builder import Builder
from nfctl.datapath import hooklinks, links
from nfctl.datapath.datapath import ChainMember, Datapath, DatapathError, LoadedBuild
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair, run
from tests.helpers import prepare_nf, write_nf
from tests.nfsources import counting_nf

pytestmark = pytest.mark.kernel

TCX_NEXT, TCX_PASS, TCX_DROP = -1, 0, 2
VERDICTS = {"next": TCX_NEXT, "pass": TCX_PASS, "drop": TCX_DROP}


def load_counting(dp: Datapath, folder: Path, name: str, hook: Hook) -> LoadedBuild:
    source, function, cflags = counting_nf(hook.value)
    write_nf(folder, name, source, function, hook=hook.value, cflags=cflags)
    return Builder(dp).build(prepare_nf(folder, name))


def member(loaded: LoadedBuild) -> ChainMember:
    return ChainMember(loaded.nf, loaded.build_hash, loaded.prog_pin)


def seen(dp: Datapath, loaded: LoadedBuild) -> int:
    return int(dict(dp.map_entries(loaded, "seen"))[0])


def ifindex(veth: VethPair) -> int:
    return int(run("cat", f"/sys/class/net/{veth.a_if}/ifindex", netns=veth.ns_a).strip())


@contextmanager
def foreign_tcx(
    veth: VethPair, verdict: int, name: str, where: int = links.BPF_F_BEFORE
) -> Iterator[int]:
    """Another tool's TCX program (as a CNI attaches it) on ingress of a; yields its id."""
    prog = syscall.load_return_program(syscall.PROG_TYPE_SCHED_CLS, verdict, name)
    try:
        with links.in_netns(veth.ns_a):
            link = links.link_create(prog, ifindex(veth), links.BPF_TCX_INGRESS, where)
        try:
            yield syscall.prog_info(prog).prog_id
        finally:
            os.close(link)
    finally:
        os.close(prog)


def static_neighbours(veth: VethPair) -> None:
    """Permanent ARP entries both ways, so a program dropping at ingress of a drops the
    echo requests themselves rather than the ARP exchange before them."""
    for ns, peer_ns, peer_ip in (
        (veth.ns_a, veth.ns_b, veth.b_ip),
        (veth.ns_b, veth.ns_a, veth.a_ip),
    ):
        mac = run("cat", "/sys/class/net/veth0/address", netns=peer_ns).strip()
        run(
            "ip",
            "neigh",
            "replace",
            peer_ip,
            "lladdr",
            mac,
            "dev",
            "veth0",
            "nud",
            "permanent",
            netns=ns,
        )


def test_kernel_has_tcx_and_xdp_links() -> None:
    # Linux 6.18 here: the probes must find both (they create links in a private netns)
    assert links.kernel_has_tcx() and links.kernel_has_xdp_links()


@pytest.mark.parametrize("hook", [Hook.TC_INGRESS, Hook.XDP], ids=lambda h: h.value)
def test_chain_attaches_through_a_pinned_link(
    datapath: Datapath, veth: VethPair, tmp_path: Path, hook: Hook
) -> None:
    nf = load_counting(datapath, tmp_path, "linked", hook)
    mode = datapath.set_chain(veth.a_if, hook, [member(nf)])
    assert mode == ("tcx" if hook is Hook.TC_INGRESS else "native")
    pin = hooklinks.link_pin(datapath.paths, hook, ifindex(veth))
    assert pin.exists()
    filters = run("tc", "filter", "show", "dev", veth.a_if, "ingress", netns=veth.ns_a)
    assert "bpf" not in filters  # no cls_bpf filter: the link is the attachment
    assert veth.ping_a_from_b(3) == 3
    assert seen(datapath, nf) == 3
    [point] = datapath.observe({(veth.a_if, hook): ["linked"]})
    assert point.ours and point.drift == [] and point.shadowed_by == []
    assert point.attach == ("tcx" if hook is Hook.TC_INGRESS else "xdp-link")
    with links.PinnedLink(links.obj_get(str(pin))) as link:
        assert point.link_id == link.info.link_id
        assert link.info.prog_id == datapath.dispatcher(hook).info.prog_id

    datapath.clear_chain(veth.a_if, hook)
    assert not pin.exists()
    if hook is Hook.XDP:
        link_show = run("ip", "link", "show", "dev", veth.a_if, netns=veth.ns_a)
        assert "xdp" not in link_show
    else:
        assert hooklinks.tcx_programs(veth.ns_a, ifindex(veth), hook) == []
    assert veth.ping_a_from_b(2) == 2 and seen(datapath, nf) == 3


def test_link_update_is_compare_and_swap(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    nf = load_counting(datapath, tmp_path, "cas", Hook.TC_INGRESS)
    datapath.set_chain(veth.a_if, Hook.TC_INGRESS, [member(nf)])
    pin = str(hooklinks.link_pin(datapath.paths, Hook.TC_INGRESS, ifindex(veth)))
    other = syscall.load_return_program(syscall.PROG_TYPE_SCHED_CLS, TCX_NEXT, "nfctl_other")
    stale = syscall.load_return_program(syscall.PROG_TYPE_SCHED_CLS, TCX_NEXT, "stale")
    try:
        with links.PinnedLink(links.obj_get(pin)) as link:
            before = link.info.link_id
            with pytest.raises(OSError):  # expected old program is not the one it runs
                links.link_update(link.fd, other, stale)
            links.link_update(link.fd, other, datapath.dispatcher(Hook.TC_INGRESS).fd)
        with links.PinnedLink(links.obj_get(pin)) as link:
            assert link.info.link_id == before
            assert link.info.prog_id == syscall.prog_info(other).prog_id
        # our attach puts the dispatcher back through the same link
        datapath.set_chain(veth.a_if, Hook.TC_INGRESS, [member(nf)])
        with links.PinnedLink(links.obj_get(pin)) as link:
            assert link.info.link_id == before
            assert link.info.prog_id == datapath.dispatcher(Hook.TC_INGRESS).info.prog_id
    finally:
        os.close(other)
        os.close(stale)


ATTACHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from nfctl.builder.builder import Builder
    from nfctl.datapath.datapath import ChainMember, Datapath
    from nfctl.manifest.model import Hook
    from tests.helpers import prepare_nf
    root, state, netns, ifname, folder = sys.argv[1:6]
    dp = Datapath(Path(root), Path(state), netns=netns)
    loaded = Builder(dp).build(prepare_nf(Path(folder), "survivor"))
    mode = dp.set_chain(ifname, Hook.TC_INGRESS,
                        [ChainMember(loaded.nf, loaded.build_hash, loaded.prog_pin)])
    print("attached", mode, flush=True)
    time.sleep(600)
    """
)


def test_tcx_link_survives_kill_and_is_adopted(
    bpffs_root: Path, veth: VethPair, tmp_path: Path
) -> None:
    source, function, cflags = counting_nf("tc-ingress")
    write_nf(tmp_path, "survivor", source, function, hook="tc-ingress", cflags=cflags)
    state = tmp_path / "state"
    args = [str(bpffs_root), str(state), veth.ns_a, veth.a_if, str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, "-c", ATTACHER, *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.split() == ["attached", "tcx"], line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    assert veth.ping_a_from_b(3) == 3
    dp = Datapath(bpffs_root, state, netns=veth.ns_a)
    try:
        adopted = dp.find_loaded("survivor", prepare_nf(tmp_path, "survivor").build_hash)
        assert adopted is not None and adopted.compiled is False
        assert seen(dp, adopted) == 3  # the link outlived its creator
        [point] = dp.observe({(veth.a_if, Hook.TC_INGRESS): ["survivor"]})
        assert point.ours and point.attach == "tcx" and point.drift == []
        link_id = point.link_id
        # a new process changes the chain through the same link
        assert dp.set_chain(veth.a_if, Hook.TC_INGRESS, [member(adopted)]) == "tcx"
        [point] = dp.observe({(veth.a_if, Hook.TC_INGRESS): ["survivor"]})
        assert point.link_id == link_id
        dp.clear_chain(veth.a_if, Hook.TC_INGRESS)
        assert hooklinks.tcx_programs(veth.ns_a, ifindex(veth), Hook.TC_INGRESS) == []
    finally:
        dp.teardown()


@pytest.mark.parametrize("verdict", list(VERDICTS))
def test_foreign_tcx_ahead_of_ours_is_shadowing(
    datapath: Datapath, veth: VethPair, tmp_path: Path, verdict: str
) -> None:
    nf = load_counting(datapath, tmp_path, "behind", Hook.TC_INGRESS)
    datapath.set_chain(veth.a_if, Hook.TC_INGRESS, [member(nf)])
    with foreign_tcx(veth, VERDICTS[verdict], "cni_ahead") as foreign_id:
        [point] = datapath.observe({(veth.a_if, Hook.TC_INGRESS): ["behind"]})
        assert point.tcx[0].prog_id == foreign_id
        assert [p.name for p in point.shadowed_by] == ["cni_ahead"]
        got = veth.ping_a_from_b(3, timeout_s=0.5)
        if verdict == "next":  # it lets later programs run: we see every packet
            assert (got, seen(datapath, nf)) == (3, 3)
        elif verdict == "pass":  # traffic flows, and our chain silently never runs
            assert (got, seen(datapath, nf)) == (3, 0)
        else:
            assert (got, seen(datapath, nf)) == (0, 0)
    [point] = datapath.observe({(veth.a_if, Hook.TC_INGRESS): ["behind"]})
    assert point.shadowed_by == []


@pytest.mark.parametrize("verdict", list(VERDICTS))
def test_foreign_tcx_behind_ours_sees_what_we_pass(
    datapath: Datapath, veth: VethPair, tmp_path: Path, verdict: str
) -> None:
    nf = load_counting(datapath, tmp_path, "ahead", Hook.TC_INGRESS)
    static_neighbours(veth)
    with foreign_tcx(veth, VERDICTS[verdict], "cni_behind", links.BPF_F_AFTER):
        datapath.set_chain(veth.a_if, Hook.TC_INGRESS, [member(nf)], position="first")
        [point] = datapath.observe({(veth.a_if, Hook.TC_INGRESS): ["ahead"]})
        assert [p.name for p in point.tcx] == ["nfctl_tc_in", "cni_behind"]
        assert point.shadowed_by == []
        got = veth.ping_a_from_b(3, timeout_s=0.5)
        # our chain ends with TCX_NEXT: the other tool still decides after us
        assert (got, seen(datapath, nf)) == (0 if verdict == "drop" else 3, 3)


def test_position_last_and_relative_to_a_named_program(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    nf = load_counting(datapath, tmp_path, "placed", Hook.TC_INGRESS)
    hook = Hook.TC_INGRESS
    with foreign_tcx(veth, TCX_NEXT, "cni_a"), foreign_tcx(veth, TCX_NEXT, "cni_b"):
        # cni_b was attached first-of-all after cni_a: order is cni_b, cni_a
        with pytest.raises(Exception, match="no TCX program named 'absent'"):
            datapath.set_chain(veth.a_if, hook, [member(nf)], position="after:absent")
        datapath.set_chain(veth.a_if, hook, [member(nf)], position="before:cni_a")
        order = [p.name for p in datapath.observe({(veth.a_if, hook): ["placed"]})[0].tcx]
        assert order == ["cni_b", "nfctl_tc_in", "cni_a"]
        datapath.clear_chain(veth.a_if, hook)
        datapath.set_chain(veth.a_if, hook, [member(nf)], position="last")
        [point] = datapath.observe({(veth.a_if, hook): ["placed"]})
        assert [p.name for p in point.tcx] == ["cni_b", "cni_a", "nfctl_tc_in"]
        assert [p.name for p in point.shadowed_by] == ["cni_b", "cni_a"]
        assert veth.ping_a_from_b(2) == 2 and seen(datapath, nf) == 2


def test_netlink_fallback_forced(bpffs_root: Path, veth: VethPair, tmp_path: Path) -> None:
    os.environ["NFCTL_ATTACH"] = "netlink"
    try:
        dp = Datapath(bpffs_root, tmp_path / "state", netns=veth.ns_a)
    finally:
        del os.environ["NFCTL_ATTACH"]
    try:
        tc_nf = load_counting(dp, tmp_path, "legacy", Hook.TC_INGRESS)
        xdp_nf = load_counting(dp, tmp_path, "legacyx", Hook.XDP)
        assert dp.set_chain(veth.a_if, Hook.TC_INGRESS, [member(tc_nf)]) == "tc"
        assert dp.set_chain(veth.a_if, Hook.XDP, [member(xdp_nf)]) == "native"
        assert not (bpffs_root / "links").exists()
        filters = run("tc", "filter", "show", "dev", veth.a_if, "ingress", netns=veth.ns_a)
        assert "nfctl_tc_in" in filters
        states = {p.hook: p for p in dp.observe()}
        assert states[Hook.TC_INGRESS].attach == "tc" and states[Hook.XDP].attach == "netlink"
        assert veth.ping_a_from_b(2) == 2
        assert seen(dp, tc_nf) == 2 and seen(dp, xdp_nf) == 2

        # behind TCX as a cls_bpf filter: a TCX program returning pass hides our chain
        with foreign_tcx(veth, TCX_PASS, "cni_pass"):
            desired = {(veth.a_if, Hook.TC_INGRESS): ["legacy"], (veth.a_if, Hook.XDP): ["legacyx"]}
            point = {p.hook: p for p in dp.observe(desired)}[Hook.TC_INGRESS]
            assert [p.name for p in point.shadowed_by] == ["cni_pass"]
            assert veth.ping_a_from_b(2) == 2 and seen(dp, tc_nf) == 2
    finally:
        dp.teardown()
    with pytest.raises(DatapathError, match="attach policy"):
        Datapath(bpffs_root, tmp_path / "state", attach="sometimes")


def test_foreign_xdp_program_is_refused_and_reported(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    nf = load_counting(datapath, tmp_path, "xnf", Hook.XDP)
    datapath.set_chain(veth.a_if, Hook.XDP, [member(nf)])
    # our XDP link owns the hook: a netlink attach by another tool is refused
    from tests.foreign import force_foreign_xdp

    with pytest.raises(Exception, match="busy"):
        force_foreign_xdp(veth.ns_a, veth.a_if, name="other_xdp")
    datapath.clear_chain(veth.a_if, Hook.XDP)

    # another tool got there first: we do not take it over, and say who shadows us
    force_foreign_xdp(veth.ns_a, veth.a_if, name="other_xdp")
    with pytest.raises(Exception, match="other_xdp"):
        datapath.set_chain(veth.a_if, Hook.XDP, [member(nf)])
    [point] = datapath.observe({(veth.a_if, Hook.XDP): ["xnf"]})
    assert [p.name for p in point.shadowed_by] == ["other_xdp"]
    assert veth.ping_a_from_b(2) == 2 and seen(datapath, nf) == 0
    run("ip", "link", "set", "dev", veth.a_if, "xdp", "off", netns=veth.ns_a)
