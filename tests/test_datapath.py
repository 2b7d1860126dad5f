"""The datapath against the real kernel: chains, hitless replace, failures that keep the
old version, map migration, restart adoption, detach and drift."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from benchmarks.common import EchoCounters, counted_echoes
from nfctl.builder.builder import Builder
from nfctl.datapath.datapath import ChainMember, Datapath, DatapathError, LoadedBuild
from nfctl.manifest.model import Hook, IncompatibleMapPolicy
from nfctl.netns import VethPair, run
from tests.foreign import delete_tc_filter, force_foreign_xdp
from tests.helpers import prepare_nf, write_nf
from tests.nfsources import SYNTAX_ERROR_NF, VERIFIER_REJECT_NF, counting_nf

pytestmark = pytest.mark.kernel

HOOKS = [Hook.XDP, Hook.TC_INGRESS, Hook.TC_EGRESS]


def load_counting(
    dp: Datapath, folder: Path, name: str, hook: Hook, version: int = 1, priority: int = 100
) -> LoadedBuild:
    source, function, cflags = counting_nf(hook.value, version)
    write_nf(folder, name, source, function, hook=hook.value, priority=priority, cflags=cflags)
    return Builder(dp).build(prepare_nf(folder, name))


def member(loaded: LoadedBuild) -> ChainMember:
    return ChainMember(loaded.nf, loaded.build_hash, loaded.prog_pin)


def seen(dp: Datapath, loaded: LoadedBuild, hook: Hook) -> int:
    """Echo requests seen at XDP/TC ingress of a, or echo replies seen at TC egress of a."""
    counts = dict(dp.map_entries(loaded, "seen"))
    return int(counts[1] if hook is Hook.TC_EGRESS else counts[0])


def set_flag(dp: Datapath, loaded: LoadedBuild, on: bool) -> None:
    dp.sync_entries(loaded, "drop_flag", [(0, 1 if on else 0)])


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.value)
def test_chain_runs_in_order_and_stops_at_first_drop(
    datapath: Datapath, veth: VethPair, tmp_path: Path, hook: Hook
) -> None:
    first = load_counting(datapath, tmp_path, "first", hook, priority=10)
    middle = load_counting(datapath, tmp_path, "middle", hook, priority=20)
    last = load_counting(datapath, tmp_path, "last", hook, priority=30)
    datapath.set_chain(veth.a_if, hook, [member(first), member(middle), member(last)])
    assert datapath.chain_prog_ids(veth.a_if, hook) == [
        first.prog_id,
        middle.prog_id,
        last.prog_id,
    ]

    assert veth.ping_a_from_b(5) == 5
    assert [seen(datapath, nf, hook) for nf in (first, middle, last)] == [5, 5, 5]

    set_flag(datapath, middle, True)  # middle drops: last must not see these packets
    assert veth.ping_a_from_b(4, timeout_s=0.3) == 0
    assert [seen(datapath, nf, hook) for nf in (first, middle, last)] == [9, 9, 5]

    # reorder atomically: last, first, middle -> last and first see the packets
    datapath.set_chain(veth.a_if, hook, [member(last), member(first), member(middle)])
    assert veth.ping_a_from_b(3, timeout_s=0.3) == 0
    assert [seen(datapath, nf, hook) for nf in (first, middle, last)] == [12, 12, 8]

    # remove the dropping NF: traffic flows again through the remaining two
    datapath.set_chain(veth.a_if, hook, [member(last), member(first)])
    assert veth.ping_a_from_b(3) == 3
    assert [seen(datapath, nf, hook) for nf in (first, middle, last)] == [15, 12, 11]


class PingFlood:
    """Background ping flood from b to a: sent/received from b's kernel counters once the
    replies have settled (benchmarks.common.EchoCounters), checked against ping's summary."""

    def __init__(self, veth: VethPair, count: int, interval: float = 0.001) -> None:
        self.veth = veth
        self.count = count
        self.interval = interval
        self.output = ""
        self.counters = EchoCounters(veth.ns_b)
        self.before = (0, 0)
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        self.output = run(
            "ping",
            "-n",
            "-q",
            "-c",
            str(self.count),
            "-i",
            str(self.interval),
            "-W",
            "2",
            self.veth.a_ip,
            netns=self.veth.ns_b,
            check=False,
            timeout=120,
        )

    def __enter__(self) -> PingFlood:
        self.before = self.counters.read()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join()

    def result(self) -> tuple[int, int]:
        return counted_echoes(self.counters, self.before, self.output)


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.value)
def test_replace_under_traffic_loses_and_bypasses_nothing(
    datapath: Datapath, veth: VethPair, tmp_path: Path, hook: Hook
) -> None:
    v1 = load_counting(datapath, tmp_path, "counted", hook, version=1)
    v2 = load_counting(datapath, tmp_path, "counted", hook, version=2)
    assert v1.prog_id != v2.prog_id
    datapath.set_chain(veth.a_if, hook, [member(v1)])
    assert veth.ping_a_from_b(2) == 2
    before = seen(datapath, v1, hook)

    replacements = 0
    with PingFlood(veth, count=1500) as flood:
        while flood.thread.is_alive() and replacements < 400:
            target = v2 if replacements % 2 == 0 else v1
            datapath.set_chain(veth.a_if, hook, [member(target)])
            replacements += 1
            time.sleep(0.002)
    sent, received = flood.result()
    counted = seen(datapath, v1, hook) - before  # v1 and v2 share the pinned map
    assert replacements >= 50
    assert received == sent, f"{sent - received} packets lost during {replacements} replacements"
    assert counted == sent, f"{sent - counted} packets bypassed the NF"


