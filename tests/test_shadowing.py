"""Shadowing: another tool's program that ends processing before our chain (a CNI's TCX
program returning pass) is reported by the agent's status (condition Shadowed naming it,
per attach point shadowedBy), counted by a metric, and explained by `nfctl doctor`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nfctl.bpf import syscall
from nfctl.builder.builder import Builder
from nfctl.datapath import links
from nfctl.datapath.datapath import ChainMember, Datapath
from nfctl.datapath.shadowscan import scan
from nfctl.manifest.model import Hook
from nfctl.netns import VethPair, run
from tests.agent_harness import (
    AgentProcess,
    GitDaemon,
    GitRepo,
    metric_samples,
    nfctl,
    wait_until,
)
from tests.foreign import force_foreign_xdp
from tests.helpers import prepare_nf, write_nf
from tests.nfsources import counting_nf

pytestmark = pytest.mark.kernel

TCX_PASS = 0  # TC_ACT_OK: what a CNI returns for traffic it lets through


@contextmanager
def cni_like_tcx(veth: VethPair, name: str = "cil_from_netdev") -> Iterator[int]:
    """A foreign TCX program put first on ingress of a, returning pass; yields its id."""
    prog = syscall.load_return_program(syscall.PROG_TYPE_SCHED_CLS, TCX_PASS, name)
    index = int(run("cat", f"/sys/class/net/{veth.a_if}/ifindex", netns=veth.ns_a))
    try:
        with links.in_netns(veth.ns_a):
            link = links.link_create(prog, index, links.BPF_TCX_INGRESS, links.BPF_F_BEFORE)
        try:
            yield syscall.prog_info(prog).prog_id
        finally:
            os.close(link)
    finally:
        os.close(prog)


def scan_a(veth: VethPair) -> dict[tuple[str, Hook], str]:
    from pyroute2 import IPRoute

    with IPRoute(netns=veth.ns_a) as handle:
        return {(f.ifname, f.hook): f.describe() for f in scan(handle, veth.ns_a)}


@pytest.mark.parametrize("attach", ["auto", "netlink"])
def test_doctor_scan_names_what_runs_before_our_chain(
    bpffs_root: Path, veth: VethPair, tmp_path: Path, attach: str
) -> None:
    dp = Datapath(bpffs_root, tmp_path / "state", netns=veth.ns_a, attach=attach)
    try:
        source, function, cflags = counting_nf("tc-ingress")
        write_nf(tmp_path, "fw", source, function, hook="tc-ingress", cflags=cflags)
        loaded = Builder(dp).build(prepare_nf(tmp_path, "fw"))
        dp.set_chain(
            veth.a_if, Hook.TC_INGRESS, [ChainMember("fw", loaded.build_hash, loaded.prog_pin)]
        )
        assert scan_a(veth) == {}
        # as a TCX link placed first or as a cls_bpf filter (behind all of TCX): a TCX
        # program put ahead afterwards shadows us either way
        with cni_like_tcx(veth) as foreign_id:
            found = scan_a(veth)
            text = found[(veth.a_if, Hook.TC_INGRESS)]
            assert f"cil_from_netdev (id {foreign_id})" in text and "ends TC processing" in text
            assert veth.ping_a_from_b(2) == 2
            assert dict(dp.map_entries(loaded, "seen"))[0] == 0  # bypassed, silently
    finally:
        dp.teardown()


def test_doctor_scan_reports_a_foreign_xdp_program(veth: VethPair) -> None:
    force_foreign_xdp(veth.ns_a, veth.a_if, name="other_xdp")
    text = scan_a(veth)[(veth.a_if, Hook.XDP)]
    assert "other_xdp" in text and "one program per interface" in text


def test_agent_status_and_metric_name_the_shadowing_program(
    veth: VethPair, tmp_path: Path, bpffs_root: Path
) -> None:
    gitdir = tmp_path / "git"
    gitdir.mkdir()
    repo = GitRepo(gitdir / "nfs-repo")
    repo.add_library_nf("counter")  # tc-ingress
    commit = repo.commit("counter")
    daemon = GitDaemon(gitdir, veth.ns_b, veth.b_ip)
    daemon.start()
    agent = AgentProcess(veth, daemon.url("nfs-repo"), tmp_path / "state", bpffs_root)
    try:
        agent.start()
        status = agent.wait_ready(commit)
        shadowed = next(c for c in status["conditions"] if c["type"] == "Shadowed")
        assert shadowed["status"] is False
        [point] = agent.nf("counter")["attachPoints"]
        assert point["mode"] == "tcx" and point["shadowedBy"] == []

        def condition() -> dict[str, object]:
            return next(c for c in agent.status()["conditions"] if c["type"] == "Shadowed")

        with cni_like_tcx(veth) as foreign_id:
            wait_until(lambda: condition()["status"] is True, 15, what="Shadowed condition")
            message = str(condition()["message"])
            assert f"cil_from_netdev (id {foreign_id})" in message and veth.a_if in message
            [point] = agent.nf("counter")["attachPoints"]
            assert point["shadowedBy"] == [f"cil_from_netdev (id {foreign_id})"]
            assert point["linkId"] and point["dispatcherId"]
            shown = nfctl("status", "--state-dir", str(tmp_path / "state")).stdout
            assert f"link {point['linkId']}" in shown
            assert f"dispatcher {point['dispatcherId']}" in shown
            assert "Shadowed=True" in shown and "cil_from_netdev" in shown
            code, body = agent.http_get("/metrics")
            assert code == 200
            samples = metric_samples(body, "nfctl_agent_shadowed_attach_points")
            assert ({"hook": "tc-ingress"}, 1.0) in samples
        wait_until(lambda: condition()["status"] is False, 15, what="Shadowed cleared")
    finally:
        agent.stop()
        daemon.stop()