@pytest.mark.parametrize(
    "bad_source", [SYNTAX_ERROR_NF, VERIFIER_REJECT_NF], ids=["clang", "verifier"]
)
def test_failed_new_version_keeps_the_old_one(
    datapath: Datapath, veth: VethPair, tmp_path: Path, bad_source: str
) -> None:
    good = load_counting(datapath, tmp_path, "guard", Hook.XDP)
    datapath.set_chain(veth.a_if, Hook.XDP, [member(good)])
    assert veth.ping_a_from_b(2) == 2

    write_nf(tmp_path, "guard", bad_source, "xdp_main", version="2.0.0")
    with pytest.raises(DatapathError) as failure:
        Builder(datapath).build(prepare_nf(tmp_path, "guard"))
    diags = failure.value.diagnostics
    assert diags and diags[0].file.endswith("guard/guard.c") and diags[0].line is not None
    if bad_source is VERIFIER_REJECT_NF:
        assert "verifier" in diags[0].message and diags[0].line == 7  # the eth->h_proto read
    else:
        assert diags[0].line == 5

    assert datapath.chain_prog_ids(veth.a_if, Hook.XDP) == [good.prog_id]
    assert veth.ping_a_from_b(3) == 3
    assert seen(datapath, good, Hook.XDP) == 5
    assert sorted(p.name for p in datapath.paths.pinned_progs("guard")) == [good.build_hash[:32]]


STATS_V1 = r"""
struct stats { u64 packets; };
BPF_HASH(per_proto, u32, struct stats, MAX);
int xdp_main(struct xdp_md *ctx)
{
    u32 key = 1;
    struct stats *s = per_proto.lookup(&key);
    if (s) { __sync_fetch_and_add(&s->packets, 1); }
    else { struct stats fresh = { .packets = 1 }; per_proto.update(&key, &fresh); }
    return XDP_PASS;
}
"""

STATS_V2 = r"""
struct stats { u64 packets; u64 bytes; };
BPF_HASH(per_proto, u32, struct stats, MAX);
int xdp_main(struct xdp_md *ctx)
{
    u32 key = 1;
    u64 len = ctx->data_end - ctx->data;
    struct stats *s = per_proto.lookup(&key);
    if (s) { __sync_fetch_and_add(&s->packets, 1); __sync_fetch_and_add(&s->bytes, len); }
    else { struct stats fresh = { .packets = 1, .bytes = len }; per_proto.update(&key, &fresh); }
    return XDP_PASS;
}
"""


def _stats_nf(tmp_path: Path, source: str, max_entries: int, version: str) -> None:
    write_nf(
        tmp_path, "stats", source, "xdp_main", version=version, cflags=[f"-DMAX={max_entries}"]
    )


@pytest.mark.parametrize("policy", list(IncompatibleMapPolicy), ids=lambda p: p.value)
def test_incompatible_map_follows_policy(
    datapath: Datapath, veth: VethPair, tmp_path: Path, policy: IncompatibleMapPolicy
) -> None:
    _stats_nf(tmp_path, STATS_V1, 64, "1.0.0")
    v1 = Builder(datapath).build(prepare_nf(tmp_path, "stats"))
    datapath.set_chain(veth.a_if, Hook.XDP, [member(v1)])
    assert veth.ping_a_from_b(4) == 4
    assert dict(datapath.map_entries(v1, "per_proto"))[1]["packets"] >= 4
    packets_v1 = dict(datapath.map_entries(v1, "per_proto"))[1]["packets"]

    _stats_nf(tmp_path, STATS_V2, 128, "2.0.0")  # value grows, max_entries grows
    policies = {"per_proto": policy}
    if policy is IncompatibleMapPolicy.FAIL:
        with pytest.raises(DatapathError, match="incompatible"):
            Builder(datapath).build(prepare_nf(tmp_path, "stats"), policies)
        assert datapath.chain_prog_ids(veth.a_if, Hook.XDP) == [v1.prog_id]
        from nfctl.bpf.syscall import BpfMap

        with BpfMap.from_pin(str(datapath.paths.map_pin("stats", "per_proto"))) as m:
            assert (m.info.value_size, m.info.max_entries) == (8, 64)
        return

    v2 = Builder(datapath).build(prepare_nf(tmp_path, "stats"), policies)
    assert len(v2.swaps) == 1
    datapath.set_chain(veth.a_if, Hook.XDP, [member(v2)])
    Builder(datapath).commit(v2)
    from nfctl.bpf.syscall import BpfMap

    with BpfMap.from_pin(str(datapath.paths.map_pin("stats", "per_proto"))) as m:
        assert (m.info.value_size, m.info.max_entries) == (16, 128)
    assert veth.ping_a_from_b(3) == 3
    after = dict(datapath.map_entries(v2, "per_proto"))[1]
    if policy is IncompatibleMapPolicy.MIGRATE:
        assert after["packets"] >= packets_v1 + 3  # old count carried over
    else:
        assert 3 <= after["packets"] < packets_v1 + 3  # started empty
    assert after["bytes"] >= 3 * 98


def test_compatible_map_is_reused_across_versions(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    v1 = load_counting(datapath, tmp_path, "keep", Hook.XDP, version=1)
    datapath.set_chain(veth.a_if, Hook.XDP, [member(v1)])
    assert veth.ping_a_from_b(3) == 3
    v2 = load_counting(datapath, tmp_path, "keep", Hook.XDP, version=2)
    assert v2.swaps == []
    datapath.set_chain(veth.a_if, Hook.XDP, [member(v2)])
    assert veth.ping_a_from_b(2) == 2
    assert seen(datapath, v2, Hook.XDP) == 5
    assert dict(datapath.map_entries(v2, "last_version"))[0] == 2


LPM_NF = r"""
struct lpm_v4 { u32 prefixlen; __be32 addr; };
struct peer { u8 mac[6]; __be16 port; char label[8]; u16 weights[2]; };
BPF_LPM_TRIE(deny, struct lpm_v4, u8, 64);
BPF_HASH(peers, u32, struct peer, 8);
#include <linux/if_ether.h>
#include <linux/ip.h>
int xdp_main(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP))
        return XDP_PASS;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return XDP_PASS;
    struct lpm_v4 key = { .prefixlen = 32, .addr = ip->saddr };
    return deny.lookup(&key) ? XDP_DROP : XDP_PASS;
}
"""


def test_typed_entries_reach_the_program(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    write_nf(tmp_path, "lpm", LPM_NF, "xdp_main")
    loaded = Builder(datapath).build(prepare_nf(tmp_path, "lpm"))
    datapath.set_chain(veth.a_if, Hook.XDP, [member(loaded)])
    extra = veth.b_ip.rsplit(".", 1)[0] + ".77"
    veth.add_b_address(extra)
    # a /32 CIDR for the extra source only: the main source still passes
    datapath.sync_entries(loaded, "deny", [(f"{extra}/32", 1)])
    assert veth.ping(veth.ns_b, veth.a_ip, 2, source=extra, timeout_s=0.3) == 0
    assert veth.ping_a_from_b(2) == 2
    # the whole /24 covers both
    result = datapath.sync_entries(loaded, "deny", [(veth.b_ip.rsplit(".", 1)[0] + ".0/24", 1)])
    assert (result.added, result.deleted) == (1, 1)
    assert veth.ping_a_from_b(2, timeout_s=0.3) == 0

    peer = {"mac": "02:00:5e:10:00:01", "port": 8080, "label": "edge-1", "weights": [3, 7]}
    datapath.sync_entries(loaded, "peers", [(1, peer)])
    stored = dict(datapath.map_entries(loaded, "peers"))[1]
    assert stored == peer
    from nfctl.bpf.syscall import BpfMap

    with BpfMap.from_pin(str(datapath.paths.map_pin("lpm", "peers"))) as raw_map:
        raw = dict(raw_map.items())[(1).to_bytes(4, "little")]
    assert raw[6:8] == (8080).to_bytes(2, "big")  # __be16: network order in the kernel
    assert raw[:6] == bytes.fromhex("02005e100001")


ATTACHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from nfctl.builder.builder import Builder
    from nfctl.datapath.datapath import ChainMember, Datapath
    from tests.helpers import prepare_nf
    root, state, netns, ifname, folder = sys.argv[1:6]
    dp = Datapath(Path(root), Path(state), netns=netns)
    loaded = Builder(dp).build(prepare_nf(Path(folder), "survivor"))
    dp.set_chain(ifname, __import__("nfctl.manifest.model").manifest.model.Hook.XDP,
                 [ChainMember(loaded.nf, loaded.build_hash, loaded.prog_pin)])
    dp.sync_entries(loaded, "drop_flag", [(0, 0)])
    print("attached", loaded.prog_id, flush=True)
    time.sleep(600)
    """
)


def test_survives_kill_and_is_adopted_without_compiling(
    bpffs_root: Path, veth: VethPair, tmp_path: Path
) -> None:
    source, function, cflags = counting_nf("xdp")
    write_nf(tmp_path, "survivor", source, function, cflags=cflags)
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ATTACHER,
            str(bpffs_root),
            str(state),
            veth.ns_a,
            veth.a_if,
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("attached"), line
        prog_id = int(line.split()[1])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    assert veth.ping_a_from_b(3) == 3  # still attached after the owner died
    dp = Datapath(bpffs_root, state, netns=veth.ns_a)
    try:
        start = time.monotonic()
        adopted = dp.find_loaded("survivor", prepare_nf(tmp_path, "survivor").build_hash)
        elapsed = time.monotonic() - start
        assert adopted is not None and adopted.compiled is False and adopted.prog_id == prog_id
        assert elapsed < 1.0
        assert seen(dp, adopted, Hook.XDP) == 3
        [point] = dp.observe({(veth.a_if, Hook.XDP): ["survivor"]})
        assert point.ours and point.drift == [] and [p.prog_id for p in point.chain] == [prog_id]
        # the new process can still change the chain it did not create
        dp.sync_entries(adopted, "drop_flag", [(0, 1)])
        assert veth.ping_a_from_b(2, timeout_s=0.3) == 0
    finally:
        dp.teardown()


def _interface_snapshot(veth: VethPair) -> tuple[str, str]:
    qdiscs = run("tc", "qdisc", "show", "dev", veth.a_if, netns=veth.ns_a)
    link = run("ip", "-d", "link", "show", "dev", veth.a_if, netns=veth.ns_a)
    xdp = "xdp" if "prog/xdp" in link else "no-xdp"
    return qdiscs.strip(), xdp


def test_detach_restores_the_interface(datapath: Datapath, veth: VethPair, tmp_path: Path) -> None:
    before = _interface_snapshot(veth)
    loaded = {h: load_counting(datapath, tmp_path, f"d-{h.value}", h) for h in HOOKS}
    for hook, build in loaded.items():
        datapath.set_chain(veth.a_if, hook, [member(build)])
    assert _interface_snapshot(veth) != before
    for hook in HOOKS:
        datapath.clear_chain(veth.a_if, hook)
    assert _interface_snapshot(veth) == before
    assert veth.ping_a_from_b(2) == 2


def test_detach_keeps_foreign_tc_filters(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    run("tc", "qdisc", "add", "dev", veth.a_if, "clsact", netns=veth.ns_a)
    run(
        "tc",
        "filter",
        "add",
        "dev",
        veth.a_if,
        "ingress",
        "prio",
        "20",
        "u32",
        "match",
        "u32",
        "0",
        "0",
        "classid",
        "1:1",
        netns=veth.ns_a,
    )
    build = load_counting(datapath, tmp_path, "guest", Hook.TC_INGRESS)
    datapath.set_chain(veth.a_if, Hook.TC_INGRESS, [member(build)])
    assert veth.ping_a_from_b(2) == 2
    datapath.clear_chain(veth.a_if, Hook.TC_INGRESS)
    qdiscs = run("tc", "qdisc", "show", "dev", veth.a_if, netns=veth.ns_a)
    filters = run("tc", "filter", "show", "dev", veth.a_if, "ingress", netns=veth.ns_a)
    assert "clsact" in qdiscs
    assert "u32" in filters and "bpf" not in filters


def test_foreign_program_and_removed_filter_are_drift(
    bpffs_root: Path, veth: VethPair, tmp_path: Path
) -> None:
    # netlink attach (forced): a bpf_link would refuse the foreign program (test_tcx.py)
    datapath = Datapath(bpffs_root, tmp_path / "state", netns=veth.ns_a, attach="netlink")
    try:
        _foreign_program_and_removed_filter_are_drift(datapath, veth, tmp_path)
    finally:
        datapath.teardown()


def _foreign_program_and_removed_filter_are_drift(
    datapath: Datapath, veth: VethPair, tmp_path: Path
) -> None:
    xdp_nf = load_counting(datapath, tmp_path, "xdpnf", Hook.XDP)
    tc_nf = load_counting(datapath, tmp_path, "tcnf", Hook.TC_INGRESS)
    datapath.set_chain(veth.a_if, Hook.XDP, [member(xdp_nf)])
    datapath.set_chain(veth.a_if, Hook.TC_INGRESS, [member(tc_nf)])
    desired = {(veth.a_if, Hook.XDP): ["xdpnf"], (veth.a_if, Hook.TC_INGRESS): ["tcnf"]}
    assert all(p.drift == [] for p in datapath.observe(desired))

    # another tool force-replaces our XDP program; someone deletes our tc filter
    force_foreign_xdp(veth.ns_a, veth.a_if, name="foreign_pass")
    delete_tc_filter(veth.ns_a, veth.a_if)
    states = {p.hook: p for p in datapath.observe(desired)}
    assert any("foreign_pass" in d for d in states[Hook.XDP].drift), states[Hook.XDP].drift
    assert any("nothing attached" in d for d in states[Hook.TC_INGRESS].drift)

    # correction: put ours back (take_over replaces the foreign XDP program)
    datapath.set_chain(veth.a_if, Hook.XDP, [member(xdp_nf)], take_over=True)
    datapath.set_chain(veth.a_if, Hook.TC_INGRESS, [member(tc_nf)])
    assert all(p.drift == [] for p in datapath.observe(desired))
    assert veth.ping_a_from_b(2) == 2
    assert seen(datapath, xdp_nf, Hook.XDP) == 2 and seen(datapath, tc_nf, Hook.TC_INGRESS) == 2

    # removed pins are drift too
    os.unlink(tc_nf.prog_pin)
    states = {p.hook: p for p in datapath.observe(desired)}
    assert any("unpinned" in d for d in states[Hook.TC_INGRESS].drift)
